// .npy reader/writer: round trips for every dtype, v1/v2 headers, and the refusals.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include "mlstm/error.hpp"
#include "mlstm/npy.hpp"

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

}  // namespace
}  // namespace mlstm
