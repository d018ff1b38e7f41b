// .npy reader/writer: round trips for every dtype, v1/v2 headers, and the refusals.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "mlstm/core/error.hpp"
#include "mlstm/core/npy.hpp"

namespace mlstm {
namespace {

std::string header_image(const std::string& dict, int version = 1) {
  std::string h = dict;
  const std::size_t prefix = version == 1 ? 10 : 12;
  while ((prefix + h.size() + 1) % 64 != 0) h.push_back(' ');
  h.push_back('\n');
  std::string out("\x93NUMPY", 6);
  out.push_back(static_cast<char>(version));
  out.push_back(0);
  out.push_back(static_cast<char>(h.size() & 0xff));
  out.push_back(static_cast<char>((h.size() >> 8) & 0xff));
  if (version != 1) {
    out.push_back(0);
    out.push_back(0);
  }
  return out + h;
}

std::string argument_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const InvalidArgument& e) {
    return e.argument() + " | " + e.what();
  }
  return "<nothing thrown>";
}

TEST(Npy, RoundTripsEveryDtype) {
  for (DType d : {DType::f64, DType::f32, DType::f16, DType::bf16}) {
    Tensor t = Tensor::from(std::vector<float>{1.5f, -2.f, 3.25f, 0.f, 7.f, -0.5f}, {2, 3}, d);
    const std::string bytes = npy::serialize(t.view());
    EXPECT_EQ(bytes.size() % 64, t.nbytes() % 64);  // data starts on a 64-byte boundary
    const Tensor back = npy::parse(bytes, "x", d == DType::bf16 ? std::optional(DType::bf16) : std::nullopt);
    ASSERT_EQ(back.dtype(), d);
    ASSERT_EQ(back.shape(), t.shape());
    EXPECT_EQ(std::memcmp(back.bytes(), t.bytes(), t.nbytes()), 0) << dtype_name(d);
  }
  const auto path = (std::filesystem::temp_directory_path() / "mlstm_npy_test.npy").string();
  Tensor t = Tensor::from(std::vector<float>{1, 2, 3}, {3});
  npy::write(path, t.view());
  EXPECT_EQ(npy::read(path, "--q").get({2}), 3.0);
  std::filesystem::remove(path);
}

TEST(Npy, ReadsSequenceSlicesWithoutTheRest) {
  std::vector<float> v(2 * 3 * 10 * 4);
  for (std::size_t e = 0; e < v.size(); ++e) v[e] = static_cast<float>(e);
  Tensor t = Tensor::from(v, {2, 3, 10, 4});
  const auto path = (std::filesystem::temp_directory_path() / "mlstm_npy_slice.npy").string();
  npy::write(path, t.view());
  const Tensor s = npy::read_seq_slice(path, "--q", 3, 7);
  ASSERT_EQ(s.shape(), (Shape{2, 3, 4, 4}));
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t h = 0; h < 3; ++h)
      for (std::int64_t t0 = 0; t0 < 4; ++t0)
        for (std::int64_t d = 0; d < 4; ++d) ASSERT_EQ(s.get({b, h, t0, d}), t.get({b, h, t0 + 3, d}));
  EXPECT_EQ(npy::read_header(path, "--q").first, (Shape{2, 3, 10, 4}));
  EXPECT_THROW(npy::read_seq_slice(path, "--q", 8, 12), InvalidArgument);
  std::filesystem::remove(path);
}

TEST(Npy, ReadsVersionTwoHeaders) {
  std::string img = header_image("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", 2);
  const float data[2] = {4.f, 5.f};
  img.append(reinterpret_cast<const char*>(data), sizeof data);
  EXPECT_EQ(npy::parse(img, "x").get({1}), 5.0);
}

TEST(Npy, RefusesBadFiles) {
  const float data[4] = {1, 2, 3, 4};
  auto with_data = [&](std::string img, std::size_t n) { return img.append(reinterpret_cast<const char*>(data), n); };
  EXPECT_NE(argument_of([&] { npy::read("/nonexistent/q.npy", "--q"); }).find("--q | --q: cannot open"), std::string::npos);
  EXPECT_NE(argument_of([&] { npy::parse("not numpy at all", "--k"); }).find("bad magic"), std::string::npos);
  EXPECT_NE(argument_of([&] {
              npy::parse(with_data(header_image("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }"), 16), "--v");
            }).find("Fortran"),
            std::string::npos);
  EXPECT_NE(argument_of([&] {
              npy::parse(with_data(header_image("{'descr': '>f4', 'fortran_order': False, 'shape': (4,), }"), 16), "--v");
            }).find("big-endian"),
            std::string::npos);
  EXPECT_NE(argument_of([&] {
              npy::parse(with_data(header_image("{'descr': '<i4', 'fortran_order': False, 'shape': (4,), }"), 16), "--i");
            }).find("'<i4'"),
            std::string::npos);
  EXPECT_NE(argument_of([&] {
              npy::parse(with_data(header_image("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }"), 12), "--f");
            }).find("truncated"),
            std::string::npos);
  EXPECT_NE(argument_of([&] {
              npy::parse(with_data(header_image("{'descr': '<u2', 'fortran_order': False, 'shape': (2,), }"), 4), "--q");
            }).find("bfloat16"),
            std::string::npos);
  EXPECT_NE(argument_of([&] { npy::parse(header_image("{'descr': '<f4', 'shape': (4,), }"), "--q"); }).find("fortran_order"),
            std::string::npos);
}

// Regressions from fuzzing (fuzz/fuzz_npy): a header whose dimensions multiply past int64 (the element
// count overflowed in shape_numel: undefined behaviour, then a wrapped size passed the truncation check).
TEST(Npy, RefusesShapesWhoseElementCountOverflows) {
  // The fuzzer's input as found: "'shape':(9111, ,, 11,, 11,  411, ,, 11,, 11,  41411,  4141)".
  const unsigned char found[] = {
      0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x01, 0x00, 0x76, 0x00, 0x7b, 0x27, 0x64, 0x65, 0x73, 0x63,
      0x72, 0x27, 0x00, 0x00, 0x00, 0x00, 0x3a, 0x20, 0x27, 0x3c, 0x66, 0x34, 0x27, 0x2c, 0x20, 0x27,
      0x66, 0x6f, 0x72, 0x74, 0x72, 0x61, 0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x93, 0x50,
      0x51, 0x01, 0x2a, 0x00, 0x63, 0x72, 0x3a, 0x20, 0x46, 0x61, 0x6c, 0x73, 0x65, 0x2c, 0x20, 0x27,
      0x73, 0x68, 0x61, 0x70, 0x65, 0x27, 0x3a, 0x28, 0x39, 0x31, 0x31, 0x31, 0x2c, 0x20, 0x2c, 0x2c,
      0x20, 0x31, 0x31, 0x2c, 0x2c, 0x20, 0x31, 0x31, 0x2c, 0x20, 0x20, 0x34, 0x31, 0x31, 0x2c, 0x20,
      0x2c, 0x2c, 0x20, 0x31, 0x31, 0x2c, 0x2c, 0x20, 0x31, 0x31, 0x2c, 0x20, 0x20, 0x34, 0x31, 0x34,
      0x31, 0x31, 0x2c, 0x20, 0x20, 0x34, 0x31, 0x34, 0x31, 0x29, 0x61, 0x70, 0x65, 0x3f, 0xc0, 0x3f,
  };
  const std::string image(reinterpret_cast<const char*>(found), sizeof found);
  EXPECT_NE(argument_of([&] { npy::parse(image, "--q"); }).find("too many elements"), std::string::npos);
  EXPECT_NE(argument_of([&] { npy::parse(image, "--q", DType::bf16); }).find("--q"), std::string::npos);
  // Found after a first fix that skipped the check when a dimension is 0: "(166666666\r66666666666,2, 8   1
  // 1,1  5 0  1,34)" (the running product 166666666 * 66666666666 overflows before the 0 is reached).
  const unsigned char found_with_zero[] = {
      0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x01, 0x00, 0x6c, 0x00, 0x72, 0x27, 0x64, 0x65, 0x73, 0x63,
      0x72, 0x27, 0x3a, 0x20, 0x27, 0x3c, 0x66, 0x32, 0x27, 0x2c, 0x20, 0x27, 0x66, 0x6f, 0x72, 0x74,
      0x72, 0x61, 0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x3a, 0x20, 0x46, 0x61, 0x6c, 0x73,
      0x65, 0x2c, 0x65, 0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27, 0x3a, 0x20, 0x28, 0x31, 0x36, 0x36,
      0x36, 0x36, 0x36, 0x36, 0x36, 0x36, 0x0d, 0x36, 0x36, 0x36, 0x36, 0x36, 0x36, 0x36, 0x36, 0x36,
      0x36, 0x36, 0x2c, 0x32, 0x2c, 0x20, 0x38, 0x20, 0x20, 0x20, 0x31, 0x20, 0x20, 0x31, 0x2c, 0x31,
      0x20, 0x20, 0x35, 0x20, 0x30, 0x20, 0x20, 0x31, 0x2c, 0x33, 0x34, 0x29, 0x6f, 0x72, 0x64, 0x28,
      0x72, 0x99, 0x99, 0x99, 0x64, 0x20, 0x27,
  };
  const std::string image2(reinterpret_cast<const char*>(found_with_zero), sizeof found_with_zero);
  EXPECT_NE(argument_of([&] { npy::parse(image2, "--q"); }).find("too many elements"), std::string::npos);
  // Dimensions each within limits whose product is 2^80, and one whose product stays just in range but
  // promises more data than the file holds.
  const std::string huge = header_image("{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 1048576), }");
  EXPECT_NE(argument_of([&] { npy::parse(huge, "--k"); }).find("too many elements"), std::string::npos);
  const std::string big = header_image("{'descr': '<f8', 'fortran_order': False, 'shape': (1048576, 1048576), }");
  EXPECT_NE(argument_of([&] { npy::parse(big, "--k"); }).find("truncated"), std::string::npos);
  // A zero dimension makes an empty array, but does not excuse huge dimensions before it (their running
  // product would still overflow).
  const Tensor empty = npy::parse(header_image("{'descr': '<f4', 'fortran_order': False, 'shape': (1048576, 0, 7), }"), "--v");
  EXPECT_EQ(empty.numel(), 0);
  EXPECT_NE(argument_of([&] {
              npy::parse(header_image("{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 1099511627776, 0), }"),
                         "--v");
            }).find("too many elements"),
            std::string::npos);
}

// read_seq_slice and read_header on a file whose header promises far more data than it has: refused as
// truncated before the slice is allocated.
TEST(Npy, SliceOfATruncatedFileIsRefusedBeforeAllocating) {
  const auto path = (std::filesystem::temp_directory_path() / "mlstm_npy_truncated.npy").string();
  {
    std::string img = header_image("{'descr': '<f4', 'fortran_order': False, 'shape': (64, 64, 1073741824, 64), }");
    img.append(256, '\0');
    std::ofstream(path, std::ios::binary) << img;
  }
  EXPECT_EQ(npy::read_header(path, "--q").first, (Shape{64, 64, 1073741824, 64}));
  EXPECT_NE(argument_of([&] { npy::read_seq_slice(path, "--q", 0, 1 << 20); }).find("truncated"), std::string::npos);
  EXPECT_NE(argument_of([&] { npy::read(path, "--q"); }).find("truncated"), std::string::npos);
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace mlstm
