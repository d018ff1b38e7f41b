// mlstm forward / backward under mpirun (issue 17), run as children: this test is no MPI program. Every rank
// count, an empty rank and a rank shorter than a chunk, and mixed ranks (CPU workers on one, a PoCL device on the
// other, by mpirun's MPMD syntax) write what one process writes (`mlstm forward --devices workers`), to float32
// rounding; a failing rank (the test hooks MLSTM_MPI_FAIL_RANK, MLSTM_MPI_FAIL_WRITE) and bad input on one rank end
// every rank with one line from rank 0 and leave no output, no partial file and an older file unchanged; ranks
// given different options (MPMD) are refused before anything is read or written; the options and subcommands of
// one process are refused; a run that succeeds replaces an older file whole (renamed into place).
// Every child runs under `timeout`, so that a hung rank fails the test instead of blocking ctest.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "mlstm/core/npy.hpp"
#include "mlstm/mlstm.hpp"
#include "test_util.hpp"

namespace mlstm {
namespace {

namespace fs = std::filesystem;

using ChildRun = testing::CommandRun;
using nlohmann::json;

// float32 rounding: the ranks' outputs against one process's, relative to the largest |x| of the latter.
constexpr double kTol = 1e-5;

// `s` single-quoted for /bin/sh.
std::string quoted(const std::string& s) {
  std::string q = "'";
  for (const char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// A command under `timeout` (a hang exits 124 and fails the test), stdin closed (mpirun forwards it to rank 0).
ChildRun guarded(const fs::path& logs, const std::string& command) {
  return testing::run_command(logs, "exec timeout -k 10 120 " + command + " </dev/null");
}

// mlstm in one process.
ChildRun cli(const fs::path& logs, const std::string& args) {
  return guarded(logs, std::string(MLSTM_CLI_PATH) + " " + args);
}

// mpirun with one app context per entry of `contexts` ({np, mlstm arguments}: MPMD when several); `options` go to
// mpirun (e.g. -x MLSTM_MPI_FAIL_RANK=1); `wrapper`, when given, starts each rank's mlstm (its command line after it). Every rank gets the PoCL devices and the tests' OpenCL program cache.
ChildRun mpirun(const fs::path& logs, const std::vector<std::pair<int, std::string>>& contexts,
                const std::string& options = "", const std::string& wrapper = "") {
  std::string cmd = std::string(MLSTM_MPIRUN_PATH) + " --allow-run-as-root --oversubscribe";
  for (const char* name : {"POCL_DEVICES", "MLSTM_PROGRAM_CACHE"}) {
    if (const char* v = std::getenv(name)) cmd += " -x " + quoted(std::string(name) + "=" + v);
  }
  cmd += " " + options;
  for (std::size_t c = 0; c < contexts.size(); ++c) {
    cmd += (c == 0 ? " -np " : " : -np ") + std::to_string(contexts[c].first) + " " + wrapper + " " + MLSTM_CLI_PATH +
           " " + contexts[c].second;
  }
  return guarded(logs, cmd);
}

// The lines of mlstm's own on stderr (mpirun adds its banner when a rank exits non-zero).
std::vector<std::string> mlstm_lines(const std::string& err) {
  std::vector<std::string> lines;
  std::istringstream in(err);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("mlstm:", 0) == 0) lines.push_back(line);
  }
  return lines;
}

// Exit code `code` and exactly one mlstm line, which starts with `prefix` and names `names`.
void expect_one_line(const ChildRun& r, int code, const std::string& prefix, const std::string& names) {
  EXPECT_EQ(r.code, code) << r.err;
  const auto lines = mlstm_lines(r.err);
  ASSERT_EQ(lines.size(), 1u) << r.err;
  EXPECT_EQ(lines[0].rfind(prefix, 0), 0u) << "expected a line starting '" << prefix << "': " << lines[0];
  EXPECT_NE(lines[0].find(names), std::string::npos) << "the line should name " << names << ": " << lines[0];
}

// Every name in a directory, hidden ones (".h.npy.partial") included.
std::set<std::string> listing(const fs::path& dir) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
  return names;
}

std::string bytes_of(const fs::path& p) { return testing::slurp(p); }

void put_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << bytes;
}

// rank 0's --json document (stdout holds rank 0's output only).
json doc_of(const ChildRun& r) {
  json doc = json::parse(r.out, nullptr, false);
  EXPECT_FALSE(doc.is_discarded()) << "stdout is no JSON: " << r.out;
  return doc.is_discarded() ? json::object() : doc;
}

// --json of a distributed run: `np` ranks, their shards contiguous over [0, S), cut at whole chunks, one device
// entry per rank in rank order, the exchange timed.
void expect_distributed_doc(const json& doc, int np, std::int64_t S, std::int64_t chunk) {
  EXPECT_EQ(doc.value("ranks", -1), np) << doc.dump();
  EXPECT_TRUE(doc.contains("exchange_seconds")) << doc.dump();
  ASSERT_TRUE(doc.contains("shards") && doc["shards"].size() == static_cast<std::size_t>(np)) << doc.dump();
  ASSERT_TRUE(doc.contains("devices") && doc["devices"].size() == static_cast<std::size_t>(np)) << doc.dump();
  std::int64_t at = 0;
  for (int r = 0; r < np; ++r) {
    const auto a = doc["shards"][r][0].get<std::int64_t>(), b = doc["shards"][r][1].get<std::int64_t>();
    EXPECT_EQ(a, at) << "rank " << r << ": " << doc.dump();
    EXPECT_LE(a, b) << "rank " << r << ": " << doc.dump();
    EXPECT_TRUE(b == S || b % chunk == 0) << "rank " << r << " ends inside a chunk: " << doc.dump();
    at = b;
    const std::string d = doc["devices"][r].get<std::string>();
    EXPECT_EQ(d.rfind("rank " + std::to_string(r) + ": ", 0), 0u) << d;
  }
  EXPECT_EQ(at, S) << doc.dump();
}

class CliMpi : public ::testing::Test {
 protected:
  void SetUp() override {
    ::setenv("POCL_DEVICES", "pthread pthread", 0);  // as ctest sets it (ENVIRONMENT), when run by hand
    dir_ = testing::fresh_test_dir("mlstm_cli_mpi_");
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / (name + ".npy")).string(); }

  // Fresh inputs of `spec` (fresh_seed prints the seed and the replay command), written as .npy files: q, k, v,
  // i, f, the initial state c0, n0, m0, and dh, dc, dn for backward.
  testing::Inputs write_inputs(const testing::InputSpec& spec) {
    spec_ = spec;
    testing::Inputs in = testing::make_inputs(spec, testing::fresh_seed());
    for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"q", &in.q},
                                  {"k", &in.k},
                                  {"v", &in.v},
                                  {"i", &in.i},
                                  {"f", &in.f},
                                  {"c0", &in.c0},
                                  {"n0", &in.n0},
                                  {"m0", &in.m0},
                                  {"dh", &in.dh},
                                  {"dc", &in.dc_last},
                                  {"dn", &in.dn_last}}) {
      if (!t->empty()) npy::write(path(name), t->view());
    }
    return in;
  }
  // The input options: the five sequences, the initial state, the gate and the chunk size.
  std::string inputs(std::int64_t chunk, const std::string& gate = "exp", const std::string& q = "") const {
    return "--q " + (q.empty() ? path("q") : q) + " --k " + path("k") + " --v " + path("v") + " --i " + path("i") +
           " --f " + path("f") + " --c0 " + path("c0") + " --n0 " + path("n0") + " --m0 " + path("m0") + " --gate " +
           gate + " --chunk-size " + std::to_string(chunk);
  }
  // Forward's outputs as <tag>_h, <tag>_c, <tag>_n, <tag>_m.
  std::string forward_outputs(const std::string& tag) const {
    return " --out " + path(tag + "_h") + " --out-c " + path(tag + "_c") + " --out-n " + path(tag + "_n") +
           " --out-m " + path(tag + "_m");
  }
  static std::vector<std::string> backward_names() { return {"dq", "dk", "dv", "di", "df", "dc0", "dn0", "dm0"}; }
  // Backward's gradients in (dh, dc, dn) and out (every one, as <tag>_dq etc.).
  std::string backward_files(const std::string& tag) const {
    std::string s = " --dh " + path("dh") + " --dc " + path("dc") + " --dn " + path("dn");
    for (const auto& n : backward_names()) s += " --out-" + n + " " + path(tag + "_" + n);
    return s;
  }
  void expect_equal(const std::vector<std::string>& names, const std::string& got, const std::string& want,
                    const std::string& what) const {
    for (const auto& n : names) {
      EXPECT_TRUE(testing::matches(npy::read(path(got + "_" + n), n), npy::read(path(want + "_" + n), n), kTol, what, n,
                                   spec_));
    }
  }
  void expect_forward_equal(const std::string& got, const std::string& want, const std::string& what) const {
    expect_equal({"h", "c", "n", "m"}, got, want, what);
  }
  void expect_backward_equal(const std::string& got, const std::string& want, const std::string& what) const {
    expect_equal(backward_names(), got, want, what);
  }

  fs::path dir_;
  testing::InputSpec spec_;
};

// 1. forward on 2, 3 and 4 ranks writes what one process writes: h and the last state (from the last rank), on
// an odd shape (S = 150: 9 whole chunks of 16 and one of 6) with an initial state (on rank 0), both gates.
TEST_F(CliMpi, ForwardOnTwoThreeAndFourRanksEqualsOneProcess) {
  for (const std::string gate : {"exp", "sig"}) {
    SCOPED_TRACE("--gate " + gate);
    testing::InputSpec spec = testing::spec(2, 3, 150, 8, 12);
    spec.gate = gate == "exp" ? GateVariant::exp : GateVariant::sigmoid;
    spec.initial_state = true;
    write_inputs(spec);
    const ChildRun one = cli(dir_, "forward " + inputs(16, gate) + " --devices workers" + forward_outputs("one"));
    ASSERT_EQ(one.code, 0) << one.err;
    for (const int np : {2, 3, 4}) {
      SCOPED_TRACE("-np " + std::to_string(np));
      const std::string tag = "np" + std::to_string(np);
      const ChildRun r = mpirun(dir_, {{np, "--json forward " + inputs(16, gate) + forward_outputs(tag)}});
      ASSERT_EQ(r.code, 0) << r.err;
      EXPECT_TRUE(mlstm_lines(r.err).empty()) << r.err;
      expect_distributed_doc(doc_of(r), np, 150, 16);
      expect_forward_equal(tag, "one", "mpirun -np " + std::to_string(np) + " mlstm forward --gate " + gate);
    }
  }
}

// 2. backward on 2 and 4 ranks writes what one process writes: every sequence gradient (each rank its slice),
// the initial state's gradients (rank 0) from the last state's gradients --dc, --dn (entering the last rank).
TEST_F(CliMpi, BackwardOnTwoAndFourRanksEqualsOneProcess) {
  for (const std::string gate : {"exp", "sig"}) {
    SCOPED_TRACE("--gate " + gate);
    testing::InputSpec spec = testing::spec(2, 3, 150, 8, 12);
    spec.gate = gate == "exp" ? GateVariant::exp : GateVariant::sigmoid;
    spec.initial_state = true;
    write_inputs(spec);
    const ChildRun one = cli(dir_, "backward " + inputs(16, gate) + " --devices workers" + backward_files("one"));
    ASSERT_EQ(one.code, 0) << one.err;
    for (const int np : {2, 4}) {
      SCOPED_TRACE("-np " + std::to_string(np));
      const std::string tag = "np" + std::to_string(np);
      const ChildRun r = mpirun(dir_, {{np, "--json backward " + inputs(16, gate) + backward_files(tag)}});
      ASSERT_EQ(r.code, 0) << r.err;
      EXPECT_TRUE(mlstm_lines(r.err).empty()) << r.err;
      const json doc = doc_of(r);
      expect_distributed_doc(doc, np, 150, 16);
      EXPECT_EQ(doc.value("initial_state_gradients", false), true) << doc.dump();
      expect_backward_equal(tag, "one", "mpirun -np " + std::to_string(np) + " mlstm backward --gate " + gate);
    }
  }
}

// 3. S = 150 in chunks of 64 on 4 ranks: shards [0,64), [64,128), [128,150) (shorter than a chunk) and
// [150,150) (empty). Forward and backward still write what one process writes; --json lists those shards.
TEST_F(CliMpi, ARankShorterThanAChunkAndAnEmptyRank) {
  testing::InputSpec spec = testing::spec(2, 3, 150, 8, 12);
  spec.initial_state = true;
  write_inputs(spec);
  const json shards = json::array({{0, 64}, {64, 128}, {128, 150}, {150, 150}});

  const ChildRun one = cli(dir_, "forward " + inputs(64) + " --devices workers" + forward_outputs("one"));
  ASSERT_EQ(one.code, 0) << one.err;
  const ChildRun f = mpirun(dir_, {{4, "--json forward " + inputs(64) + forward_outputs("np4")}});
  ASSERT_EQ(f.code, 0) << f.err;
  const json fdoc = doc_of(f);
  EXPECT_EQ(fdoc["shards"], shards) << fdoc.dump();
  expect_distributed_doc(fdoc, 4, 150, 64);
  expect_forward_equal("np4", "one", "mpirun -np 4 mlstm forward (a short and an empty rank)");

  const ChildRun bone = cli(dir_, "backward " + inputs(64) + " --devices workers" + backward_files("one"));
  ASSERT_EQ(bone.code, 0) << bone.err;
  const ChildRun b = mpirun(dir_, {{4, "--json backward " + inputs(64) + backward_files("np4")}});
  ASSERT_EQ(b.code, 0) << b.err;
  const json bdoc = doc_of(b);
  EXPECT_EQ(bdoc["shards"], shards) << bdoc.dump();
  expect_distributed_doc(bdoc, 4, 150, 64);
  expect_backward_equal("np4", "one", "mpirun -np 4 mlstm backward (a short and an empty rank)");
}

// 4. Mixed ranks (MPMD): rank 0 on the CPU workers, rank 1 on PoCL's OpenCL device 0. Forward and backward
// write what one process writes; --json names each rank's own device.
TEST_F(CliMpi, MixedRanksOfWorkersAndAnOpenClDeviceEqualOneProcess) {
  testing::InputSpec spec = testing::spec(2, 3, 150, 8, 12);
  spec.initial_state = true;
  write_inputs(spec);
  const ChildRun one = cli(dir_, "forward " + inputs(16) + " --devices workers" + forward_outputs("one"));
  ASSERT_EQ(one.code, 0) << one.err;
  const std::string args = "--json forward " + inputs(16) + forward_outputs("mixed");
  const ChildRun r = mpirun(dir_, {{1, args + " --devices workers"}, {1, args + " --devices 0"}});
  ASSERT_EQ(r.code, 0) << r.err;
  const json doc = doc_of(r);
  expect_distributed_doc(doc, 2, 150, 16);
  expect_forward_equal("mixed", "one", "mpirun (rank 0 workers, rank 1 OpenCL 0) mlstm forward");
  ASSERT_EQ(doc["devices"].size(), 2u) << doc.dump();
  const std::string d0 = doc["devices"][0].get<std::string>(), d1 = doc["devices"][1].get<std::string>();
  const std::string p0 = "rank 0: ", p1 = "rank 1: ";
  ASSERT_EQ(d0.rfind(p0, 0), 0u) << d0;
  ASSERT_EQ(d1.rfind(p1, 0), 0u) << d1;
  EXPECT_NE(d0.substr(p0.size()), d1.substr(p1.size())) << doc.dump();
  EXPECT_EQ(d0.find("opencl"), std::string::npos) << "rank 0 runs on the CPU workers: " << d0;
  EXPECT_NE(d1.find("opencl"), std::string::npos) << "rank 1 runs on OpenCL device 0: " << d1;

  const ChildRun bone = cli(dir_, "backward " + inputs(16) + " --devices workers" + backward_files("one"));
  ASSERT_EQ(bone.code, 0) << bone.err;
  const std::string bargs = "--json backward " + inputs(16) + backward_files("mixed");
  const ChildRun b = mpirun(dir_, {{1, bargs + " --devices workers"}, {1, bargs + " --devices 0"}});
  ASSERT_EQ(b.code, 0) << b.err;
  const json bdoc = doc_of(b);
  expect_distributed_doc(bdoc, 2, 150, 16);
  EXPECT_EQ(bdoc["devices"], doc["devices"]) << bdoc.dump();
  expect_backward_equal("mixed", "one", "mpirun (rank 0 workers, rank 1 OpenCL 0) mlstm backward");
}

// 5a. A rank that fails like a lost device (MLSTM_MPI_FAIL_RANK=1, 3 ranks): exit code 1 from every rank, one
// line (rank 0's) naming rank 1, no output and no partial file; an older file at the output path is unchanged.
TEST_F(CliMpi, AFailingRankLeavesNoOutputAndOneLine) {
  testing::InputSpec spec = testing::spec(2, 3, 150, 8, 12);
  spec.initial_state = true;
  write_inputs(spec);
  const fs::path out = dir_ / "out";
  fs::create_directories(out);
  const std::string fail = "-x MLSTM_MPI_FAIL_RANK=1";

  // forward into an empty directory: it stays empty
  const std::string h = (out / "h.npy").string(), c = (out / "c.npy").string();
  const ChildRun f = mpirun(dir_, {{3, "forward " + inputs(16) + " --out " + h + " --out-c " + c}}, fail);
  expect_one_line(f, 1, "mlstm: failed: rank 1:", "rank 1");
  for (const auto& name : listing(out)) ADD_FAILURE() << "debris: " << name;

  // forward over an older file: it is left as it was, nothing beside it
  const std::string older = "an older h.npy, not to be touched\n";
  put_bytes(h, older);
  const ChildRun g = mpirun(dir_, {{3, "forward " + inputs(16) + " --out " + h + " --out-c " + c}}, fail);
  expect_one_line(g, 1, "mlstm: failed: rank 1:", "rank 1");
  EXPECT_EQ(listing(out), std::set<std::string>{"h.npy"});
  EXPECT_EQ(bytes_of(h), older);
  fs::remove(h);

  // backward (every gradient asked for): nothing either
  std::string grads = " --dh " + path("dh") + " --dc " + path("dc") + " --dn " + path("dn");
  for (const auto& n : backward_names()) grads += " --out-" + n + " " + (out / (n + ".npy")).string();
  const ChildRun b = mpirun(dir_, {{3, "backward " + inputs(16) + grads}}, fail);
  expect_one_line(b, 1, "mlstm: failed: rank 1:", "rank 1");
  for (const auto& name : listing(out)) ADD_FAILURE() << "debris after backward: " << name;
}

// 5a'. A rank that fails after rank 0 made the shared partial file (the test hook MLSTM_MPI_FAIL_WRITE=1:--out:
// rank 1 cannot write its slice of h): exit code 1, one line, and rank 0's partial file is removed; an older file at
// the output path is unchanged. Backward too, where earlier outputs' partial files were already written.
TEST_F(CliMpi, ARankFailingAfterThePartialFileWasMadeLeavesNoDebris) {
  testing::InputSpec spec = testing::spec(2, 3, 150, 8, 12);
  spec.initial_state = true;
  write_inputs(spec);
  const fs::path out = dir_ / "out";
  fs::create_directories(out);
  const std::string h = (out / "h.npy").string();
  const std::string fail_h = "-x MLSTM_MPI_FAIL_WRITE=1:--out";

  const ChildRun f = mpirun(dir_, {{2, "forward " + inputs(16) + " --out " + h}}, fail_h);
  expect_one_line(f, 1, "mlstm: failed: rank 1:", "--out");
  for (const auto& name : listing(out)) ADD_FAILURE() << "debris after forward: " << name;

  const std::string older = "an older h.npy, not to be touched\n";
  put_bytes(h, older);
  const ChildRun g = mpirun(dir_, {{2, "forward " + inputs(16) + " --out " + h}}, fail_h);
  expect_one_line(g, 1, "mlstm: failed: rank 1:", "--out");
  EXPECT_EQ(listing(out), std::set<std::string>{"h.npy"});
  EXPECT_EQ(bytes_of(h), older);
  fs::remove(h);

  // backward: dq and dk written first (their partial files made and written), rank 1 fails on dv
  const std::string grads = " --dh " + path("dh") + " --out-dq " + (out / "dq.npy").string() + " --out-dk " +
                            (out / "dk.npy").string() + " --out-df " + (out / "df.npy").string() + " --out-dv " +
                            (out / "dv.npy").string();
  const ChildRun b = mpirun(dir_, {{2, "backward " + inputs(16) + grads}}, "-x MLSTM_MPI_FAIL_WRITE=1:--out-dv");
  expect_one_line(b, 1, "mlstm: failed: rank 1:", "--out-dv");
  for (const auto& name : listing(out)) ADD_FAILURE() << "debris after backward: " << name;
}

// 5b. Bad input on one rank only (MPMD: rank 1's --q does not exist): exit code 2 from every rank, one line
// naming rank 1 and --q (the ranks' options disagree), and no output.
TEST_F(CliMpi, BadInputOnOneRankIsNamedOnce) {
  testing::InputSpec spec = testing::spec(2, 3, 150, 8, 12);
  spec.initial_state = true;
  write_inputs(spec);
  const fs::path out = dir_ / "out";
  fs::create_directories(out);
  const std::string h = " --out " + (out / "h.npy").string();
  const ChildRun r = mpirun(dir_, {{1, "forward " + inputs(16) + h},
                                   {1, "forward " + inputs(16, "exp", (dir_ / "missing.npy").string()) + h}});
  expect_one_line(r, 2, "mlstm: error: rank 1: --q differs between ranks: ", "missing.npy (no such file) on rank 1");
  for (const auto& name : listing(out)) ADD_FAILURE() << "debris: " << name;
}

// 5c. What runs in one process only is refused under mpirun: exit code 2, one line naming the option or the
// subcommand.
TEST_F(CliMpi, OneProcessOptionsAndSubcommandsAreRefused) {
  testing::InputSpec spec = testing::spec(2, 3, 150, 8, 12);
  spec.initial_state = true;
  write_inputs(spec);
  const fs::path out = dir_ / "out";
  fs::create_directories(out);
  const std::string fwd = "forward " + inputs(16) + " --out " + (out / "h.npy").string();
  const std::vector<std::int64_t> offsets = {0, 100, 150};
  npy::write_offsets(path("cu"), offsets);
  const std::vector<std::pair<std::string, std::string>> refused = {
      {fwd + " --kernel chunkwise--cpu_xl_chunk", "--kernel"},
      {"backward " + inputs(16) + " --dh " + path("dh") + " --out-dq " + (out / "dq.npy").string() +
           " --kernel chunkwise--cpu_xl_chunk",
       "--kernel"},
      {fwd + " --stream-tokens 32", "--stream-tokens"},
      {fwd + " --resume", "--resume"},
      {fwd + " --cu-seqlens " + path("cu"), "--cu-seqlens"},
      {"run --seq-len 256 --heads 1 --dqk 8 --dhv 8", "mlstm: error: run "},
      {"kernels", "mlstm: error: kernels "},
  };
  for (const auto& [args, names] : refused) {
    SCOPED_TRACE(args);
    const ChildRun r = mpirun(dir_, {{2, args}});
    expect_one_line(r, 2, "mlstm: error: ", names);
    EXPECT_TRUE(r.out.empty()) << r.out;
  }
  for (const auto& name : listing(out)) ADD_FAILURE() << "debris: " << name;
}

// 5d. Ranks given different options (MPMD) are refused before anything is read or written: exit code 2 from every
// rank, one line naming the option and the ranks, and no output, whatever the option: one that changes the numbers
// (--eps, --gate, --chunk-size, an input of other content, --dtype), the files (--out, --out-c on the last rank
// only, a gradient of backward) or the subcommand.
TEST_F(CliMpi, RanksGivenDifferentOptionsAreRefused) {
  testing::InputSpec spec = testing::spec(2, 3, 150, 8, 12);
  spec.initial_state = true;
  write_inputs(spec);
  const fs::path out = dir_ / "out";
  fs::create_directories(out);
  const std::string h = " --out " + (out / "h.npy").string();
  const std::string fwd = "forward " + inputs(16) + h;
  const std::string grads = " --dh " + path("dh") + " --out-dq " + (out / "dq.npy").string();
  std::string auto_chunk = "forward " + inputs(16);  // --chunk-size auto (inputs() gives a number)
  auto_chunk.replace(auto_chunk.find("--chunk-size 16"), 15, "--chunk-size auto");
  struct Case {
    std::vector<std::pair<int, std::string>> contexts;
    std::string option, line;  // the option named; what the line says besides
  };
  const std::vector<Case> cases = {
      {{{1, fwd + " --eps 1e-6"}, {1, fwd + " --eps 1e-2"}}, "--eps", "1e-06 on rank 0, 0.01 on rank 1"},
      {{{2, fwd}, {1, fwd + " --eps 1e-2"}}, "--eps", "1e-06 on ranks 0, 1; 0.01 on rank 2"},
      {{{1, fwd}, {1, "forward " + inputs(16, "sig") + h}}, "--gate", "exp on rank 0, sig on rank 1"},
      {{{1, fwd}, {1, "forward " + inputs(32) + h}}, "--chunk-size", "16 on rank 0, 32 on rank 1"},
      {{{1, fwd}, {1, auto_chunk + h}}, "--chunk-size", "16 on rank 0, auto on rank 1"},
      {{{1, fwd}, {1, "forward " + inputs(16) + " --out " + (out / "other.npy").string()}}, "--out", "other.npy"},
      {{{1, fwd}, {1, fwd + " --out-c " + (out / "c.npy").string()}}, "--out-c", "(not given) on rank 0"},
      {{{1, fwd}, {1, "forward " + inputs(16, "exp", path("k")) + h}}, "--q", "k.npy"},
      {{{1, fwd}, {1, fwd + " --no-normalize"}}, "--no-normalize", "on rank 1"},
      {{{1, fwd}, {1, "backward " + inputs(16) + grads}}, "the subcommand", "forward on rank 0, backward on rank 1"},
      {{{1, "backward " + inputs(16) + grads}, {1, "backward " + inputs(16) + grads + "_other.npy"}},
       "--out-dq",
       "dq.npy_other.npy on rank 1"},
      {{{1, "backward " + inputs(16) + grads}, {1, "backward " + inputs(16) + grads + " --dc " + path("dc")}},
       "--dc",
       "(not given) on rank 0"},
  };
  for (const auto& c : cases) {
    std::string what;
    for (const auto& [np, args] : c.contexts) what += " : -np " + std::to_string(np) + " " + args;
    SCOPED_TRACE(what);
    const ChildRun r = mpirun(dir_, c.contexts);
    expect_one_line(r, 2, "mlstm: error: rank ", c.option + " differs between ranks: ");
    const auto lines = mlstm_lines(r.err);
    if (!lines.empty()) {
      EXPECT_NE(lines[0].find(c.line), std::string::npos) << lines[0];
    }
    EXPECT_TRUE(r.out.empty()) << r.out;
    for (const auto& name : listing(out)) ADD_FAILURE() << "debris: " << name;
  }
}

// 5f. A rank that stops before running (a parse error) or runs a subcommand that is not distributed while the others
// run forward: every rank ends with exit code 2 and one line (before, the others waited in their first collective
// step for good).
TEST_F(CliMpi, ARankThatStopsBeforeRunningStopsEveryRank) {
  testing::InputSpec spec = testing::spec(2, 3, 150, 8, 12);
  write_inputs(spec);
  const fs::path out = dir_ / "out";
  fs::create_directories(out);
  const std::string fwd = "forward " + inputs(16) + " --out " + (out / "h.npy").string();
  ChildRun r = mpirun(dir_, {{1, fwd}, {1, fwd + " --bogus"}});
  expect_one_line(r, 2, "mlstm: error: rank 1: ", "unknown option '--bogus' of mlstm forward");
  r = mpirun(dir_, {{1, fwd + " --bogus"}, {2, fwd}});
  expect_one_line(r, 2, "mlstm: error: ", "unknown option '--bogus' of mlstm forward");
  r = mpirun(dir_, {{1, fwd}, {1, "kernels"}});
  expect_one_line(r, 2, "mlstm: error: ", "the ranks run different subcommands");
  r = mpirun(dir_, {{2, fwd + " --bogus"}});  // the same error everywhere: said once
  expect_one_line(r, 2, "mlstm: error: ", "unknown option '--bogus' of mlstm forward");
  for (const auto& name : listing(out)) ADD_FAILURE() << "debris: " << name;
}

// 5e. What the ranks may give differently: --devices (test 4), --memory-limit, --json (rank 0 prints), another
// spelling of one output path, another path to an input of the same content.
TEST_F(CliMpi, RanksMayDifferInSpellingAndPerRankOptions) {
  testing::InputSpec spec = testing::spec(2, 3, 150, 8, 12);
  spec.initial_state = true;
  write_inputs(spec);
  const ChildRun one = cli(dir_, "forward " + inputs(16) + " --devices workers" + forward_outputs("one"));
  ASSERT_EQ(one.code, 0) << one.err;
  fs::copy_file(path("q"), path("q_copy"));
  const std::string respelt = (dir_ / "." / "spelt_h.npy").string();  // dir/./spelt_h.npy
  const ChildRun r = mpirun(dir_, {{1, "--json forward " + inputs(16) + " --out " + path("spelt_h")},
                                   {1, "forward " + inputs(16, "exp", path("q_copy")) + " --out " + respelt +
                                           " --memory-limit 1000000000 --devices workers"}});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(mlstm_lines(r.err).empty()) << r.err;
  expect_distributed_doc(doc_of(r), 2, 150, 16);
  expect_equal({"h"}, "spelt", "one", "mpirun, rank 1 given other spellings and per-rank options");
}

// 6. A forward that succeeds over an older file replaces it whole: the new file has exactly the new array's
// size and content (nothing of a longer older file left at its end), and it was renamed into place (a hard link
// to the older file still holds the older bytes: the older file was never written in place).
TEST_F(CliMpi, ASucceedingRunReplacesAnOlderFileWhole) {
  testing::InputSpec spec = testing::spec(2, 3, 150, 8, 12);
  spec.initial_state = true;
  write_inputs(spec);
  const ChildRun one = cli(dir_, "forward " + inputs(16) + " --devices workers" + forward_outputs("one"));
  ASSERT_EQ(one.code, 0) << one.err;

  const fs::path out = dir_ / "out";
  fs::create_directories(out);
  const fs::path h = out / "h.npy", link = dir_ / "older_h_link.npy";
  // an older, larger .npy of another shape
  npy::write(h.string(), Tensor::full({4, 3, 400, 12}, DType::f32, 7.0).view());
  const std::string older = bytes_of(h);
  fs::create_hard_link(h, link);

  const ChildRun r = mpirun(dir_, {{3, "forward " + inputs(16) + " --out " + h.string()}});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(listing(out), std::set<std::string>{"h.npy"});
  EXPECT_EQ(fs::file_size(h), fs::file_size(path("one_h"))) << "the older file's tail must not remain";
  const Tensor got = npy::read(h.string(), "h");
  EXPECT_EQ(got.shape(), (Shape{2, 3, 150, 12}));
  EXPECT_TRUE(testing::matches(got, npy::read(path("one_h"), "h"), kTol,
                               "mpirun -np 3 mlstm forward over an older file", "h", spec_));
  EXPECT_EQ(bytes_of(link), older) << "the older file was written in place, not replaced";
}

// 7. A report lost on rank 0's stdout (the only rank that writes there; here /dev/full) fails every rank with exit
// code 1, not rank 0 alone: the ranks exit with one code. The .npy output is written all the same. Each rank's own
// exit code is recorded by a wrapper (mpirun reports only one).
TEST_F(CliMpi, AReportLostOnRankZerosStdoutFailsEveryRank) {
  if (!fs::exists("/dev/full")) GTEST_SKIP() << "no /dev/full";
  testing::InputSpec spec = testing::spec(1, 2, 64, 8, 8);
  spec.initial_state = true;
  write_inputs(spec);
  const fs::path wrapper = dir_ / "rank.sh";
  put_bytes(wrapper,
            "rank=${OMPI_COMM_WORLD_RANK:-x}\n"
            "if [ \"$rank\" = 0 ]; then \"$@\" > /dev/full; else \"$@\"; fi\n"
            "code=$?\n"
            "echo $code > " +
                quoted((dir_ / "code.").string()) +
                "$rank\n"
                "exit $code\n");
  const std::string h = path("h");
  const ChildRun r = mpirun(dir_, {{2, "--json forward " + inputs(16) + " --out " + h}}, "", "sh " + wrapper.string());
  expect_one_line(r, 1, "mlstm: error: writing the output to stdout failed", "stdout");
  for (const char* rank : {"0", "1"}) {
    const fs::path code = dir_ / (std::string("code.") + rank);
    ASSERT_TRUE(fs::exists(code)) << "rank " << rank << " recorded no exit code";
    EXPECT_EQ(bytes_of(code), "1\n") << "rank " << rank << "'s exit code";
  }
  EXPECT_TRUE(fs::exists(h));
}

}  // namespace
}  // namespace mlstm
