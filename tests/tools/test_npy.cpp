// .npy reader/writer: round trips for every dtype, v1/v2 headers, and the refusals.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <thread>
#include <vector>

#include "mlstm/core/atomic_file.hpp"
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
  EXPECT_NE(argument_of([&] { npy::read("/nonexistent/q.npy", "--q"); }).find("--q | --q: cannot open"),
            std::string::npos);
  EXPECT_NE(argument_of([&] { npy::parse("not numpy at all", "--k"); }).find("bad magic"), std::string::npos);
  EXPECT_NE(argument_of([&] {
              npy::parse(with_data(header_image("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }"), 16),
                         "--v");
            }).find("Fortran"),
            std::string::npos);
  EXPECT_NE(argument_of([&] {
              npy::parse(with_data(header_image("{'descr': '>f4', 'fortran_order': False, 'shape': (4,), }"), 16),
                         "--v");
            }).find("big-endian"),
            std::string::npos);
  EXPECT_NE(argument_of([&] {
              npy::parse(with_data(header_image("{'descr': '<i4', 'fortran_order': False, 'shape': (4,), }"), 16),
                         "--i");
            }).find("'<i4'"),
            std::string::npos);
  EXPECT_NE(argument_of([&] {
              npy::parse(with_data(header_image("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }"), 12),
                         "--f");
            }).find("truncated"),
            std::string::npos);
  EXPECT_NE(argument_of([&] {
              npy::parse(with_data(header_image("{'descr': '<u2', 'fortran_order': False, 'shape': (2,), }"), 4),
                         "--q");
            }).find("bfloat16"),
            std::string::npos);
  EXPECT_NE(
      argument_of([&] { npy::parse(header_image("{'descr': '<f4', 'shape': (4,), }"), "--q"); }).find("fortran_order"),
      std::string::npos);
}

// Offsets of packed sequences (--cu-seqlens): int64 in this byte order, one-dimensional, at least two, the data
// all there; a round trip through write_offsets.
TEST(Npy, OffsetsAreOneDimensionalInt64) {
  const std::int64_t data[4] = {0, 3, 7, 12};
  auto with_data = [&](std::string img, std::size_t n) { return img.append(reinterpret_cast<const char*>(data), n); };
  auto refusal = [&](const std::string& dict, std::size_t n) {
    return argument_of([&] { npy::parse_offsets(with_data(header_image(dict), n), "--cu-seqlens"); });
  };
  EXPECT_EQ(npy::parse_offsets(with_data(header_image("{'descr': '<i8', 'fortran_order': False, 'shape': (4,), }"), 32),
                               "--cu-seqlens"),
            (std::vector<std::int64_t>{0, 3, 7, 12}));
  EXPECT_NE(refusal("{'descr': '<i4', 'fortran_order': False, 'shape': (4,), }", 32).find("must be int64"),
            std::string::npos);
  EXPECT_NE(refusal("{'descr': '<f8', 'fortran_order': False, 'shape': (4,), }", 32).find("must be int64"),
            std::string::npos);
  EXPECT_NE(refusal("{'descr': '>i8', 'fortran_order': False, 'shape': (4,), }", 32).find("big-endian"),
            std::string::npos);
  EXPECT_NE(refusal("{'descr': '<i8', 'fortran_order': False, 'shape': (2, 2), }", 32).find("one-dimensional"),
            std::string::npos);
  EXPECT_NE(refusal("{'descr': '<i8', 'fortran_order': False, 'shape': (4,), }", 24).find("truncated"),
            std::string::npos);
  EXPECT_NE(refusal("{'descr': '<i8', 'fortran_order': False, 'shape': (1,), }", 8).find("N + 1 >= 2"),
            std::string::npos);
  EXPECT_EQ(refusal("{'descr': '<i8', 'fortran_order': True, 'shape': (4,), }", 32).rfind("--cu-seqlens | ", 0), 0u);
  const auto dir = std::filesystem::temp_directory_path() / ("mlstm_offsets_" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  const std::string file = (dir / "o.npy").string();
  npy::write_offsets(file, std::vector<std::int64_t>{0, 5, 9});
  EXPECT_EQ(npy::read_offsets(file, "--cu-seqlens"), (std::vector<std::int64_t>{0, 5, 9}));
  {  // a header promising more than the file holds is refused before the data is read
    std::ofstream out(file, std::ios::binary | std::ios::trunc);
    out << with_data(header_image("{'descr': '<i8', 'fortran_order': False, 'shape': (1000000000,), }"), 32);
  }
  EXPECT_NE(argument_of([&] { npy::read_offsets(file, "--cu-seqlens"); }).find("truncated"), std::string::npos);
  std::filesystem::remove_all(dir);
}

// Regressions from fuzzing (fuzz/fuzz_npy): a header whose dimensions multiply past int64 (the element
// count overflowed in shape_numel: undefined behaviour, then a wrapped size passed the truncation check).
TEST(Npy, RefusesShapesWhoseElementCountOverflows) {
  // The fuzzer's input as found: "'shape':(9111, ,, 11,, 11,  411, ,, 11,, 11,  41411,  4141)".
  const unsigned char found[] = {
      0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x01, 0x00, 0x76, 0x00, 0x7b, 0x27, 0x64, 0x65, 0x73, 0x63, 0x72, 0x27, 0x00,
      0x00, 0x00, 0x00, 0x3a, 0x20, 0x27, 0x3c, 0x66, 0x34, 0x27, 0x2c, 0x20, 0x27, 0x66, 0x6f, 0x72, 0x74, 0x72, 0x61,
      0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x93, 0x50, 0x51, 0x01, 0x2a, 0x00, 0x63, 0x72, 0x3a, 0x20, 0x46,
      0x61, 0x6c, 0x73, 0x65, 0x2c, 0x20, 0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27, 0x3a, 0x28, 0x39, 0x31, 0x31, 0x31,
      0x2c, 0x20, 0x2c, 0x2c, 0x20, 0x31, 0x31, 0x2c, 0x2c, 0x20, 0x31, 0x31, 0x2c, 0x20, 0x20, 0x34, 0x31, 0x31, 0x2c,
      0x20, 0x2c, 0x2c, 0x20, 0x31, 0x31, 0x2c, 0x2c, 0x20, 0x31, 0x31, 0x2c, 0x20, 0x20, 0x34, 0x31, 0x34, 0x31, 0x31,
      0x2c, 0x20, 0x20, 0x34, 0x31, 0x34, 0x31, 0x29, 0x61, 0x70, 0x65, 0x3f, 0xc0, 0x3f,
  };
  const std::string image(reinterpret_cast<const char*>(found), sizeof found);
  EXPECT_NE(argument_of([&] { npy::parse(image, "--q"); }).find("too many elements"), std::string::npos);
  EXPECT_NE(argument_of([&] { npy::parse(image, "--q", DType::bf16); }).find("--q"), std::string::npos);
  // Found after a first fix that skipped the check when a dimension is 0: "(166666666\r66666666666,2, 8   1
  // 1,1  5 0  1,34)" (the running product 166666666 * 66666666666 overflows before the 0 is reached).
  const unsigned char found_with_zero[] = {
      0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x01, 0x00, 0x6c, 0x00, 0x72, 0x27, 0x64, 0x65, 0x73, 0x63, 0x72,
      0x27, 0x3a, 0x20, 0x27, 0x3c, 0x66, 0x32, 0x27, 0x2c, 0x20, 0x27, 0x66, 0x6f, 0x72, 0x74, 0x72, 0x61,
      0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x3a, 0x20, 0x46, 0x61, 0x6c, 0x73, 0x65, 0x2c, 0x65,
      0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27, 0x3a, 0x20, 0x28, 0x31, 0x36, 0x36, 0x36, 0x36, 0x36, 0x36,
      0x36, 0x36, 0x0d, 0x36, 0x36, 0x36, 0x36, 0x36, 0x36, 0x36, 0x36, 0x36, 0x36, 0x36, 0x2c, 0x32, 0x2c,
      0x20, 0x38, 0x20, 0x20, 0x20, 0x31, 0x20, 0x20, 0x31, 0x2c, 0x31, 0x20, 0x20, 0x35, 0x20, 0x30, 0x20,
      0x20, 0x31, 0x2c, 0x33, 0x34, 0x29, 0x6f, 0x72, 0x64, 0x28, 0x72, 0x99, 0x99, 0x99, 0x64, 0x20, 0x27,
  };
  const std::string image2(reinterpret_cast<const char*>(found_with_zero), sizeof found_with_zero);
  EXPECT_NE(argument_of([&] { npy::parse(image2, "--q"); }).find("too many elements"), std::string::npos);
  // Dimensions each within limits whose product is 2^80, and one whose product stays just in range but
  // promises more data than the file holds.
  const std::string huge =
      header_image("{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 1048576), }");
  EXPECT_NE(argument_of([&] { npy::parse(huge, "--k"); }).find("too many elements"), std::string::npos);
  const std::string big = header_image("{'descr': '<f8', 'fortran_order': False, 'shape': (1048576, 1048576), }");
  EXPECT_NE(argument_of([&] { npy::parse(big, "--k"); }).find("truncated"), std::string::npos);
  // A zero dimension makes an empty array, but does not excuse huge dimensions before it (their running
  // product would still overflow).
  const Tensor empty =
      npy::parse(header_image("{'descr': '<f4', 'fortran_order': False, 'shape': (1048576, 0, 7), }"), "--v");
  EXPECT_EQ(empty.numel(), 0);
  EXPECT_NE(argument_of([&] {
              npy::parse(header_image(
                             "{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 1099511627776, 0), }"),
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

// Outputs are written atomically (issue 21 item 2): a failed write, whatever the reason (here the writer
// throws, the file size limit is hit, the directory does not exist), throws and leaves the old file as it
// was and no temporary file in the directory.
namespace fs = std::filesystem;

std::vector<std::string> entries(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

std::string contents(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

TEST(AtomicFile, FailureLeavesTheOldFileAndNoDebris) {
  const fs::path dir = fs::temp_directory_path() / ("mlstm_atomic_" + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string path = (dir / "out.npy").string();
  const Tensor old_t = Tensor::from(std::vector<float>{1, 2, 3}, {3});
  npy::write(path, old_t.view());
  const std::string old_bytes = contents(path);
  EXPECT_EQ(entries(dir), std::vector<std::string>{"out.npy"});
  // The writer fails half way.
  EXPECT_THROW(write_file_atomically(path,
                                     [](AtomicFile& f) {
                                       f.write("partial");
                                       throw Error("writer failed");
                                     }),
               Error);
  EXPECT_EQ(contents(path), old_bytes);
  EXPECT_EQ(entries(dir), std::vector<std::string>{"out.npy"});
  // The file size limit (as a full disk would): write(2) fails with EFBIG.
  {
    struct sigaction ignore {
    }, previous{};
    ignore.sa_handler = SIG_IGN;
    sigaction(SIGXFSZ, &ignore, &previous);
    rlimit old_limit{};
    getrlimit(RLIMIT_FSIZE, &old_limit);
    rlimit small = old_limit;
    small.rlim_cur = 4096;
    ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
    const Tensor big = Tensor::zeros({64, 1024}, DType::f32);  // 256 KiB
    std::string message;
    try {
      npy::write(path, big.view());
    } catch (const Error& e) {
      message = e.what();
    }
    setrlimit(RLIMIT_FSIZE, &old_limit);
    sigaction(SIGXFSZ, &previous, nullptr);
    EXPECT_NE(message.find("out.npy"), std::string::npos) << message;
  }
  EXPECT_EQ(contents(path), old_bytes);
  EXPECT_EQ(entries(dir), std::vector<std::string>{"out.npy"});
  // No such directory: an Error naming the path, nothing created.
  EXPECT_THROW(npy::write((dir / "missing" / "x.npy").string(), old_t.view()), Error);
  EXPECT_EQ(entries(dir), std::vector<std::string>{"out.npy"});
  // A successful write replaces the file in one step, with the usual permissions.
  const Tensor new_t = Tensor::from(std::vector<float>{4, 5}, {2});
  npy::write(path, new_t.view());
  EXPECT_EQ(npy::read(path, "--q").shape(), (Shape{2}));
  EXPECT_EQ(entries(dir), std::vector<std::string>{"out.npy"});
  EXPECT_NE(static_cast<int>(fs::status(path).permissions() & fs::perms::owner_read), 0);
  fs::remove_all(dir);
}

// A writer replaces only what it may lose nothing by: nothing there, an empty regular file, or a file that begins as
// its own outputs do; anything else is named with the reason (the graph's DOT dump and bench's default paths ask).
TEST(AtomicFile, WhyNotReplaceableKeepsTheUsersFiles) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("mlstm_replaceable_" + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  auto put = [&](const char* name, const std::string& bytes) {
    std::ofstream(dir / name, std::ios::binary) << bytes;
    return (dir / name).string();
  };
  EXPECT_EQ(why_not_replaceable((dir / "absent").string(), "digraph"), std::nullopt);
  EXPECT_EQ(why_not_replaceable(put("empty", ""), "digraph"), std::nullopt);
  EXPECT_EQ(why_not_replaceable(put("dump", "digraph \"g\" {}\n"), "digraph"), std::nullopt);
  const auto shorter = why_not_replaceable(put("short", "digr"), "digraph");
  ASSERT_TRUE(shorter.has_value());
  EXPECT_NE(shorter->find("does not begin with 'digraph'"), std::string::npos) << *shorter;
  EXPECT_TRUE(why_not_replaceable(put("npy", "\x93NUMPY"), "digraph").has_value());
  const auto directory = why_not_replaceable(dir.string(), "digraph");
  ASSERT_TRUE(directory.has_value());
  EXPECT_NE(directory->find("not a regular file"), std::string::npos) << *directory;
  fs::remove_all(dir);
}

// Several outputs of one command, all or none: a failure in a later file (its writer throws) leaves the earlier
// ones as they were and no temporary file; commit() replaces them all.
// read_fully / write_fully move the whole count through short transfers (a pipe hands out what its writer has
// written so far), stop at the end of a file with error 0, and name a failed call's errno.
TEST(FdTransfer, WholeCountsThroughShortTransfersEndOfFileAndErrors) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  std::string sent(200000, '\0');
  for (std::size_t i = 0; i < sent.size(); ++i) sent[i] = static_cast<char>(i * 7 + 3);
  std::thread writer([&] {
    for (std::size_t at = 0; at < sent.size(); at += 30000) {
      const std::size_t n = std::min<std::size_t>(30000, sent.size() - at);
      EXPECT_EQ(write_fully(fds[1], sent.data() + at, n).bytes, n);
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    ::close(fds[1]);
  });
  std::string got(sent.size() + 10, '\0');
  const FdTransfer r = read_fully(fds[0], got.data(), got.size());
  writer.join();
  ::close(fds[0]);
  EXPECT_EQ(r.bytes, sent.size());  // all of it, then the end (the writer closed)
  EXPECT_EQ(r.error, 0);
  EXPECT_EQ(got.substr(0, sent.size()), sent);

  const fs::path path = fs::temp_directory_path() / ("mlstm_fd_transfer_" + std::to_string(getpid()) + ".bin");
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
  ASSERT_GE(fd, 0);
  fs::remove(path);                                                                 // the descriptor keeps it
  EXPECT_EQ(write_fully(fd, sent.data(), 1000, std::uint64_t{5000}).bytes, 1000u);  // at an offset
  std::string back(1000, '\0');
  EXPECT_EQ(read_fully(fd, back.data(), back.size(), std::uint64_t{5000}).bytes, 1000u);
  EXPECT_EQ(back, sent.substr(0, 1000));
  const FdTransfer past = read_fully(fd, back.data(), back.size(), std::uint64_t{5500});
  EXPECT_EQ(past.bytes, 500u);  // the file ends there
  EXPECT_EQ(past.error, 0);
  ::close(fd);
  const FdTransfer bad = read_fully(fd, back.data(), back.size());
  EXPECT_EQ(bad.bytes, 0u);
  EXPECT_EQ(bad.error, EBADF);
  EXPECT_EQ(write_fully(fd, back.data(), back.size(), std::uint64_t{0}).error, EBADF);
}

TEST(AtomicFile, AGroupIsAllOrNone) {
  const fs::path dir = fs::temp_directory_path() / ("mlstm_atomic_group_" + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string a = (dir / "a.npy").string(), b = (dir / "b.npy").string();
  const Tensor old_t = Tensor::from(std::vector<float>{1, 2, 3}, {3}), new_t = Tensor::from(std::vector<float>{4}, {1});
  npy::write(a, old_t.view());
  npy::write(b, old_t.view());
  const std::string old_bytes = contents(a);
  {
    AtomicFileGroup group;
    npy::write_to(group.add(a), new_t.view());
    group.add(b).write("partial");
    // No commit (the second output failed): the group goes, both files stay as they were.
  }
  EXPECT_EQ(contents(a), old_bytes);
  EXPECT_EQ(contents(b), old_bytes);
  EXPECT_EQ(entries(dir), (std::vector<std::string>{"a.npy", "b.npy"}));
  {
    AtomicFileGroup group;
    npy::write_to(group.add(a), new_t.view());
    npy::write_to(group.add(b), new_t.view());
    EXPECT_EQ(contents(a), old_bytes);  // nothing replaced before commit
    group.commit();
    EXPECT_THROW(group.commit(), Error);
  }
  EXPECT_EQ(npy::read(a, "a").shape(), (Shape{1}));
  EXPECT_EQ(npy::read(b, "b").shape(), (Shape{1}));
  EXPECT_EQ(entries(dir), (std::vector<std::string>{"a.npy", "b.npy"}));
  fs::remove_all(dir);
}

// An array with a zero extent is a valid file: it reads as an empty tensor of its shape (it was "read error in
// .npy data"); the library then refuses the shape naming the argument.
TEST(Npy, ZeroExtentArraysRead) {
  const auto path = (fs::temp_directory_path() / ("mlstm_npy_empty_" + std::to_string(getpid()) + ".npy")).string();
  npy::write(path, Tensor::zeros({1, 2, 0, 8}, DType::f32).view());
  const Tensor t = npy::read(path, "--q");
  EXPECT_EQ(t.shape(), (Shape{1, 2, 0, 8}));
  EXPECT_EQ(t.numel(), 0);
  fs::remove(path);
}

// read() checks the header and the file's size before allocating: a header promising 2^40 floats in a
// small file is refused as truncated (it used to be loaded whole into memory first, then copied).
TEST(Npy, ReadRefusesAHeaderPromisingMoreThanTheFile) {
  const auto path = (fs::temp_directory_path() / ("mlstm_npy_promise_" + std::to_string(getpid()) + ".npy")).string();
  {
    std::string img = header_image("{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776,), }");
    img.append(64, '\0');
    std::ofstream(path, std::ios::binary) << img;
  }
  EXPECT_NE(argument_of([&] { npy::read(path, "--k"); }).find("--k ('"), std::string::npos);
  EXPECT_NE(argument_of([&] { npy::read(path, "--k"); }).find("truncated"), std::string::npos);
  fs::remove(path);
  // Big-endian and unsupported dtypes are refused naming the argument.
  EXPECT_NE(argument_of([&] {
              npy::parse(
                  header_image("{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }") + std::string(4, '\0'),
                  "--v");
            }).find("big-endian"),
            std::string::npos);
  EXPECT_NE(argument_of([&] {
              npy::parse(
                  header_image("{'descr': '<i4', 'fortran_order': False, 'shape': (1,), }") + std::string(4, '\0'),
                  "--v");
            }).find("unsupported .npy dtype"),
            std::string::npos);
}

}  // namespace
}  // namespace mlstm
