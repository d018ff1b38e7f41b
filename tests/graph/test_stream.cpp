// Streaming sessions: random-sized pieces equal one call; snapshot/restore resumes bit-exactly; bad or
// damaged snapshots are refused.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "mlstm/mlstm.hpp"
#include "test_util.hpp"

namespace mlstm {
namespace {

namespace fs = std::filesystem;
using testing::InputSpec;

Tensor cut(const Tensor& t, std::int64_t a, std::int64_t b) {
  if (t.dims() == 3) {
    return testing::slice_seq(t.reshaped({t.dim(0), t.dim(1), t.dim(2), 1}), a, b).reshaped({t.dim(0), t.dim(1), b - a});
  }
  return testing::slice_seq(t, a, b);
}

struct Piece {
  Tensor q, k, v, i, f;
  ForwardArgs args() const {
    ForwardArgs a;
    a.q = q.view(); a.k = k.view(); a.v = v.view(); a.i = i.view(); a.f = f.view();
    return a;
  }
};

Piece piece(const testing::Inputs& in, std::int64_t a, std::int64_t b) {
  return {cut(in.q, a, b), cut(in.k, a, b), cut(in.v, a, b), cut(in.i, a, b), cut(in.f, a, b)};
}

StreamConfig config_for(const InputSpec& s, const std::string& kernel = "chunkwise--cpu_xl_chunk") {
  StreamConfig c;
  c.B = s.B; c.NH = s.NH; c.DHQK = s.DHQK; c.DHHV = s.DHHV;
  c.options.gate = s.gate;
  c.options.chunk_size = 32;
  c.kernel = kernel;
  return c;
}

bool bit_equal(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.bytes(), b.bytes(), a.nbytes()) == 0;
}

class Stream : public ::testing::TestWithParam<std::string> {};

TEST_P(Stream, RandomSizedPiecesEqualOneCall) {
  InputSpec s;
  s.B = 2; s.NH = 3; s.S = 700; s.DHQK = 16; s.DHHV = 24;
  const auto seed = testing::fresh_seed();
  const auto in = testing::make_inputs(s, seed);
  const auto cfg = config_for(s, GetParam());
  MlstmOptions o = cfg.options;
  const auto whole = get_kernel(GetParam(), cfg.target)->forward(in.args(), o);
  StreamSession stream(cfg);
  std::mt19937_64 rng(seed);
  std::vector<Tensor> hs;
  for (std::int64_t t = 0; t < s.S;) {
    const std::int64_t len = std::min<std::int64_t>(s.S - t, 1 + static_cast<std::int64_t>(rng() % 97));
    hs.push_back(stream.push(piece(in, t, t + len).args()));
    t += len;
  }
  Tensor h = hs[0];
  for (std::size_t p = 1; p < hs.size(); ++p) h = testing::concat_seq(h, hs[p]);
  EXPECT_EQ(stream.tokens(), s.S);
  EXPECT_TRUE(testing::matches(h, whole.h, 5e-5, "stream " + GetParam(), "h (pieces vs one call)", s));
  EXPECT_TRUE(testing::matches(stream.state().C, whole.c, 5e-5, "stream " + GetParam(), "C", s));
  EXPECT_TRUE(testing::matches(stream.state().m, whole.m, 1e-6, "stream " + GetParam(), "m", s));
}

INSTANTIATE_TEST_SUITE_P(Kernels, Stream, ::testing::Values("chunkwise--cpu_xl_chunk", "chunkwise--opencl_xl_chunk"),
                         [](const auto& info) { return info.param.substr(info.param.find("--") + 2); });

TEST(StreamSnapshot, RestoreResumesBitExactly) {
  InputSpec s;
  s.B = 1; s.NH = 2; s.S = 300; s.DHQK = 16; s.DHHV = 16;
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  const auto cfg = config_for(s);
  const fs::path path = fs::temp_directory_path() / ("mlstm_snapshot_" + std::to_string(getpid()));
  StreamSession a(cfg);
  a.push(piece(in, 0, 123).args());
  a.snapshot(path.string());
  const Tensor h_a = a.push(piece(in, 123, 300).args());
  StreamSession b = StreamSession::restore(path.string(), cfg);
  EXPECT_EQ(b.tokens(), 123);
  const Tensor h_b = b.push(piece(in, 123, 300).args());
  EXPECT_TRUE(bit_equal(h_a, h_b));
  EXPECT_TRUE(bit_equal(a.state().C, b.state().C));
  EXPECT_TRUE(bit_equal(a.state().m, b.state().m));

  // Damaged files are refused, never loaded.
  std::string bytes;
  {
    std::ifstream f(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(f), {});
  }
  auto refused = [&](const std::string& content, const StreamConfig& c, const std::string& why) {
    std::ofstream(path, std::ios::binary | std::ios::trunc).write(content.data(), static_cast<std::streamsize>(content.size()));
    try {
      StreamSession::restore(path.string(), c);
      ADD_FAILURE() << "loaded a snapshot that should be refused: " << why;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("refused"), std::string::npos) << e.what();
    }
  };
  refused(bytes.substr(0, bytes.size() / 2), cfg, "truncated");
  std::string flipped = bytes;
  flipped[flipped.size() / 2] ^= 0x10;
  refused(flipped, cfg, "one bit flipped");
  refused("not a snapshot at all, just some text that is long enough to pass the size check......", cfg, "bad magic");
  StreamConfig other = cfg;
  other.DHHV = 8;
  refused(bytes, other, "dimension mismatch");
  fs::remove(path);
  EXPECT_THROW(StreamSession::restore(path.string(), cfg), Error);  // missing file
}

// Snapshots are written atomically (write_file_atomically: temporary file, fsync, rename): a snapshot that
// cannot be written throws and leaves the previous one intact and no temporary file (issue 21 item 2).
TEST(StreamSnapshot, AFailedSnapshotLeavesThePreviousOne) {
  InputSpec s;
  s.B = 1; s.NH = 1; s.S = 64; s.DHQK = 8; s.DHHV = 8;
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  const fs::path dir = fs::temp_directory_path() / ("mlstm_snapshot_dir_" + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  StreamSession a(config_for(s));
  a.push(piece(in, 0, 32).args());
  const std::string path = (dir / "state.snap").string();
  a.snapshot(path);
  a.push(piece(in, 32, 64).args());
  EXPECT_THROW(a.snapshot((dir / "missing" / "state.snap").string()), Error);
  fs::create_directories(dir / "is_a_dir");
  EXPECT_THROW(a.snapshot((dir / "is_a_dir").string()), Error);
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"is_a_dir", "state.snap"}));
  EXPECT_EQ(StreamSession::restore(path, config_for(s)).tokens(), 32);  // the earlier snapshot, whole
  fs::remove_all(dir);
}

// Images that pass the checksum but carry fields no snapshot() writes (the fuzz target's checksum-fixing
// mode reaches these): refused by StreamSession::restore_bytes, and a valid image restores from memory.
TEST(StreamSnapshot, RestoreFromBytesChecksFieldsBehindTheChecksum) {
  StreamConfig cfg;
  cfg.B = 1; cfg.NH = 2; cfg.DHQK = 4; cfg.DHHV = 3;
  const fs::path path = fs::temp_directory_path() / ("mlstm_snapshot_fields_" + std::to_string(getpid()));
  StreamSession a(cfg);
  a.snapshot(path.string());
  std::string bytes;
  {
    std::ifstream f(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(f), {});
  }
  fs::remove(path);
  EXPECT_EQ(StreamSession::restore_bytes(bytes, cfg).tokens(), 0);
  auto fnv1a = [](const std::string& b) {
    std::uint64_t h = 1469598103934665603ull;
    for (unsigned char c : b) {
      h ^= c;
      h *= 1099511628211ull;
    }
    return h;
  };
  // Overwrites `size` bytes at `at` with `value` and re-seals the image with a valid checksum.
  auto patched = [&](std::size_t at, std::int64_t value, std::size_t size) {
    std::string b = bytes.substr(0, bytes.size() - 8);
    std::memcpy(b.data() + at, &value, size);
    const std::uint64_t sum = fnv1a(b);
    b.append(reinterpret_cast<const char*>(&sum), 8);
    return b;
  };
  auto refusal = [&](const std::string& image) {
    try {
      StreamSession::restore_bytes(image, cfg, "snap");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("<loaded>");
  };
  const std::size_t tokens_at = 8 + 4 + 4 * 8, gate_at = tokens_at + 8;
  EXPECT_NE(refusal(patched(tokens_at, -5, 8)).find("negative token count"), std::string::npos);
  EXPECT_NE(refusal(patched(gate_at, 7, 4)).find("unknown input gate"), std::string::npos);
  EXPECT_NE(refusal(patched(8, 2, 4)).find("unsupported version"), std::string::npos);
  EXPECT_NE(refusal(patched(12, 1 << 30, 8)).find("dimensions"), std::string::npos);
  EXPECT_EQ(StreamSession::restore_bytes(patched(tokens_at, 77, 8), cfg).tokens(), 77);
  EXPECT_NE(refusal(bytes.substr(0, 30)).find("truncated"), std::string::npos);
  EXPECT_NE(refusal(std::string()).find("snap"), std::string::npos);
}

TEST(StreamSession, BadConfigAndPiecesNameTheArgument) {
  StreamConfig c;
  c.B = 1; c.NH = 1; c.DHQK = 8; c.DHHV = 0;
  try {
    StreamSession s(c);
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "DHHV");
  }
  c.DHHV = 8;
  StreamSession s(c);
  InputSpec spec;
  spec.B = 1; spec.NH = 1; spec.S = 10; spec.DHQK = 4; spec.DHHV = 8;
  const auto in = testing::make_inputs(spec, testing::fresh_seed());
  try {
    s.push(in.args());
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "q");
  }
}

}  // namespace
}  // namespace mlstm
