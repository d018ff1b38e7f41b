// mlstm forward --stream-tokens: .npy files streamed in sequence slices (issue 14 item 2). Streaming equals one
// call (and, slice for slice, an in-process StreamSession bit for bit); a file larger than the child's
// address-space limit streams with flat memory; a run killed mid-way (SIGKILL, by the test hook
// MLSTM_TEST_KILL_AFTER_SLICES) and resumed writes the same h.npy byte for byte; bad resumes and failed writes
// exit with one line naming the option.
#include <gtest/gtest.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "mlstm/core/npy.hpp"
#include "mlstm/mlstm.hpp"
#include "test_util.hpp"

namespace mlstm {
namespace {

namespace fs = std::filesystem;

using Run = testing::CommandRun;
using testing::expect_refused;
using testing::slurp;

// The CLI in a child process: `setup` runs in the child before exec (limits, affinity, environment).
Run run_cli(const fs::path& dir, const std::string& args, const std::function<void()>& setup = {}) {
  return testing::run_command(dir, "exec " + std::string(MLSTM_CLI_PATH) + " " + args, setup);
}

class CliStream : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = testing::fresh_test_dir("mlstm_cli_stream_"); }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / (name + ".npy")).string(); }
  void save_inputs(const testing::Inputs& in) {
    npy::write(path("q"), in.q.view());
    npy::write(path("k"), in.k.view());
    npy::write(path("v"), in.v.view());
    npy::write(path("i"), in.i.view());
    npy::write(path("f"), in.f.view());
    if (!in.c0.empty()) {
      npy::write(path("c0"), in.c0.view());
      npy::write(path("n0"), in.n0.view());
      npy::write(path("m0"), in.m0.view());
    }
  }
  std::string inputs(bool state = false) const {
    std::string s =
        "--q " + path("q") + " --k " + path("k") + " --v " + path("v") + " --i " + path("i") + " --f " + path("f");
    if (state) s += " --c0 " + path("c0") + " --n0 " + path("n0") + " --m0 " + path("m0");
    return s;
  }
  fs::path dir_;
};

// h of an in-process StreamSession fed the same slices (the CLI's --stream-tokens without a --devices): the first
// `first` tokens long (0: `slice`), the others `slice`.
ForwardResult stream_in_process(const testing::Inputs& in, std::int64_t slice, const MlstmOptions& o,
                                std::int64_t first = 0) {
  StreamConfig cfg;
  cfg.B = in.q.dim(0);
  cfg.NH = in.q.dim(1);
  cfg.DHQK = in.q.dim(3);
  cfg.DHHV = in.v.dim(3);
  cfg.options = o;
  StreamSession s = in.c0.empty() ? StreamSession(cfg) : StreamSession(cfg, State{in.c0, in.n0, in.m0});
  const std::int64_t S = in.q.dim(2);
  Tensor h;
  for (std::int64_t t0 = 0; t0 < S;) {
    const std::int64_t t1 = std::min(S, t0 + (t0 == 0 && first > 0 ? first : slice));
    testing::Inputs piece;
    piece.q = testing::slice_seq(in.q, t0, t1);
    piece.k = testing::slice_seq(in.k, t0, t1);
    piece.v = testing::slice_seq(in.v, t0, t1);
    piece.i = testing::slice_seq(in.i, t0, t1);
    piece.f = testing::slice_seq(in.f, t0, t1);
    Tensor part = s.push(piece.args());
    h = h.empty() ? std::move(part) : testing::concat_seq(h, part);
    t0 = t1;
  }
  return {std::move(h), s.state().C, s.state().n, s.state().m};
}

// Streaming equals one call: odd S (a multiple of neither the slice nor the chunk), with and without an initial
// state, on the default CPU kernel (bit for bit against the same slices in process) and through the flow graph
// over CPU workers and workers + both PoCL devices.
TEST_F(CliStream, StreamingEqualsOneCall) {
  for (const bool state : {false, true}) {
    for (const std::string devices : {"", "workers", "workers+all"}) {
      SCOPED_TRACE("initial state " + std::to_string(state) + " devices '" + devices + "'");
      testing::InputSpec spec = testing::spec(2, 3, devices.empty() ? 1001 : 301, 8, 12);
      spec.initial_state = state;
      const testing::Inputs in = testing::make_inputs(spec, testing::fresh_seed());
      save_inputs(in);
      const std::int64_t slice = devices.empty() ? 100 : 70;
      const auto r =
          run_cli(dir_, "--json forward " + inputs(state) + " --chunk-size 16 --stream-tokens " +
                            std::to_string(slice) + (devices.empty() ? "" : " --devices " + devices) + " --out " +
                            path("h") + " --out-c " + path("c") + " --out-n " + path("n") + " --out-m " + path("m"));
      ASSERT_EQ(r.code, 0) << r.err;
      const auto doc = nlohmann::json::parse(r.out);
      EXPECT_EQ(doc["slices"], (spec.S + slice - 1) / slice) << r.out;
      EXPECT_TRUE(doc.contains("peak_rss_mib")) << r.out;
      MlstmOptions o;
      o.chunk_size = 16;
      const auto want = get_kernel("chunkwise--cpu_xl_chunk")->forward(in.args(), o);
      const Tensor h = npy::read(path("h"), "h"), c = npy::read(path("c"), "c"), n = npy::read(path("n"), "n"),
                   m = npy::read(path("m"), "m");
      const std::string what = "mlstm forward --stream-tokens" + (devices.empty() ? "" : " --devices " + devices);
      EXPECT_TRUE(testing::matches(h, want.h, 1e-4, what, "h", spec));
      EXPECT_TRUE(testing::matches(c, want.c, 1e-4, what, "c", spec));
      EXPECT_TRUE(testing::matches(n, want.n, 1e-4, what, "n", spec));
      EXPECT_TRUE(testing::matches(m, want.m, 1e-4, what, "m", spec));
      if (devices.empty()) {
        const ForwardResult same = stream_in_process(in, slice, o);
        EXPECT_TRUE(testing::matches(h, same.h, 0.0, what + " vs StreamSession", "h", spec));
        EXPECT_TRUE(testing::matches(c, same.c, 0.0, what + " vs StreamSession", "c", spec));
        EXPECT_TRUE(testing::matches(m, same.m, 0.0, what + " vs StreamSession", "m", spec));
      }
      for (const auto& e : fs::directory_iterator(dir_)) {  // no partial file, record or temporary left
        EXPECT_NE(e.path().filename().string()[0], '.') << e.path();
      }
    }
  }
}

// Inputs of about 300 MiB through a child whose address space is capped at 240 MiB (RLIMIT_AS, below the
// input size; the child is pinned to one CPU, so one TBB worker and one OpenBLAS buffer of 128 MiB fit): it
// succeeds, equals one call, and its peak RSS stays well below the input size.
TEST_F(CliStream, StreamsAFileLargerThanItsAddressSpaceLimit) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  // The sanitizers reserve terabytes of address space for their shadow memory: no cap of RLIMIT_AS can hold a
  // sanitized child. The plain suite runs this test; the sanitized one runs the other streaming tests.
  GTEST_SKIP() << "address-space cap: not under a sanitizer (its shadow memory needs the address space)";
#endif
  const testing::InputSpec spec = testing::spec(1, 2, 200003, 64, 64);
  const std::uint64_t input_bytes = 2ull * 200003 * (3 * 64 * 4 + 8);
  const rlim_t cap = 240ull << 20;
  ASSERT_GT(input_bytes, cap);
  // The inputs are written and freed before the fork: the child's peak RSS (kept across exec) would count them.
  save_inputs(testing::make_inputs(spec, testing::fresh_seed()));
  const auto r = run_cli(dir_, "--json forward " + inputs() + " --stream-tokens 4000 --out " + path("h"), [&] {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(static_cast<int>(sched_getcpu()), &one);
    sched_setaffinity(0, sizeof one, &one);
    const rlimit limit{cap, cap};
    setrlimit(RLIMIT_AS, &limit);
  });
  ASSERT_EQ(r.code, 0) << r.err;
  const auto doc = nlohmann::json::parse(r.out);
  const double peak = doc["peak_rss_mib"].get<double>(), input_mib = doc["input_mib"].get<double>();
  std::printf("[ measure  ] input %.1f MiB, address space cap %.0f MiB, peak RSS %.1f MiB, %.2f s\n", input_mib,
              static_cast<double>(cap >> 20), peak, doc["seconds"].get<double>());
  EXPECT_LT(peak, input_mib / 4) << r.out;  // measured: 25 MiB for 148, 296 and 592 MiB of inputs
  testing::Inputs in;
  in.q = npy::read(path("q"), "q");
  in.k = npy::read(path("k"), "k");
  in.v = npy::read(path("v"), "v");
  in.i = npy::read(path("i"), "i");
  in.f = npy::read(path("f"), "f");
  const auto want = get_kernel("chunkwise--cpu_xl_chunk")->forward(in.args(), MlstmOptions{});
  EXPECT_TRUE(testing::matches(npy::read(path("h"), "h"), want.h, 1e-4, "mlstm forward --stream-tokens", "h", spec));
  // Whole arrays of the same files under an explicit --memory-limit below them: refused, naming --stream-tokens.
  expect_refused(run_cli(dir_, "forward " + inputs() + " --memory-limit 200000000 --out " + path("h2")), 2,
                 "--stream-tokens");
}

// SIGKILL after three slices (the test hook, deterministic), then --resume: h.npy and the last states are byte
// for byte those of an uninterrupted run; the final path does not exist before the resume finishes.
TEST_F(CliStream, KilledRunResumesBitForBit) {
  testing::InputSpec spec = testing::spec(2, 3, 777, 8, 12);
  spec.initial_state = true;
  save_inputs(testing::make_inputs(spec, testing::fresh_seed()));
  const std::string common = "forward " + inputs(true) + " --chunk-size 16 --stream-tokens 50";
  ASSERT_EQ(run_cli(dir_, common + " --out " + path("whole") + " --out-c " + path("whole_c")).code, 0);
  const auto killed = run_cli(dir_, common + " --out " + path("h") + " --out-c " + path("c"),
                              [] { setenv("MLSTM_TEST_KILL_AFTER_SLICES", "3", 1); });
  ASSERT_EQ(killed.signal, SIGKILL) << killed.code << " " << killed.err;
  EXPECT_FALSE(fs::exists(path("h")));
  EXPECT_FALSE(fs::exists(path("c")));
  EXPECT_TRUE(fs::exists(dir_ / ".h.npy.partial"));
  EXPECT_TRUE(fs::exists(dir_ / ".h.npy.progress"));
  const auto resumed =
      run_cli(dir_, "--json " + common + " --out " + path("h") + " --out-c " + path("c") + " --resume");
  ASSERT_EQ(resumed.code, 0) << resumed.err;
  EXPECT_EQ(nlohmann::json::parse(resumed.out)["resumed_from"], 150) << resumed.out;
  EXPECT_EQ(slurp(path("h")), slurp(path("whole")));
  EXPECT_EQ(slurp(path("c")), slurp(path("whole_c")));
  EXPECT_FALSE(fs::exists(dir_ / ".h.npy.partial"));
  EXPECT_FALSE(fs::exists(dir_ / ".h.npy.progress"));
  // Without --resume a stale partial file and record are replaced: a fresh run from token 0.
  ASSERT_EQ(
      run_cli(dir_, common + " --out " + path("h2"), [] { setenv("MLSTM_TEST_KILL_AFTER_SLICES", "2", 1); }).signal,
      SIGKILL);
  const auto fresh = run_cli(dir_, "--json " + common + " --out " + path("h2"));
  ASSERT_EQ(fresh.code, 0) << fresh.err;
  EXPECT_EQ(nlohmann::json::parse(fresh.out)["resumed_from"], 0) << fresh.out;
  EXPECT_EQ(slurp(path("h2")), slurp(path("whole")));
}

// From --stream-tokens 16384 up, a fresh run's first slice is an eighth of it (a multiple of 1024): 20000 tokens
// in slices of 16384 are read as 2048 + 16384 + 1568, and h equals a StreamSession fed those slices bit for bit.
// Below 16384 the first slice is a whole one; where the first slice holds the sequence it is the only one. A run
// killed after its first slice resumes at token 2048 on the same boundaries: the same bytes.
TEST_F(CliStream, LongSlicesBeginWithAShortFirstSlice) {
  testing::InputSpec spec = testing::spec(1, 2, 20000, 8, 12);
  const testing::Inputs in = testing::make_inputs(spec, testing::fresh_seed());
  save_inputs(in);
  MlstmOptions o;
  o.chunk_size = 16;
  const std::string common = "forward " + inputs(false) + " --chunk-size 16 --stream-tokens ";
  const auto r = run_cli(dir_, "--json " + common + "16384 --out " + path("h"));
  ASSERT_EQ(r.code, 0) << r.err;
  const auto doc = nlohmann::json::parse(r.out);
  EXPECT_EQ(doc["first_slice_tokens"], 2048) << r.out;
  EXPECT_EQ(doc["slices"], 3) << r.out;
  const Tensor h = npy::read(path("h"), "h");
  EXPECT_TRUE(testing::matches(h, stream_in_process(in, 16384, o, 2048).h, 0.0, "first slice 2048", "h", spec));
  EXPECT_TRUE(testing::matches(h, get_kernel("chunkwise--cpu_xl_chunk")->forward(in.args(), o).h, 1e-4,
                               "first slice 2048 vs one call", "h", spec));
  const auto below = run_cli(dir_, "--json " + common + "16383 --out " + path("h_below"));
  ASSERT_EQ(below.code, 0) << below.err;
  EXPECT_EQ(nlohmann::json::parse(below.out)["first_slice_tokens"], 16383) << below.out;
  EXPECT_EQ(nlohmann::json::parse(below.out)["slices"], 2) << below.out;
  // One slice in all (the first, an eighth of 200000 tokens, holds the 20000): the same h as one call.
  const auto one = run_cli(dir_, "--json " + common + "200000 --out " + path("h_one"));
  ASSERT_EQ(one.code, 0) << one.err;
  EXPECT_EQ(nlohmann::json::parse(one.out)["slices"], 1) << one.out;
  EXPECT_EQ(nlohmann::json::parse(one.out)["first_slice_tokens"], 20000) << one.out;  // what was read, not 24576
  EXPECT_TRUE(
      testing::matches(npy::read(path("h_one"), "h"), stream_in_process(in, 200000, o).h, 0.0, "one slice", "h", spec));
  const auto killed =
      run_cli(dir_, common + "16384 --out " + path("hk"), [] { setenv("MLSTM_TEST_KILL_AFTER_SLICES", "1", 1); });
  ASSERT_EQ(killed.signal, SIGKILL) << killed.code << " " << killed.err;
  const auto resumed = run_cli(dir_, "--json " + common + "16384 --out " + path("hk") + " --resume");
  ASSERT_EQ(resumed.code, 0) << resumed.err;
  EXPECT_EQ(nlohmann::json::parse(resumed.out)["resumed_from"], 2048) << resumed.out;
  EXPECT_EQ(nlohmann::json::parse(resumed.out)["slices"], 2) << resumed.out;
  EXPECT_EQ(slurp(path("hk")), slurp(path("h")));
}

// --stream-tokens with --cu-seqlens (issue 19 item 2): packed sequences streamed from files equal one packed call
// of the library (h, and the (N,...) last states written as each sequence ends) with and without (N,...) initial
// states, through one kernel and the flow graph over workers and workers + both PoCL devices. The slices of 10
// tokens cut sequences, hold several boundaries, and end on two (offsets 50 and 100); the sequences inside one slice
// run as one packed call (StreamSession::forward_sequences), the parts across slices stream. A run killed after three
// slices (sequences 0-3 finished, the fourth mid-way) resumes to the same bytes. Bad states and offsets are
// refused naming the option, before the run starts.
TEST_F(CliStream, PackedSequencesStreamFromFiles) {
  const std::vector<std::int64_t> lengths{1, 7, 8, 9, 25, 50, 3};
  for (const bool state : {false, true}) {
    for (const std::string devices : {"", "workers", "workers+all"}) {
      SCOPED_TRACE("initial states " + std::to_string(state) + " devices '" + devices + "'");
      testing::InputSpec spec = testing::spec(1, 2, 0, 8, 12);
      spec.initial_state = state;
      const testing::Inputs in = testing::make_packed_inputs(lengths, spec, testing::fresh_seed());
      spec.S = in.q.dim(2);
      save_inputs(in);
      npy::write_offsets(path("offsets"), in.cu_seqlens);
      const std::string common = "forward " + inputs(state) + " --chunk-size 4 --stream-tokens 10 --cu-seqlens " +
                                 path("offsets") + (devices.empty() ? "" : " --devices " + devices);
      const std::string outs = " --out-c " + path("c") + " --out-n " + path("n") + " --out-m " + path("m");
      const auto r = run_cli(dir_, "--json " + common + " --out " + path("h") + outs);
      ASSERT_EQ(r.code, 0) << r.err;
      const auto doc = nlohmann::json::parse(r.out);
      EXPECT_EQ(doc["packed_sequences"], 7) << r.out;
      // Sequences 0 and 1 (tokens 0-8) and 6 (100-103) begin and end inside one slice: one packed call each slice;
      // the others stream in parts.
      EXPECT_EQ(doc["sequences_in_packed_calls"], 3) << r.out;
      EXPECT_EQ(doc["slices"], 11) << r.out;
      MlstmOptions o;
      o.chunk_size = 4;
      const auto want = get_kernel("chunkwise--cpu_xl_chunk")->forward(in.args(), o);
      ASSERT_EQ(want.c.dim(0), 7);
      const std::string what =
          "mlstm forward --stream-tokens --cu-seqlens" + (devices.empty() ? "" : " --devices " + devices);
      EXPECT_TRUE(testing::matches(npy::read(path("h"), "h"), want.h, 1e-4, what, "h", spec));
      EXPECT_TRUE(testing::matches(npy::read(path("c"), "c"), want.c, 1e-4, what, "c", spec));
      EXPECT_TRUE(testing::matches(npy::read(path("n"), "n"), want.n, 1e-4, what, "n", spec));
      EXPECT_TRUE(testing::matches(npy::read(path("m"), "m"), want.m, 1e-4, what, "m", spec));
      for (const auto& e : fs::directory_iterator(dir_)) {  // no partial file, record or temporary left
        EXPECT_NE(e.path().filename().string()[0], '.') << e.path();
      }
      if (!devices.empty()) continue;
      // Killed after three slices (tokens 0-30: sequences 0-3 ended, the fourth begun), then resumed.
      for (const char* name : {"hk", "ck", "mk"}) fs::remove(path(name));
      const auto killed =
          run_cli(dir_, common + " --out " + path("hk") + " --out-c " + path("ck") + " --out-m " + path("mk"),
                  [] { setenv("MLSTM_TEST_KILL_AFTER_SLICES", "3", 1); });
      ASSERT_EQ(killed.signal, SIGKILL) << killed.code << " " << killed.err;
      EXPECT_FALSE(fs::exists(path("ck")));
      EXPECT_TRUE(fs::exists(dir_ / ".ck.npy.partial"));
      // The state outputs are part of what a resume must match.
      expect_refused(run_cli(dir_, common + " --out " + path("hk") + " --out-c " + path("ck") + " --resume"), 2,
                     "--out-c");
      const auto resumed = run_cli(dir_, "--json " + common + " --out " + path("hk") + " --out-c " + path("ck") +
                                             " --out-m " + path("mk") + " --resume");
      ASSERT_EQ(resumed.code, 0) << resumed.err;
      EXPECT_EQ(nlohmann::json::parse(resumed.out)["resumed_from"], 30) << resumed.out;
      EXPECT_EQ(slurp(path("hk")), slurp(path("h")));
      EXPECT_EQ(slurp(path("ck")), slurp(path("c")));
      EXPECT_EQ(slurp(path("mk")), slurp(path("m")));
      EXPECT_FALSE(fs::exists(dir_ / ".ck.npy.partial"));
    }
  }
  // Refusals, each in one line naming the option, no output left: one state instead of N, a missing part of the
  // states, offsets that do not end at S, and (sigmoid gate) a stabiliser state that is not zero in sequence 2.
  testing::InputSpec spec = testing::spec(1, 2, 0, 8, 12);
  spec.initial_state = true;
  testing::Inputs in = testing::make_packed_inputs(lengths, spec, testing::fresh_seed());
  save_inputs(in);
  npy::write_offsets(path("offsets"), in.cu_seqlens);
  const std::string plain = "forward " + inputs() + " --stream-tokens 10 --out " + path("x");
  const std::string packed = plain + " --cu-seqlens " + path("offsets");
  npy::write(path("c0one"), Tensor::zeros({1, 2, 8, 12}, DType::f32).view());
  expect_refused(run_cli(dir_, packed + " --c0 " + path("c0one") + " --n0 " + path("n0") + " --m0 " + path("m0")), 2,
                 "--c0");
  expect_refused(run_cli(dir_, packed + " --c0 " + path("c0") + " --m0 " + path("m0")), 2, "--n0");
  npy::write_offsets(path("short"), std::vector<std::int64_t>{0, 9, in.q.dim(2) - 1});
  expect_refused(run_cli(dir_, plain + " --cu-seqlens " + path("short")), 2, "--cu-seqlens");
  Tensor m0 = Tensor::zeros({7, 2}, DType::f32);
  m0.data<float>()[2 * 2] = 1.0f;
  npy::write(path("m0bad"), m0.view());
  expect_refused(
      run_cli(dir_, packed + " --gate sig --c0 " + path("c0") + " --n0 " + path("n0") + " --m0 " + path("m0bad")), 2,
      "--m0");
  EXPECT_FALSE(fs::exists(path("x")));
}

// Bad resumes, inputs that disagree, outputs that cannot be written: one line naming the option, exit 2 for bad
// input and 1 for a failed write (a full disk), never a half-written final file.
TEST_F(CliStream, BadStreamsAreRefusedNamingTheOption) {
  const testing::InputSpec spec = testing::spec(1, 2, 333, 8, 8);
  const testing::Inputs in = testing::make_inputs(spec, testing::fresh_seed());
  save_inputs(in);
  const std::string common = "forward " + inputs() + " --stream-tokens 40";
  expect_refused(run_cli(dir_, common + " --resume --out " + path("h")), 2, "--resume");  // no record
  expect_refused(run_cli(dir_, "forward " + inputs() + " --resume --out " + path("h")), 2, "--resume");
  expect_refused(run_cli(dir_, "forward " + inputs() + " --stream-tokens 0 --out " + path("h")), 2, "--stream-tokens");
  expect_refused(run_cli(dir_, "forward " + inputs() + " --memory-limit 0 --out " + path("h")), 2, "--memory-limit");
  expect_refused(run_cli(dir_, common + " --memory-limit 1000 --out " + path("h")), 2, "--stream-tokens");
  expect_refused(run_cli(dir_, common + " --out " + (dir_ / "missing" / "h.npy").string()), 2, "--out");
  // S differs across the files: refused naming the file's option, before anything is written.
  npy::write(path("k_short"), testing::slice_seq(in.k, 0, 332).view());
  expect_refused(run_cli(dir_, "forward --q " + path("q") + " --k " + path("k_short") + " --v " + path("v") + " --i " +
                                   path("i") + " --f " + path("f") + " --stream-tokens 40 --out " + path("h")),
                 2, "--k");
  npy::write(path("f_short"), testing::slice_seq(in.f, 0, 300).view());
  expect_refused(run_cli(dir_, "forward --q " + path("q") + " --k " + path("k") + " --v " + path("v") + " --i " +
                                   path("i") + " --f " + path("f_short") + " --stream-tokens 40 --out " + path("h")),
                 2, "--f");
  EXPECT_FALSE(fs::exists(dir_ / ".h.npy.partial"));
  // A record from another slice size, other options or a changed input: refused naming what differs.
  ASSERT_EQ(
      run_cli(dir_, common + " --out " + path("h"), [] { setenv("MLSTM_TEST_KILL_AFTER_SLICES", "2", 1); }).signal,
      SIGKILL);
  expect_refused(run_cli(dir_, "forward " + inputs() + " --stream-tokens 41 --resume --out " + path("h")), 2,
                 "--stream-tokens");
  expect_refused(run_cli(dir_, common + " --chunk-size 32 --resume --out " + path("h")), 2, "--chunk-size");
  expect_refused(run_cli(dir_, common + " --gate sig --resume --out " + path("h")), 2, "--gate");
  expect_refused(run_cli(dir_, common + " --devices workers --resume --out " + path("h")), 2, "--devices");
  // Inputs given in one run and not the other are named as the user gave them (probe 39: adding --cu-seqlens was
  // reported as '--out-c/--out-n/--out-m: ... (null there, [false,false,false] here)', and an initial state as a
  // changed file).
  npy::write(path("c0"), Tensor::zeros({1, 2, 8, 8}, DType::f32).view());
  npy::write(path("n0"), Tensor::zeros({1, 2, 8}, DType::f32).view());
  npy::write(path("m0"), Tensor::zeros({1, 2}, DType::f32).view());
  const auto with_state = run_cli(dir_, "forward " + inputs(true) + " --stream-tokens 40 --resume --out " + path("h"));
  expect_refused(with_state, 2, "--c0");
  EXPECT_NE(with_state.err.find("given here but not in the run that wrote the progress record"), std::string::npos)
      << with_state.err;
  npy::write_offsets(path("offsets"), std::vector<std::int64_t>{0, 100, 333});
  const auto packed = run_cli(dir_, common + " --cu-seqlens " + path("offsets") + " --resume --out " + path("h"));
  expect_refused(packed, 2, "--cu-seqlens");
  EXPECT_EQ(packed.err.find("null there"), std::string::npos) << packed.err;
  // --eps is recorded as its float32 bits and shown as the number (it read "897988541 there, 925353388 here").
  const auto eps = run_cli(dir_, common + " --eps 1e-5 --resume --out " + path("h"));
  expect_refused(eps, 2, "--eps");
  EXPECT_NE(eps.err.find("1e-06 there, 1e-05 here"), std::string::npos) << eps.err;
  // An input edited in place with its modification time set back: its change time (and the record) tell.
  {
    const auto mtime = fs::last_write_time(path("i"));
    Tensor i = in.i.to(DType::f32);
    i.data<float>()[5] += 1.0f;
    std::string bytes = npy::serialize(i.view());
    std::fstream(path("i"), std::ios::in | std::ios::out | std::ios::binary).write(bytes.data(), bytes.size());
    fs::last_write_time(path("i"), mtime);
    expect_refused(run_cli(dir_, common + " --resume --out " + path("h")), 2, "--i");
    npy::write(path("i"), in.i.view());  // a new file: the record's other checks below see only --v's change
  }
  fs::last_write_time(path("v"), fs::last_write_time(path("v")) + std::chrono::seconds(5));
  expect_refused(run_cli(dir_, common + " --resume --out " + path("h")), 2, "--v");
  EXPECT_FALSE(fs::exists(path("h")));
  // A full disk (the file size limit as a stand-in, SIGXFSZ ignored so the write fails with EFBIG): exit 1, one
  // line naming the output, no final file.
  const auto full = run_cli(dir_, common + " --out " + path("hfull"), [] {
    std::signal(SIGXFSZ, SIG_IGN);
    const rlimit limit{4096, 4096};
    setrlimit(RLIMIT_FSIZE, &limit);
  });
  expect_refused(full, 1, "hfull.npy");
  EXPECT_FALSE(fs::exists(path("hfull")));
}

// Probe 40, defect 4: run --check-tokens above the first piece was cut quietly to it ("spot_check_tokens":7 for
// --piece 7 --check-tokens 100). The tokens asked for are checked across the pieces that hold them, a short last
// piece included; the default (2048) stays the first piece's.
TEST_F(CliStream, RunSpotChecksTheTokensAskedForAcrossPieces) {
  const std::string run =
      "run --devices workers --heads 2 --dqk 16 --dhv 16 --seq-len 300 --piece 7 --dtype float32 --check-tokens ";
  for (const std::int64_t tokens : {100, 300}) {
    const auto r = run_cli(dir_, "--json " + run + std::to_string(tokens));
    ASSERT_EQ(r.code, 0) << r.err;
    const auto doc = nlohmann::json::parse(r.out);
    EXPECT_EQ(doc["spot_check_tokens"], tokens) << r.out;
    EXPECT_EQ(doc["spot_check_pieces"], (tokens + 6) / 7) << r.out;
    EXPECT_EQ(doc["spot_check_ok"], true) << r.out;
  }
  const auto text = run_cli(dir_, run + "100");
  ASSERT_EQ(text.code, 0) << text.err;
  EXPECT_NE(text.out.find("(first 100 tokens, 15 pieces)"), std::string::npos) << text.out;
  const auto dflt = run_cli(dir_, "--json run --devices workers --heads 2 --dqk 16 --dhv 16 --seq-len 300 --piece 7");
  ASSERT_EQ(dflt.code, 0) << dflt.err;
  EXPECT_EQ(nlohmann::json::parse(dflt.out)["spot_check_tokens"], 7) << dflt.out;
  // Above --seq-len is still refused.
  expect_refused(run_cli(dir_, run + "301"), 2, "--check-tokens");
}

// Probe 40, defect 5: --json reported the chunk size asked for where the run took a smaller one ("chunk_size":300
// for run --seq-len 100 --chunk-size 300, 100000 for forward --chunk-size 100000 on S=37, 64 for run --seq-len 1).
// No chunk spans more tokens than a call's row: run reports min(chunk, piece), forward and backward min(chunk, S),
// forward --stream-tokens min(chunk, slice); the text output says the same, and names the slices taken.
TEST_F(CliStream, ReportedChunkIsTheSizeTheRunTook) {
  const std::string run = "run --devices workers --heads 2 --dqk 16 --dhv 16 --dtype float32 ";
  for (const auto& [args, chunk] :
       std::vector<std::pair<std::string, std::int64_t>>{{"--seq-len 100 --chunk-size 300", 100},
                                                         {"--seq-len 1", 1},
                                                         {"--seq-len 300 --piece 7", 7},
                                                         {"--seq-len 300 --chunk-size 16", 16},
                                                         {"--mode resident --seq-len 50", 50}}) {
    const auto r = run_cli(dir_, "--json " + run + args);
    ASSERT_EQ(r.code, 0) << args << ": " << r.err;
    EXPECT_EQ(nlohmann::json::parse(r.out)["chunk_size"], chunk) << args << ": " << r.out;
  }
  const auto text = run_cli(dir_, run + "--seq-len 100 --chunk-size 300");
  ASSERT_EQ(text.code, 0) << text.err;
  EXPECT_NE(text.out.find("chunk=100"), std::string::npos) << text.out;
  EXPECT_EQ(text.out.find("chunk=300"), std::string::npos) << text.out;

  const testing::Inputs in = testing::make_inputs(testing::spec(1, 2, 37, 8, 8), testing::fresh_seed());
  save_inputs(in);
  npy::write(path("dh"), in.v.view());
  for (const std::string engine : {"", " --devices workers"}) {
    SCOPED_TRACE("engine '" + engine + "'");
    const std::string fwd = "forward " + inputs() + engine + " --chunk-size 100000 --out " + path("h");
    const auto f = run_cli(dir_, "--json " + fwd);
    ASSERT_EQ(f.code, 0) << f.err;
    EXPECT_EQ(nlohmann::json::parse(f.out)["chunk_size"], 37) << f.out;
    const auto ft = run_cli(dir_, fwd);
    ASSERT_EQ(ft.code, 0) << ft.err;
    EXPECT_NE(ft.out.find("chunk 37"), std::string::npos) << ft.out;
    const auto s = run_cli(dir_, "--json " + fwd + " --stream-tokens 10");
    ASSERT_EQ(s.code, 0) << s.err;
    EXPECT_EQ(nlohmann::json::parse(s.out)["chunk_size"], 10) << s.out;
    // The text names the slices the run took: one of the whole 37 tokens for --stream-tokens 4096, not "of 4096".
    const auto whole = run_cli(dir_, fwd + " --stream-tokens 4096");
    ASSERT_EQ(whole.code, 0) << whole.err;
    EXPECT_NE(whole.out.find("in 1 slice of 37 tokens"), std::string::npos) << whole.out;
    const auto b = run_cli(dir_, "--json backward " + inputs() + engine + " --chunk-size 100000 --dh " + path("dh") +
                                     " --out-dq " + path("dq"));
    ASSERT_EQ(b.code, 0) << b.err;
    EXPECT_EQ(nlohmann::json::parse(b.out)["chunk_size"], 37) << b.out;
  }
}

// Probe 40, defect 6: run --backward --json said "engine":"" (the backward's graph plan has none) and its text no
// engine line; "tokens" was a float (4096.0); the problem line said "pieces of 16384 tokens" where the run took
// pieces of the whole 300; forward --stream-tokens listed the kernel's name as its device where forward without it
// lists "cpu".
TEST_F(CliStream, RunAndStreamReportWhatRan) {
  const std::string run = "run --devices workers --batch 2 --heads 2 --dqk 16 --dhv 16 --seq-len 300 --dtype float32";
  const auto fwd = run_cli(dir_, "--json " + run);
  ASSERT_EQ(fwd.code, 0) << fwd.err;
  const auto f = nlohmann::json::parse(fwd.out);
  EXPECT_TRUE(f["tokens"].is_number_integer()) << fwd.out;
  EXPECT_EQ(f["tokens"], 600) << fwd.out;
  const auto bwd = run_cli(dir_, "--json " + run + " --backward --piece 100");
  ASSERT_EQ(bwd.code, 0) << bwd.err;
  const auto b = nlohmann::json::parse(bwd.out);
  const std::string engine = b["engine"];
  EXPECT_EQ(engine.rfind(f["engine"].get<std::string>(), 0), 0u) << "the forward's engine first: " << bwd.out;
  EXPECT_NE(engine.find("backward"), std::string::npos) << bwd.out;
  EXPECT_FALSE(b["devices"].empty()) << bwd.out;
  EXPECT_TRUE(b["tokens"].is_number_integer()) << bwd.out;
  const auto text = run_cli(dir_, run + " --backward --piece 100");
  ASSERT_EQ(text.code, 0) << text.err;
  EXPECT_NE(text.out.find("\nengine: "), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("\nbackward: "), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("(600 tokens in"), std::string::npos) << text.out;
  const auto whole = run_cli(dir_, run);  // the default --piece 16384 is cut to the sequence
  ASSERT_EQ(whole.code, 0) << whole.err;
  EXPECT_NE(whole.out.find("pieces of 300 tokens"), std::string::npos) << whole.out;
  EXPECT_EQ(whole.out.find("16384"), std::string::npos) << whole.out;

  const testing::Inputs in = testing::make_inputs(testing::spec(1, 2, 37, 8, 8), testing::fresh_seed());
  save_inputs(in);
  for (const std::string engine : {"", " --devices workers"}) {
    SCOPED_TRACE("engine '" + engine + "'");
    const auto one = run_cli(dir_, "--json forward " + inputs() + engine + " --out " + path("h1"));
    ASSERT_EQ(one.code, 0) << one.err;
    const auto streamed =
        run_cli(dir_, "--json forward " + inputs() + engine + " --stream-tokens 10 --out " + path("h2"));
    ASSERT_EQ(streamed.code, 0) << streamed.err;
    EXPECT_EQ(nlohmann::json::parse(streamed.out)["devices"], nlohmann::json::parse(one.out)["devices"])
        << one.out << "\n"
        << streamed.out;
  }
}

}  // namespace
}  // namespace mlstm
