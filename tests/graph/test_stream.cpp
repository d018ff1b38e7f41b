// Streaming sessions: random-sized pieces equal one call; snapshot/restore resumes bit-exactly; bad or
// damaged snapshots are refused.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <latch>
#include <mutex>
#include <random>
#include <thread>

#include "mlstm/core/atomic_file.hpp"
#include "mlstm/mlstm.hpp"
#include "test_util.hpp"

namespace mlstm {
namespace {

namespace fs = std::filesystem;
using testing::InputSpec;

Tensor cut(const Tensor& t, std::int64_t a, std::int64_t b) {
  if (t.dims() == 3) {
    return testing::slice_seq(t.reshaped({t.dim(0), t.dim(1), t.dim(2), 1}), a, b)
        .reshaped({t.dim(0), t.dim(1), b - a});
  }
  return testing::slice_seq(t, a, b);
}

ForwardInputs piece(const testing::Inputs& in, std::int64_t a, std::int64_t b) {
  ForwardInputs p;
  p.q = cut(in.q, a, b);
  p.k = cut(in.k, a, b);
  p.v = cut(in.v, a, b);
  p.i = cut(in.i, a, b);
  p.f = cut(in.f, a, b);
  return p;
}

StreamConfig config_for(const InputSpec& s, const std::string& kernel = "chunkwise--cpu_xl_chunk") {
  StreamConfig c;
  c.B = s.B;
  c.NH = s.NH;
  c.DHQK = s.DHQK;
  c.DHHV = s.DHHV;
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
  s.B = 2;
  s.NH = 3;
  s.S = 700;
  s.DHQK = 16;
  s.DHHV = 24;
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
  s.B = 1;
  s.NH = 2;
  s.S = 300;
  s.DHQK = 16;
  s.DHHV = 16;
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
    std::ofstream(path, std::ios::binary | std::ios::trunc)
        .write(content.data(), static_cast<std::streamsize>(content.size()));
    try {
      StreamSession::restore(path.string(), c);
      ADD_FAILURE() << "loaded a snapshot that should be refused: " << why;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("refused"), std::string::npos) << e.what();
      // A damaged file names the path; a field that differs names the field.
      EXPECT_EQ(e.argument(), why == "dimension mismatch" ? "DHHV" : "path") << e.what();
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
  EXPECT_EQ(testing::thrown_argument([&] { (void)StreamSession::restore(path.string(), cfg); }), "path");  // missing
  EXPECT_EQ(testing::thrown_argument([&] { (void)StreamSession::restore(fs::temp_directory_path().string(), cfg); }),
            "path");
}

// Snapshots are written atomically (write_file_atomically: temporary file, fsync, rename): a snapshot that
// cannot be written throws and leaves the previous one intact and no temporary file (issue 21 item 2).
TEST(StreamSnapshot, AFailedSnapshotLeavesThePreviousOne) {
  InputSpec s;
  s.B = 1;
  s.NH = 1;
  s.S = 64;
  s.DHQK = 8;
  s.DHHV = 8;
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  const fs::path dir = fs::temp_directory_path() / ("mlstm_snapshot_dir_" + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  StreamSession a(config_for(s));
  a.push(piece(in, 0, 32).args());
  const std::string path = (dir / "state.snap").string();
  a.snapshot(path);
  a.push(piece(in, 32, 64).args());
  // A path that cannot hold the file names the argument (Python: ValueError naming path).
  EXPECT_EQ(testing::thrown_argument([&] { a.snapshot((dir / "missing" / "state.snap").string()); }), "path");
  fs::create_directories(dir / "is_a_dir");
  EXPECT_EQ(testing::thrown_argument([&] { a.snapshot((dir / "is_a_dir").string()); }), "path");
  EXPECT_EQ(testing::thrown_argument([&] { a.snapshot(""); }), "path");
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
  cfg.B = 1;
  cfg.NH = 2;
  cfg.DHQK = 4;
  cfg.DHHV = 3;
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
  EXPECT_NE(refusal(patched(8, 3, 4)).find("unsupported version 3"), std::string::npos);
  EXPECT_NE(refusal(patched(8, 1, 4)).find("version 1 does not record"), std::string::npos);
  const std::size_t normalize_at = gate_at + 4, dtype_at = normalize_at + 4 + 4 + 8, kernel_len_at = dtype_at + 4;
  EXPECT_NE(refusal(patched(normalize_at, 2, 4)).find("unknown normalize code"), std::string::npos);
  EXPECT_NE(refusal(patched(dtype_at, 3, 4)).find("unknown state dtype"), std::string::npos);
  EXPECT_NE(refusal(patched(kernel_len_at, 1 << 20, 4)).find("kernel name length"), std::string::npos);
  EXPECT_NE(refusal(patched(12, 1 << 30, 8)).find("B: snapshot 'snap' refused: 1073741824 in the file, 1 in this"),
            std::string::npos);
  EXPECT_EQ(StreamSession::restore_bytes(patched(tokens_at, 77, 8), cfg).tokens(), 77);
  EXPECT_NE(refusal(bytes.substr(0, 30)).find("truncated"), std::string::npos);
  EXPECT_NE(refusal(std::string()).find("snap"), std::string::npos);
}

// Every option that changes results is recorded; a session that differs in one is refused with an
// InvalidArgument naming that field and both values (issue 21 item 7).
TEST(StreamSnapshot, AMismatchingOptionIsRefusedNamingTheField) {
  StreamConfig cfg;
  cfg.B = 1;
  cfg.NH = 2;
  cfg.DHQK = 4;
  cfg.DHHV = 3;
  cfg.options.chunk_size = 16;
  const fs::path path = fs::temp_directory_path() / ("mlstm_snapshot_options_" + std::to_string(getpid()));
  StreamSession(cfg).snapshot(path.string());
  EXPECT_EQ(StreamSession::restore(path.string(), cfg).tokens(), 0);
  auto refused_field = [&](const StreamConfig& c, const std::string& field, const std::string& in_file,
                           const std::string& in_session) {
    try {
      StreamSession::restore(path.string(), c);
      ADD_FAILURE() << "loaded a snapshot whose " << field << " differs";
    } catch (const InvalidArgument& e) {
      const std::string what = e.what();
      EXPECT_EQ(e.argument(), field) << what;
      EXPECT_NE(what.find(in_file + " in the file, " + in_session + " in this session"), std::string::npos) << what;
      EXPECT_NE(what.find(path.string()), std::string::npos) << what;
    }
  };
  StreamConfig c = cfg;
  c.options.eps = 1e-5;
  refused_field(c, "eps", "9.99999997e-07", "9.99999975e-06");
  // eps as the float32 the kernels use: a double that rounds to the same float is the same eps.
  c.options.eps = std::nextafter(1e-6, 1.0);
  EXPECT_EQ(StreamSession::restore(path.string(), c).tokens(), 0);
  c = cfg;
  c.options.chunk_size = 32;
  refused_field(c, "chunk_size", "16", "32");
  c = cfg;
  c.options.gate = GateVariant::sigmoid;
  refused_field(c, "gate", "exp", "sig");
  c = cfg;
  c.kernel = "chunkwise--cpu_limit_chunk";
  refused_field(c, "kernel", "'chunkwise--cpu_xl_chunk'", "'chunkwise--cpu_limit_chunk'");
  c = cfg;
  c.DHQK = 8;
  refused_field(c, "DHQK", "4", "8");
  c = cfg;
  c.NH = 1;
  refused_field(c, "NH", "2", "1");
  // normalize=false needs the sigmoid gate: a sigmoid snapshot with the normaliser vs a session without.
  StreamConfig sig = cfg;
  sig.options.gate = GateVariant::sigmoid;
  StreamSession(sig).snapshot(path.string());
  c = sig;
  c.options.normalize = false;
  refused_field(c, "normalize", "true", "false");
  fs::remove(path);
}

// An automatic chunk size (the default) is resolved once, when the first piece arrives, for the session's problem
// (the kernel's choice), and the snapshot records the size it took: a session restored with automatic options takes
// it, one restored with the same size too, one with another size is refused naming chunk_size. A snapshot taken
// before any piece records none and takes the restoring session's.
TEST(StreamSnapshot, AnAutomaticChunkSizeIsResolvedOnceAndRecorded) {
  InputSpec s;
  s.B = 1;
  s.NH = 2;
  s.S = 300;
  s.DHQK = 16;
  s.DHHV = 16;
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  StreamConfig cfg = config_for(s);
  cfg.options.chunk_size = kAutoChunk;
  StreamSession a(cfg);
  EXPECT_EQ(a.config().options.chunk_size, kAutoChunk);
  a.push(piece(in, 0, 123).args());
  const ProblemShape p = validate_forward(piece(in, 0, 123).args(), cfg.options);
  const std::int64_t L = get_kernel(cfg.kernel)->chunk_for(p, cfg.options);
  EXPECT_GE(L, 1);
  EXPECT_EQ(a.config().options.chunk_size, L);
  const fs::path path = fs::temp_directory_path() / ("mlstm_snapshot_auto_" + std::to_string(getpid()));
  a.snapshot(path.string());
  const Tensor h_a = a.push(piece(in, 123, 300).args());
  for (std::int64_t given : {kAutoChunk, L}) {
    StreamConfig c = cfg;
    c.options.chunk_size = given;
    StreamSession b = StreamSession::restore(path.string(), c);
    EXPECT_EQ(b.config().options.chunk_size, L);
    EXPECT_TRUE(bit_equal(h_a, b.push(piece(in, 123, 300).args()))) << given;
  }
  StreamConfig other = cfg;
  other.options.chunk_size = L + 1;
  try {
    StreamSession::restore(path.string(), other);
    ADD_FAILURE() << "restored a snapshot of chunk " << L << " into a session of chunk " << L + 1;
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "chunk_size") << e.what();
  }
  StreamSession(cfg).snapshot(path.string());  // no piece yet: no size recorded
  other.options.chunk_size = 8;
  EXPECT_EQ(StreamSession::restore(path.string(), other).config().options.chunk_size, 8);
  EXPECT_EQ(StreamSession::restore(path.string(), cfg).config().options.chunk_size, kAutoChunk);
  fs::remove(path);
}

// The sigmoid gate has no stabiliser: an initial state with m != 0 is refused, naming m, when the session starts
// and when a sequence starts.
TEST(StreamSession, SigmoidInitialStatesWithANonzeroStabiliserAreRefused) {
  StreamConfig cfg;
  cfg.B = 1;
  cfg.NH = 2;
  cfg.DHQK = 4;
  cfg.DHHV = 4;
  cfg.options.gate = GateVariant::sigmoid;
  State bad = State::zeros(1, 2, 4, 4);
  bad.m.data<float>()[1] = 0.5f;
  auto refused = [](auto&& call) {
    try {
      call();
      ADD_FAILURE() << "a sigmoid state with m != 0 was taken";
    } catch (const InvalidArgument& e) {
      EXPECT_EQ(e.argument(), "m") << e.what();
    }
  };
  refused([&] { StreamSession session(cfg, bad); });
  StreamSession session(cfg, State::zeros(1, 2, 4, 4));
  refused([&] { session.start_sequence(bad); });
  EXPECT_NO_THROW(session.start_sequence(State::zeros(1, 2, 4, 4)));
  cfg.options.gate = GateVariant::exp;
  EXPECT_NO_THROW(StreamSession(cfg, bad));  // the exp gate's m is its stabiliser
}

namespace {

std::vector<std::string> dir_entries(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

std::string file_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace

// Temporary files a killed snapshot left (".<name>.tmp.XXXXXX") are removed on the next restore() or
// snapshot() of the same path; files that only look similar are left alone.
TEST(StreamSnapshot, StaleTemporariesOfThePathAreRemovedOnTheNextStart) {
  StreamConfig cfg;
  cfg.B = 1;
  cfg.NH = 2;
  cfg.DHQK = 4;
  cfg.DHHV = 3;
  const fs::path dir = fs::temp_directory_path() / ("mlstm_snapshot_debris_" + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string path = (dir / "state.snap").string();
  StreamSession(cfg).snapshot(path);
  // Names with the pid of a process that is gone (a child that exited) are removed.
  const pid_t gone = fork();
  if (gone == 0) _exit(0);
  ASSERT_GT(gone, 0);
  waitpid(gone, nullptr, 0);
  const std::string gone_pid = std::to_string(gone);
  const std::vector<std::string> ours = {".state.snap.tmp." + gone_pid + ".Ab3xYz",
                                         ".state.snap.tmp." + gone_pid + ".000000"};
  // Older names without a pid are named like temporaries (the CLI refuses them as its files) but may be a user's
  // own file: never removed. Nor is a dead writer's name that is a second link to some file.
  const std::vector<std::string> legacy = {".state.snap.tmp.Ab3xYz", ".state.snap.tmp.000000"};
  const std::string linked = ".state.snap.tmp." + gone_pid + ".Lnk123";
  const std::vector<std::string> not_ours = {".state.snap.tmp.Ab3xY",       // five characters
                                             ".state.snap.tmp.Ab3xYz1",     // seven
                                             ".state.snap.tmp.Ab-xYz",      // not a letter or digit
                                             ".state.snap.tmp..Ab3xYz",     // an empty pid
                                             ".state.snap.tmp.12a.Ab3xYz",  // not a pid
                                             "state.snap.tmp.Ab3xYz",       // not hidden
                                             ".other.snap.tmp.Ab3xYz",      // another target's
                                             ".state.snapx.tmp.Ab3xYz",     // another target's
                                             "notes.txt"};
  auto make = [&](const std::vector<std::string>& names) {
    for (const auto& n : names) std::ofstream(dir / n) << "debris";
  };
  auto expected = not_ours;
  expected.push_back("state.snap");
  expected.insert(expected.end(), legacy.begin(), legacy.end());
  expected.push_back(linked);
  expected.push_back("notes_link.txt");
  std::sort(expected.begin(), expected.end());
  for (const auto& n : ours) EXPECT_TRUE(is_atomic_temporary_of(path, n)) << n;
  for (const auto& n : legacy) EXPECT_TRUE(is_atomic_temporary_of(path, n)) << n;
  EXPECT_TRUE(is_atomic_temporary_of(path, linked));
  for (const auto& n : not_ours) EXPECT_FALSE(is_atomic_temporary_of(path, n)) << n;
  make(ours);
  make(legacy);
  make(not_ours);
  make({linked});
  fs::create_hard_link(dir / linked, dir / "notes_link.txt");
  fs::create_directories(dir / ".state.snap.tmp.dir123");  // our pattern, but a directory: left alone
  expected.insert(std::upper_bound(expected.begin(), expected.end(), ".state.snap.tmp.dir123"),
                  ".state.snap.tmp.dir123");
  // A live writer's temporary file (this process's pid): ours, and left alone.
  const std::string live = ".state.snap.tmp." + std::to_string(getpid()) + ".Zz9zZz";
  EXPECT_TRUE(is_atomic_temporary_of(path, live));
  make({live});
  expected.insert(std::upper_bound(expected.begin(), expected.end(), live), live);
  EXPECT_EQ(StreamSession::restore(path, cfg).tokens(), 0);  // a restart: restore cleans up
  EXPECT_EQ(dir_entries(dir), expected);
  make(ours);
  StreamSession(cfg).snapshot(path);  // so does the next snapshot
  EXPECT_EQ(dir_entries(dir), expected);
  fs::remove_all(dir);
}

// A process killed (SIGKILL) while it writes snapshots leaves the previous snapshot whole (or a complete
// newer one) and, at worst, a temporary file, which the next start removes.
TEST(StreamSnapshot, AKilledWriterLeavesTheOldSnapshotAndTheNextStartCleansUp) {
  StreamConfig cfg;
  cfg.B = 1;
  cfg.NH = 8;
  cfg.DHQK = 256;
  cfg.DHHV = 256;  // C alone is 2 MiB: a write takes a while
  const fs::path dir = fs::temp_directory_path() / ("mlstm_snapshot_kill_" + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string path = (dir / "state.snap").string();
  StreamSession a(cfg);
  a.snapshot(path);
  const std::string good = file_bytes(path);
  auto debris = [&] {
    int n = 0;
    for (const auto& name : dir_entries(dir)) n += is_atomic_temporary_of(path, name);
    return n;
  };
  bool left_debris = false;
  for (int attempt = 0; attempt < 40 && !left_debris; ++attempt) {
    const pid_t child = fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      for (;;) {
        try {
          a.snapshot(path);
        } catch (...) {
          _exit(3);
        }
      }
    }
    // Wait until the child is inside a write (its temporary file exists), then kill it there.
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (debris() == 0 && std::chrono::steady_clock::now() < give_up) std::this_thread::yield();
    if (attempt % 2) std::this_thread::sleep_for(std::chrono::microseconds(200 * attempt));
    kill(child, SIGKILL);
    int status = 0;
    ASSERT_EQ(waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << "writer ended with status " << status;
    EXPECT_EQ(file_bytes(path), good) << "the snapshot is not whole after a kill (attempt " << attempt << ")";
    left_debris = debris() > 0;
  }
  EXPECT_TRUE(left_debris) << "no kill landed inside a write in 40 attempts";
  StreamSession b = StreamSession::restore(path, cfg);  // the next start
  EXPECT_TRUE(bit_equal(a.state().C, b.state().C));
  EXPECT_EQ(debris(), 0);
  EXPECT_EQ(dir_entries(dir), std::vector<std::string>{"state.snap"});
  fs::remove_all(dir);
}

// A full disk (the file size limit, RLIMIT_FSIZE, as a stand-in): the snapshot throws, naming the path;
// the previous snapshot stays whole and no temporary file is left.
TEST(StreamSnapshot, AFullDiskLeavesThePreviousSnapshotAndNoDebris) {
  StreamConfig cfg;
  cfg.B = 1;
  cfg.NH = 2;
  cfg.DHQK = 64;
  cfg.DHHV = 64;  // 32 KiB of C
  InputSpec s;
  s.B = 1;
  s.NH = 2;
  s.S = 40;
  s.DHQK = 64;
  s.DHHV = 64;
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  const fs::path dir = fs::temp_directory_path() / ("mlstm_snapshot_full_" + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string path = (dir / "state.snap").string();
  StreamSession a(cfg);
  a.push(piece(in, 0, 20).args());
  a.snapshot(path);
  const std::string good = file_bytes(path);
  a.push(piece(in, 20, 40).args());
  std::string message;
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
    try {
      a.snapshot(path);
    } catch (const Error& e) {
      message = e.what();
    }
    setrlimit(RLIMIT_FSIZE, &old_limit);
    sigaction(SIGXFSZ, &previous, nullptr);
  }
  EXPECT_NE(message.find("snapshot"), std::string::npos) << message;
  EXPECT_NE(message.find("state.snap"), std::string::npos) << message;
  EXPECT_EQ(file_bytes(path), good);
  EXPECT_EQ(dir_entries(dir), std::vector<std::string>{"state.snap"});
  EXPECT_EQ(StreamSession::restore(path, cfg).tokens(), 20);
  fs::remove_all(dir);
}

TEST(StreamSession, BadConfigAndPiecesNameTheArgument) {
  StreamConfig c;
  c.B = 1;
  c.NH = 1;
  c.DHQK = 8;
  c.DHHV = 0;
  try {
    StreamSession s(c);
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "DHHV");
  }
  c.DHHV = 8;
  StreamSession s(c);
  InputSpec spec;
  spec.B = 1;
  spec.NH = 1;
  spec.S = 10;
  spec.DHQK = 4;
  spec.DHHV = 8;
  const auto in = testing::make_inputs(spec, testing::fresh_seed());
  try {
    s.push(in.args());
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "q");
  }
}

// A session through the flow graph (several devices, segments cut inside every piece) equals the kernel
// session; its snapshot records "flow-graph" and resumes on other devices; the backward of a piece equals one
// backward call from the state it started in.
TEST(StreamSession, ThroughTheFlowGraphEqualsOneKernel) {
  InputSpec s;
  s.B = 1;
  s.NH = 2;
  s.S = 600;
  s.DHQK = 16;
  s.DHHV = 24;
  const auto seed = testing::fresh_seed();
  const auto in = testing::make_inputs(s, seed);
  StreamConfig graph_cfg = config_for(s);
  graph_cfg.devices = "workers+all";
  StreamSession kernel_stream(config_for(s)), graph_stream(graph_cfg);
  ASSERT_NE(graph_stream.runner(), nullptr);
  EXPECT_EQ(kernel_stream.runner(), nullptr);
  EXPECT_GE(graph_stream.runner()->devices().size(), 2u);
  std::mt19937_64 rng(seed);
  std::int64_t t = 0;
  for (; t < 400;) {
    const std::int64_t len = 50 + static_cast<std::int64_t>(rng() % 150);
    const auto p = piece(in, t, std::min(s.S, t + len));
    EXPECT_TRUE(testing::matches(graph_stream.push(p.args()), kernel_stream.push(p.args()), 5e-5, "graph stream",
                                 "h of the piece at " + std::to_string(t), s));
    t = std::min(s.S, t + len);
  }
  EXPECT_TRUE(testing::matches(graph_stream.state().C, kernel_stream.state().C, 5e-5, "graph stream", "C", s));

  const fs::path dir = fs::temp_directory_path() / ("mlstm_graph_stream_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string snap = (dir / "s.mlstm").string();
  graph_stream.snapshot(snap);
  try {
    StreamSession::restore(snap, config_for(s));
    ADD_FAILURE() << "a flow-graph snapshot was restored into a kernel session";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "kernel");
  }
  StreamConfig workers_only = graph_cfg;
  workers_only.devices = "workers";  // a device fewer after a restart: the stream resumes
  StreamSession resumed = StreamSession::restore(snap, workers_only);
  EXPECT_EQ(resumed.tokens(), t);
  fs::remove_all(dir);

  const auto rest = piece(in, t, s.S);
  const Tensor h = resumed.push(rest.args());
  BackwardArgs b;
  b.inputs = rest.args();
  b.inputs.c0 = graph_stream.state().C.view();
  b.inputs.n0 = graph_stream.state().n.view();
  b.inputs.m0 = graph_stream.state().m.view();
  b.dh = h.view();
  const auto want = get_kernel("chunkwise--cpu_xl_chunk")->backward(b, graph_cfg.options);
  const BackwardResult got = resumed.backward_of_last_piece(rest.args(), h.view());
  EXPECT_TRUE(testing::matches(got.dq, want.dq, 1e-4, "graph stream", "dq of the last piece", s));
  EXPECT_TRUE(testing::matches(got.df, want.df, 1e-4, "graph stream", "df of the last piece", s));
  EXPECT_TRUE(testing::matches(got.dc0, want.dc0, 1e-4, "graph stream", "dc0 of the last piece", s));

  StreamConfig both = graph_cfg;
  both.kernel = "chunkwise--opencl_xl_chunk";
  try {
    StreamSession bad(both);
    ADD_FAILURE() << "a session took both a kernel and devices";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "devices");
  }
  StreamSession fresh(config_for(s));
  try {
    fresh.backward_of_last_piece(rest.args(), h.view());
    ADD_FAILURE() << "a backward before any push";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "piece");
  }
}

// `t` (B,NH,S[,D]) n times one after the other along the sequence.
Tensor repeated(const Tensor& t, int n) {
  const bool gate = t.dims() == 3;
  const Tensor t4 = gate ? t.reshaped({t.dim(0), t.dim(1), t.dim(2), 1}) : t;
  Tensor all = t4;
  for (int j = 1; j < n; ++j) all = testing::concat_seq(all, t4);
  return gate ? all.reshaped({t.dim(0), t.dim(1), t.dim(2) * n}) : all;
}

// Several threads pushing, submitting and taking on one session (probe 40: "corrupted size vs. prev_size", SIGSEGV):
// every piece is the same, so whatever order the threads' calls take, the session streams one sequence of that
// piece repeated; each h returned must be one of that sequence's pieces (each once), the token count and the state
// those of one call over it. The forget gate is ~1, so no two pieces' h agree and a lost piece shows in the state.
TEST(StreamSession, SeveralThreadsShareOneSession) {
  const InputSpec s = testing::spec(1, 2, 32, 16, 8);
  testing::Inputs in = testing::make_inputs(s, testing::fresh_seed());
  in.f = Tensor::full({1, 2, 32}, DType::f32, 8.0);
  constexpr int kThreads = 4, kSteps = 8, kPieces = kThreads * kSteps;
  ForwardInputs whole_in;
  whole_in.q = repeated(in.q, kPieces);
  whole_in.k = repeated(in.k, kPieces);
  whole_in.v = repeated(in.v, kPieces);
  whole_in.i = repeated(in.i, kPieces);
  whole_in.f = repeated(in.f, kPieces);
  const ForwardInputs one = piece(in, 0, s.S);
  for (const std::string devices : {"", "workers"}) {
    SCOPED_TRACE("devices '" + devices + "'");
    StreamConfig cfg = config_for(s);
    cfg.devices = devices;
    MlstmOptions o = cfg.options;
    o.return_last_states = true;
    const ForwardResult whole = get_kernel("chunkwise--cpu_xl_chunk")->forward(whole_in.args(), o);
    StreamSession session(cfg);
    std::mutex got_mutex;
    std::vector<Tensor> got;
    std::vector<std::string> errors;
    std::vector<std::thread> threads;
    std::latch start(kThreads);  // the threads' calls begin together
    for (int j = 0; j < kThreads; ++j)
      threads.emplace_back([&, j] {
        start.arrive_and_wait();
        for (int z = 0; z < kSteps; ++z) {
          try {
            Tensor h = (j + z) % 2 ? session.push(one.args()) : session.take(session.submit(one.args()));
            (void)session.tokens();
            std::lock_guard lock(got_mutex);
            got.push_back(std::move(h));
          } catch (const std::exception& e) {
            std::lock_guard lock(got_mutex);
            errors.push_back(e.what());
          }
        }
      });
    for (auto& t : threads) t.join();
    EXPECT_TRUE(errors.empty()) << errors.front();
    EXPECT_EQ(session.tokens(), kPieces * s.S);
    ASSERT_EQ(got.size(), static_cast<std::size_t>(kPieces));
    std::vector<int> used(kPieces, 0);
    for (const Tensor& h : got) {
      int best = 0;
      double best_rel = 1e30;
      for (int k = 0; k < kPieces; ++k) {
        const double rel = testing::compare(h, testing::slice_seq(whole.h, k * s.S, (k + 1) * s.S)).rel;
        if (rel < best_rel) best_rel = rel, best = k;
      }
      // (Pieces of a growing state differ from one call by up to ~1e-4; neighbouring pieces' h by percents.)
      EXPECT_LT(best_rel, 1e-3) << "an h that is no piece of the sequence";
      ++used[best];
    }
    EXPECT_EQ(used, std::vector<int>(kPieces, 1)) << "pieces lost or doubled";
    EXPECT_TRUE(testing::matches(session.state().C, whole.c, 2e-4, "threads", "C", s));
    EXPECT_TRUE(testing::matches(session.state_handle()->n, whole.n, 2e-4, "threads", "n", s));
  }
}

// A moved-from session refuses every call by name (probe 40: push segfaulted in with_state); assigning a new session
// to it makes it usable again.
TEST(StreamSession, AMovedFromSessionRefusesEveryCall) {
  const InputSpec s = testing::spec(1, 2, 10, 16, 8);
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  const ForwardInputs p = piece(in, 0, 5);
  StreamSession a(config_for(s));
  a.push(p.args());
  StreamSession b(std::move(a));
  auto refused = [&](const char* what, const std::function<void()>& call) {
    try {
      call();
      ADD_FAILURE() << what << " on a moved-from session";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("moved from"), std::string::npos) << what << ": " << e.what();
    }
  };
  refused("push", [&] { a.push(p.args()); });
  refused("submit", [&] { a.submit(p.args()); });
  refused("take", [&] { a.take(0); });
  Tensor out({1, 2, 5, 8}, DType::f32);
  refused("take_into", [&] { a.take_into(0, out.view()); });
  refused("take_state", [&] { a.take_state(0); });
  refused("prepare", [&] { a.prepare(5, DType::f32); });
  refused("backward_of_last_piece", [&] { a.backward_of_last_piece(p.args(), out.view()); });
  refused("start_sequence", [&] { a.start_sequence(); });
  refused("state", [&] { (void)a.state(); });
  refused("state_handle", [&] { (void)a.state_handle(); });
  refused("config", [&] { (void)a.config(); });
  refused("snapshot_bytes", [&] { (void)a.snapshot_bytes(); });
  refused("snapshot", [&] { a.snapshot((fs::temp_directory_path() / "mlstm_moved_from.snap").string()); });
  EXPECT_EQ(a.runner(), nullptr);
  EXPECT_EQ(b.tokens(), 5);
  EXPECT_EQ(b.push(piece(in, 5, 10).args()).shape(), (Shape{1, 2, 5, 8}));
  a = StreamSession(config_for(s));
  EXPECT_EQ(a.push(p.args()).shape(), (Shape{1, 2, 5, 8}));
  EXPECT_EQ(a.tokens(), 5);
}

// backward_of_last_piece takes the piece pushed last only (probe 40: another piece of other tokens was
// differentiated from the wrong state): another token count, other memory or refilled contents are refused naming
// "piece".
TEST(StreamSession, BackwardOfLastPieceRefusesAnotherPiece) {
  const InputSpec s = testing::spec(1, 2, 20, 16, 8);
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  StreamSession stream(config_for(s));
  ForwardInputs last = piece(in, 0, 6);
  const Tensor h = stream.push(last.args());
  auto refused = [&](const char* what, const ForwardArgs& a, ConstTensorView dh) {
    try {
      (void)stream.backward_of_last_piece(a, dh);
      ADD_FAILURE() << what << " was taken for the last piece";
    } catch (const InvalidArgument& e) {
      EXPECT_EQ(e.argument(), "piece") << what << ": " << e.what();
    }
  };
  const Tensor dh7 = Tensor::full({1, 2, 7, 8}, DType::f32, 1.0);
  refused("a piece of 7 tokens", piece(in, 10, 17).args(), dh7.view());
  const ForwardInputs other = piece(in, 10, 16);  // as many tokens, other memory
  refused("another piece of 6 tokens", other.args(), h.view());
  ForwardInputs copy = piece(in, 0, 6);  // the same values elsewhere: not the memory pushed
  refused("a copy of the piece", copy.args(), h.view());
  const BackwardResult g = stream.backward_of_last_piece(last.args(), h.view());
  EXPECT_EQ(g.dq.shape(), (Shape{1, 2, 6, 16}));
  std::memset(last.v.bytes(), 0, last.v.nbytes());  // refilled in place: the memory pushed, other contents
  refused("a piece refilled in place", last.args(), h.view());
}

// A piece whose dimensions differ from the stream's names the input that differs, expected against got (probe 40:
// v of 13 columns was blamed on q); a piece of no tokens names q and says a piece needs one (it named
// "piece_tokens").
TEST(StreamSession, ABadPieceNamesTheInputThatDiffers) {
  const InputSpec s = testing::spec(1, 2, 10, 20, 12);
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  for (const std::string devices : {"", "workers"}) {
    SCOPED_TRACE("devices '" + devices + "'");
    StreamConfig cfg = config_for(s);
    cfg.devices = devices;
    StreamSession stream(cfg);
    stream.push(piece(in, 0, 4).args());
    ForwardInputs wide = piece(in, 4, 10);
    wide.v = Tensor::full({1, 2, 6, 13}, DType::f32, 0.25);
    try {
      stream.push(wide.args());
      ADD_FAILURE() << "a piece of DHHV 13 was taken by a stream of 12";
    } catch (const InvalidArgument& e) {
      const std::string m = e.what();
      EXPECT_EQ(e.argument(), "v") << m;
      EXPECT_NE(m.find("(1,2,6,12)"), std::string::npos) << m;
      EXPECT_NE(m.find("got (1,2,6,13)"), std::string::npos) << m;
    }
    try {
      stream.push(piece(in, 4, 4).args());
      ADD_FAILURE() << "a piece of no tokens was taken";
    } catch (const InvalidArgument& e) {
      EXPECT_EQ(e.argument(), "q") << e.what();
      EXPECT_NE(std::string(e.what()).find("at least one token"), std::string::npos) << e.what();
    }
    EXPECT_EQ(stream.tokens(), 4);
    const Tensor h = stream.push(piece(in, 4, 10).args());  // the stream goes on
    EXPECT_EQ(h.shape(), (Shape{1, 2, 6, 12}));
  }
  graph::FlowGraphRunner runner("workers");
  ProblemShape empty;
  empty.B = 1;
  empty.NH = 2;
  empty.S = 0;
  empty.DHQK = 20;
  empty.DHHV = 12;
  try {
    (void)runner.open_stream(empty, MlstmOptions{});
    ADD_FAILURE() << "a stream of pieces of no tokens was opened";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "q") << e.what();
    EXPECT_NE(std::string(e.what()).find("at least one token"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace mlstm
