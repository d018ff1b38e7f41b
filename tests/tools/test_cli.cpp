// The mlstm command line: every subcommand, .npy round trips against the library, and bad input
// (exit code 2 with one line naming the argument).
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <algorithm>
#include <array>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "mlstm/core/npy.hpp"
#include "mlstm/mlstm.hpp"
#include "test_util.hpp"

namespace mlstm {
namespace {

namespace fs = std::filesystem;

struct Run {
  int code = -1;
  std::string out, err;
};

// `shell` goes before the command (a pipe into it, `timeout 60 `).
Run run_cli(const std::string& args, const std::string& shell = "") {
  static int counter = 0;
  const fs::path err_file =
      fs::temp_directory_path() / ("mlstm_cli_err_" + std::to_string(getpid()) + "_" + std::to_string(counter++));
  const std::string cmd = shell + std::string(MLSTM_CLI_PATH) + " " + args + " 2>" + err_file.string();
  Run r;
  FILE* p = popen(cmd.c_str(), "r");
  std::array<char, 4096> buf{};
  while (p && fgets(buf.data(), buf.size(), p)) r.out += buf.data();
  const int status = p ? pclose(p) : -1;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::FILE* e = std::fopen(err_file.c_str(), "r");
  while (e && fgets(buf.data(), buf.size(), e)) r.err += buf.data();
  if (e) std::fclose(e);
  fs::remove(err_file);
  return r;
}

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("mlstm_cli_" + std::to_string(getpid()));
    fs::create_directories(dir_);
    spec_.B = 2;
    spec_.NH = 3;
    spec_.S = 50;
    spec_.DHQK = 8;
    spec_.DHHV = 12;
    spec_.initial_state = true;
    in_ = testing::make_inputs(spec_, testing::fresh_seed());
    save("q", in_.q);
    save("k", in_.k);
    save("v", in_.v);
    save("i", in_.i);
    save("f", in_.f);
    save("c0", in_.c0);
    save("n0", in_.n0);
    save("m0", in_.m0);
    save("dh", in_.dh);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / (name + ".npy")).string(); }
  void save(const std::string& name, const Tensor& t) { npy::write(path(name), t.view()); }
  // One step's inputs (the first token of the fixture's q, k, v; gates 0.5 and 2) as sq ... sf; returns the options
  // that name them.
  std::string save_step_inputs() {
    save("sq", testing::slice_seq(in_.q, 0, 1).reshaped({2, 3, 8}));
    save("sk", testing::slice_seq(in_.k, 0, 1).reshaped({2, 3, 8}));
    save("sv", testing::slice_seq(in_.v, 0, 1).reshaped({2, 3, 12}));
    save("si", Tensor::full({2, 3}, DType::f32, 0.5));
    save("sf", Tensor::full({2, 3}, DType::f32, 2.0));
    return "--q " + path("sq") + " --k " + path("sk") + " --v " + path("sv") + " --i " + path("si") + " --f " +
           path("sf");
  }
  // Packed inputs (initial states given) as pq ... pm0 (m0 as `m0`), pdh where there is a dh, and their offsets;
  // returns the options that name them.
  std::string save_packed(const testing::Inputs& in, const Tensor& m0) {
    for (auto [name, t] : {std::pair{"pq", &in.q},
                           {"pk", &in.k},
                           {"pv", &in.v},
                           {"pi", &in.i},
                           {"pf", &in.f},
                           {"pc0", &in.c0},
                           {"pn0", &in.n0},
                           {"pm0", &m0},
                           {"pdh", &in.dh}})
      if (!t->empty()) save(name, *t);
    npy::write_offsets(path("offsets"), in.cu_seqlens);
    return "--q " + path("pq") + " --k " + path("pk") + " --v " + path("pv") + " --i " + path("pi") + " --f " +
           path("pf") + " --c0 " + path("pc0") + " --n0 " + path("pn0") + " --m0 " + path("pm0") + " --cu-seqlens " +
           path("offsets");
  }
  std::string inputs() const {
    return "--q " + path("q") + " --k " + path("k") + " --v " + path("v") + " --i " + path("i") + " --f " + path("f");
  }
  fs::path dir_;
  testing::InputSpec spec_;
  testing::Inputs in_;
};

TEST_F(Cli, ForwardWritesWhatTheLibraryComputes) {
  const auto r = run_cli("forward " + inputs() + " --c0 " + path("c0") + " --n0 " + path("n0") + " --m0 " + path("m0") +
                         " --chunk-size 16 --out " + path("h") + " --out-c " + path("c"));
  ASSERT_EQ(r.code, 0) << r.err;
  MlstmOptions o;
  o.chunk_size = 16;
  const auto want = get_kernel("chunkwise--cpu_xl_chunk")->forward(in_.args(), o);
  EXPECT_TRUE(testing::matches(npy::read(path("h"), "h"), want.h, 0.0, "mlstm forward", "h", spec_));
  EXPECT_TRUE(testing::matches(npy::read(path("c"), "c"), want.c, 0.0, "mlstm forward", "c", spec_));
}

TEST_F(Cli, BackwardWritesGradientsIncludingInitialState) {
  const auto r = run_cli("backward " + inputs() + " --c0 " + path("c0") + " --n0 " + path("n0") + " --m0 " +
                         path("m0") + " --dh " + path("dh") + " --out-dq " + path("dq") + " --out-df " + path("df") +
                         " --out-dc0 " + path("dc0") + " --out-dm0 " + path("dm0"));
  ASSERT_EQ(r.code, 0) << r.err;
  const auto want = get_kernel("chunkwise--cpu_xl_chunk")->backward(in_.backward_args(false), MlstmOptions{});
  EXPECT_TRUE(testing::matches(npy::read(path("dq"), "dq"), want.dq, 0.0, "mlstm backward", "dq", spec_));
  EXPECT_TRUE(testing::matches(npy::read(path("df"), "df"), want.df, 0.0, "mlstm backward", "df", spec_));
  EXPECT_TRUE(testing::matches(npy::read(path("dc0"), "dc0"), want.dc0, 0.0, "mlstm backward", "dc0", spec_));
  EXPECT_TRUE(fs::exists(path("dm0")));
}

TEST_F(Cli, StepAndBfloat16Inputs) {
  save("q1", in_.q.to(DType::bf16).reshaped({2, 3, 50 * 8}));  // wrong rank for step on purpose below
  Tensor q = testing::slice_seq(in_.q, 0, 1).reshaped({2, 3, 8}).to(DType::bf16);
  Tensor k = testing::slice_seq(in_.k, 0, 1).reshaped({2, 3, 8}).to(DType::bf16);
  Tensor v = testing::slice_seq(in_.v, 0, 1).reshaped({2, 3, 12}).to(DType::bf16);
  Tensor i = Tensor::full({2, 3}, DType::f32, 0.5), f = Tensor::full({2, 3}, DType::f32, 2.0);
  save("sq", q);
  save("sk", k);
  save("sv", v);
  save("si", i);
  save("sf", f);
  const std::string step_in = "--q " + path("sq") + " --k " + path("sk") + " --v " + path("sv") + " --i " + path("si") +
                              " --f " + path("sf") + " --dtype bfloat16";
  const auto r = run_cli("step " + step_in + " --out " + path("sh") + " --out-c " + path("sc"));
  ASSERT_EQ(r.code, 0) << r.err;
  const Tensor h = npy::read(path("sh"), "h", DType::bf16);
  EXPECT_EQ(h.dtype(), DType::bf16);
  EXPECT_EQ(h.shape(), (Shape{2, 3, 12}));
}

TEST_F(Cli, KernelsDevicesRunAndBenchWork) {
  auto k = run_cli("--json kernels");
  ASSERT_EQ(k.code, 0) << k.err;
  EXPECT_NE(k.out.find("chunkwise--cpu_xl_chunk"), std::string::npos);
  auto d = run_cli("devices");
  ASSERT_EQ(d.code, 0) << d.err;
  EXPECT_NE(d.out.find("NUMA"), std::string::npos);
  // devices --open: the devices of a spec opened, and when (the start-up floor under a run's first token).
  auto o = run_cli("--json devices --open workers");
  ASSERT_EQ(o.code, 0) << o.err;
  const auto opened = nlohmann::json::parse(o.out);
  EXPECT_GE(opened["devices"].size(), 1u) << o.out;
  EXPECT_GE(opened["opened_after_seconds"].get<double>(), opened["open_seconds"].get<double>()) << o.out;
  for (const char* bad : {"--open gpu:99", "--open ''", "--open workers+"}) {
    const auto r = run_cli(std::string("devices ") + bad);
    EXPECT_EQ(r.code, 2) << bad;
    EXPECT_EQ(r.err.rfind("mlstm: error: --open:", 0), 0u) << bad << ": " << r.err;
  }
  auto r =
      run_cli("--json run --seq-len 3000 --piece 700 --heads 2 --dqk 16 --dhv 16 --dtype float32 --check-tokens 500");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("\"spot_check_ok\":true"), std::string::npos) << r.out;
  // No GPU here (PoCL's devices are CPUs): one forward call per piece, not the overlapped pinned stream.
  EXPECT_NE(r.out.find("\"overlapped\":false"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"balancing\":\"calibrated\""), std::string::npos) << "run's default: " << r.out;
  auto res = run_cli(
      "--json run --mode resident --seq-len 3000 --heads 2 --dqk 16 --dhv 16 --dtype float32 --check-tokens 500");
  ASSERT_EQ(res.code, 0) << res.err;
  EXPECT_NE(res.out.find("\"spot_check_ok\":true"), std::string::npos) << res.out;
  const std::string csv = (dir_ / "b.csv").string(), js = (dir_ / "b.json").string();
  auto b = run_cli(
      "bench --tokens 1024 --seq-lens 256 512 --chunk-sizes 64 --dqk 16 --dhv 16 --repeats 1 --backward --csv " + csv +
      " --json-out " + js);
  ASSERT_EQ(b.code, 0) << b.err;
  EXPECT_TRUE(fs::exists(csv));
  EXPECT_TRUE(fs::exists(js));
  // Probe 42: each CSV row says which sweep it belongs to, as the JSON does (the graph's strong, weak and streaming
  // rows of one spec were identical lines but for their times).
  auto g = run_cli(
      "bench --tokens 256 --seq-lens 128 --chunk-sizes 16 --dqk 8 --dhv 8 --repeats 1 --kernels "
      "chunkwise--cpu_xl_chunk --graph-devices workers --weak-seq-len 128 --csv " +
      csv + " --json-out " + js);
  ASSERT_EQ(g.code, 0) << g.err;
  const auto rows = nlohmann::json::parse(testing::slurp(js))["results"];
  std::istringstream lines(testing::slurp(csv));
  std::string line;
  std::getline(lines, line);
  EXPECT_EQ(line, "kernel,B,NH,S,DHQK,DHHV,dtype,chunk,pass,median_ms,tokens_per_s,sweep");
  std::size_t n = 0, swept = 0;
  for (; std::getline(lines, line); ++n) {
    ASSERT_LT(n, rows.size()) << line;
    const std::string sweep = rows[n].value("sweep", "");
    EXPECT_EQ(line.substr(line.rfind(',') + 1), sweep) << line;
    swept += sweep.empty() ? 0 : 1;
  }
  EXPECT_EQ(n, rows.size());
  EXPECT_GE(swept, 2u);
}

TEST_F(Cli, EverySubcommandHasHelp) {
  for (const char* sub : {"run", "forward", "backward", "step", "kernels", "devices", "bench"}) {
    const auto r = run_cli(std::string(sub) + " --help");
    EXPECT_EQ(r.code, 0) << sub;
    EXPECT_NE(r.out.find("--help"), std::string::npos) << sub;
  }
}

// Bad input: exit code 2, exactly one line on stderr, naming the argument.
void expect_bad_input(const Run& r, const std::string& argument) {
  EXPECT_EQ(r.code, 2) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find(argument), std::string::npos) << "stderr should name " << argument << ": " << r.err;
}

// --devices runs the flow graph over every device it names (CPU workers and both PoCL devices here), sequence
// parallel, equal to one kernel call; --json lists the devices that took part. With --kernel, a spec naming
// several devices is refused, never cut to one.
TEST_F(Cli, ForwardAndBackwardThroughTheFlowGraph) {
  const std::string state = " --c0 " + path("c0") + " --n0 " + path("n0") + " --m0 " + path("m0");
  const auto f = run_cli("--json forward " + inputs() + state + " --chunk-size 8 --devices workers+all --out " +
                         path("gh") + " --out-c " + path("gc"));
  ASSERT_EQ(f.code, 0) << f.err;
  MlstmOptions o;
  o.chunk_size = 8;
  const auto want = get_kernel("chunkwise--cpu_xl_chunk")->forward(in_.args(), o);
  EXPECT_TRUE(testing::matches(npy::read(path("gh"), "h"), want.h, 1e-4, "mlstm forward --devices", "h", spec_));
  EXPECT_TRUE(testing::matches(npy::read(path("gc"), "c"), want.c, 1e-4, "mlstm forward --devices", "c", spec_));
  const auto out = nlohmann::json::parse(f.out);
  ASSERT_TRUE(out.contains("devices")) << f.out;
  EXPECT_GE(out["devices"].size(), 3u) << f.out;  // the CPU worker(s) and two PoCL devices
  EXPECT_EQ(out["kernel"], "flow-graph");

  const auto b =
      run_cli("--json backward " + inputs() + state + " --chunk-size 8 --devices workers+all --dh " + path("dh") +
              " --out-dq " + path("gdq") + " --out-df " + path("gdf") + " --out-dc0 " + path("gdc0"));
  ASSERT_EQ(b.code, 0) << b.err;
  const auto grads = get_kernel("chunkwise--cpu_xl_chunk")->backward(in_.backward_args(false), o);
  EXPECT_TRUE(testing::matches(npy::read(path("gdq"), "dq"), grads.dq, 1e-4, "mlstm backward --devices", "dq", spec_));
  EXPECT_TRUE(testing::matches(npy::read(path("gdf"), "df"), grads.df, 1e-4, "mlstm backward --devices", "df", spec_));
  EXPECT_TRUE(
      testing::matches(npy::read(path("gdc0"), "dc0"), grads.dc0, 1e-4, "mlstm backward --devices", "dc0", spec_));
  EXPECT_GE(nlohmann::json::parse(b.out)["devices"].size(), 3u) << b.out;

  // One named OpenCL device with an OpenCL kernel: that kernel on that device.
  const auto one =
      run_cli("--json forward " + inputs() + " --kernel chunkwise--opencl_xl_chunk --devices 1 --out " + path("oh"));
  ASSERT_EQ(one.code, 0) << one.err;
  EXPECT_EQ(nlohmann::json::parse(one.out)["devices"].size(), 1u) << one.out;
  expect_bad_input(
      run_cli("forward " + inputs() + " --kernel chunkwise--opencl_xl_chunk --devices all --out " + path("x")),
      "--devices");
  expect_bad_input(
      run_cli("forward " + inputs() + " --kernel chunkwise--cpu_xl_chunk --devices workers --out " + path("x")),
      "--devices");
  expect_bad_input(run_cli("forward " + inputs() + " --devices workers+ --out " + path("x")), "--devices");
}

// --cu-seqlens: packed sequences (issue 19) through one kernel and through the flow graph, forward and backward,
// equal to the library's packed call; last states and initial-state gradients are (N,...); offsets that are not
// int64, not increasing, not from 0 to S, or of a batch of two rows are refused naming --cu-seqlens.
TEST_F(Cli, PackedSequences) {
  const std::vector<std::int64_t> lengths{1, 7, 8, 9, 25};
  testing::InputSpec s = spec_;
  s.initial_state = true;
  const testing::Inputs in = testing::make_packed_inputs(lengths, s, testing::fresh_seed());
  const std::string packed = save_packed(in, in.m0) + " --chunk-size 8";
  MlstmOptions o;
  o.chunk_size = 8;
  const auto kernel = get_kernel("chunkwise--cpu_xl_chunk");
  const auto want = kernel->forward(in.args(), o);
  const auto grads = kernel->backward(in.backward_args(false), o);
  ASSERT_EQ(want.c.dim(0), 5);
  for (const std::string& devices : {std::string(), std::string(" --devices workers+all")}) {
    const double tol = devices.empty() ? 0.0 : 1e-4;
    const auto f = run_cli("--json forward " + packed + devices + " --out " + path("ph") + " --out-c " + path("pc") +
                           " --out-m " + path("pm"));
    ASSERT_EQ(f.code, 0) << f.err;
    EXPECT_EQ(nlohmann::json::parse(f.out)["packed_sequences"], 5) << f.out;
    EXPECT_TRUE(
        testing::matches(npy::read(path("ph"), "h"), want.h, tol, "mlstm forward --cu-seqlens" + devices, "h", s));
    EXPECT_TRUE(
        testing::matches(npy::read(path("pc"), "c"), want.c, tol, "mlstm forward --cu-seqlens" + devices, "c", s));
    EXPECT_TRUE(
        testing::matches(npy::read(path("pm"), "m"), want.m, tol, "mlstm forward --cu-seqlens" + devices, "m", s));
    const auto b = run_cli("backward " + packed + devices + " --dh " + path("pdh") + " --out-dq " + path("pdq") +
                           " --out-df " + path("pdf") + " --out-dc0 " + path("pdc0"));
    ASSERT_EQ(b.code, 0) << b.err;
    EXPECT_TRUE(testing::matches(npy::read(path("pdq"), "dq"), grads.dq, tol, "mlstm backward --cu-seqlens", "dq", s));
    EXPECT_TRUE(testing::matches(npy::read(path("pdf"), "df"), grads.df, tol, "mlstm backward --cu-seqlens", "df", s));
    EXPECT_TRUE(
        testing::matches(npy::read(path("pdc0"), "dc0"), grads.dc0, tol, "mlstm backward --cu-seqlens", "dc0", s));
  }
  // Bad offsets, each refused in one line naming --cu-seqlens.
  const std::string plain = "--q " + path("pq") + " --k " + path("pk") + " --v " + path("pv") + " --i " + path("pi") +
                            " --f " + path("pf") + " --out " + path("x");
  const std::int64_t S = in.cu_seqlens.back();
  for (const auto& bad : std::vector<std::vector<std::int64_t>>{{1, S}, {0, 9, 5, S}, {0, 9, S - 1}, {0}, {0, 0, S}}) {
    npy::write_offsets(path("bad"), bad);
    expect_bad_input(run_cli("forward " + plain + " --cu-seqlens " + path("bad")), "--cu-seqlens");
  }
  save("bad32", Tensor::from(std::vector<float>{0.f, static_cast<float>(S)}, {2}));  // float32, not int64
  expect_bad_input(run_cli("forward " + plain + " --cu-seqlens " + path("bad32")), "--cu-seqlens");
  npy::write_offsets(path("two"), std::vector<std::int64_t>{0, 20, 50});
  expect_bad_input(run_cli("forward " + inputs() + " --out " + path("x") + " --cu-seqlens " + path("two")),
                   "--cu-seqlens");  // B = 2 rows
  // (N,...) states are expected: the unpacked (1,...) c0 is refused naming --c0.
  save("c0one", Tensor::zeros({1, s.NH, s.DHQK, s.DHHV}, DType::f32));
  expect_bad_input(run_cli("forward " + plain + " --cu-seqlens " + path("offsets") + " --c0 " + path("c0one") +
                           " --n0 " + path("pn0") + " --m0 " + path("pm0")),
                   "--c0");
}

// --balancing (graph::Balancing, Python's balancing=): a bad value is refused by the parser in one line; fastest
// over the two PoCL devices gives the h of one kernel call, and --json records it beside the devices; where no
// flow graph runs (one kernel call: no --devices, or --kernel) it is refused, never ignored.
TEST_F(Cli, BalancingOfTheFlowGraph) {
  const testing::ScopedEnv kill_after("MLSTM_TEST_KILL_AFTER_SLICES", nullptr);
  const std::string state = " --c0 " + path("c0") + " --n0 " + path("n0") + " --m0 " + path("m0");
  for (const char* bad : {"fast", "Pull", "''"}) {
    expect_bad_input(run_cli("forward " + inputs() + " --devices 0,1 --balancing " + bad + " --out " + path("x")),
                     "--balancing");
  }
  expect_bad_input(
      run_cli("backward " + inputs() + " --devices 0,1 --dh " + path("dh") + " --balancing nope --out-dq " + path("x")),
      "--balancing");
  expect_bad_input(run_cli("run --seq-len 100 --balancing nope"), "--balancing");

  const auto f = run_cli("--json forward " + inputs() + state +
                         " --chunk-size 8 --devices 0,1 --balancing fastest --out " + path("fh"));
  ASSERT_EQ(f.code, 0) << f.err;
  MlstmOptions o;
  o.chunk_size = 8;
  const auto want = get_kernel("chunkwise--cpu_xl_chunk")->forward(in_.args(), o);
  EXPECT_TRUE(
      testing::matches(npy::read(path("fh"), "h"), want.h, 1e-4, "mlstm forward --balancing fastest", "h", spec_));
  const auto out = nlohmann::json::parse(f.out);
  EXPECT_EQ(out["balancing"], "fastest") << f.out;
  EXPECT_GE(out["devices"].size(), 1u) << f.out;  // one device alone when it measured faster, else both
  const auto b =
      run_cli("--json backward " + inputs() + state + " --chunk-size 8 --devices 0,1 --balancing calibrated --dh " +
              path("dh") + " --out-dq " + path("bdq"));
  ASSERT_EQ(b.code, 0) << b.err;
  const auto grads = get_kernel("chunkwise--cpu_xl_chunk")->backward(in_.backward_args(false), o);
  EXPECT_TRUE(testing::matches(npy::read(path("bdq"), "dq"), grads.dq, 1e-4, "mlstm backward --balancing calibrated",
                               "dq", spec_));
  EXPECT_EQ(nlohmann::json::parse(b.out)["balancing"], "calibrated") << b.out;
  const auto one = run_cli("--json forward " + inputs() + " --out " + path("kh"));
  ASSERT_EQ(one.code, 0) << one.err;
  EXPECT_TRUE(nlohmann::json::parse(one.out)["balancing"].is_null()) << "one kernel call: " << one.out;

  // A streamed run's progress record holds its balancing: a resume with another is refused naming it, the same
  // one resumes.
  kill_after.set("1");
  (void)run_cli("forward " + inputs() + " --devices workers --stream-tokens 16 --out " + path("sh"));
  kill_after.set(nullptr);
  ASSERT_TRUE(fs::exists(dir_ / ".sh.npy.progress"));
  expect_bad_input(run_cli("forward " + inputs() + " --devices workers --balancing calibrated --stream-tokens 16 " +
                           "--resume --out " + path("sh")),
                   "--balancing");
  const auto resumed = run_cli("forward " + inputs() + " --devices workers --balancing pull --stream-tokens 16 " +
                               "--resume --out " + path("sh"));
  EXPECT_EQ(resumed.code, 0) << resumed.err;

  // No flow graph, nothing to balance: refused with the reason, nothing written.
  expect_bad_input(run_cli("forward " + inputs() + " --balancing pull --out " + path("x")), "--balancing");
  expect_bad_input(run_cli("forward " + inputs() + " --balancing fastest --stream-tokens 16 --out " + path("x")),
                   "--balancing");
  const auto with_kernel = run_cli("backward " + inputs() + " --kernel chunkwise--opencl_xl_chunk --devices 0 --dh " +
                                   path("dh") + " --balancing fastest --out-dq " + path("x"));
  expect_bad_input(with_kernel, "--balancing");
  EXPECT_NE(with_kernel.err.find("one kernel call"), std::string::npos) << with_kernel.err;
  EXPECT_FALSE(fs::exists(path("x")));
}

TEST_F(Cli, BadInputNamesTheArgument) {
  const std::string out = " --out " + path("h");
  expect_bad_input(run_cli("forward --q " + path("missing") + " --k " + path("k") + " --v " + path("v") + " --i " +
                           path("i") + " --f " + path("f") + out),
                   "--q");
  save("k_bad", Tensor::zeros({2, 3, 50, 9}, DType::f32));  // mismatched DHQK
  expect_bad_input(run_cli("forward --q " + path("q") + " --k " + path("k_bad") + " --v " + path("v") + " --i " +
                           path("i") + " --f " + path("f") + out),
                   "--k");
  save("i_bad", Tensor::zeros({2, 3, 49}, DType::f32));  // wrong shape
  expect_bad_input(run_cli("forward --q " + path("q") + " --k " + path("k") + " --v " + path("v") + " --i " +
                           path("i_bad") + " --f " + path("f") + out),
                   "--i");
  Tensor v_nan = in_.v;
  v_nan.data<float>()[17] = NAN;
  save("v_nan", v_nan);
  expect_bad_input(run_cli("forward --check-finite --q " + path("q") + " --k " + path("k") + " --v " + path("v_nan") +
                           " --i " + path("i") + " --f " + path("f") + out),
                   "--v");
  expect_bad_input(run_cli("forward " + inputs() + " --kernel chunkwise--nope" + out), "--kernel");
  expect_bad_input(run_cli("forward " + inputs() + " --chunk-size 0" + out), "--chunk-size");
  expect_bad_input(run_cli("backward " + inputs() + " --dh " + path("q") + " --out-dq " + path("x")), "--dh");
  expect_bad_input(run_cli("forward " + inputs()), "--out");  // missing required option
}

// ---- issue 21: probing the CLI as a new user -------------------------------------------------------------

// Outputs: an output that cannot be produced is refused before any compute (exit 2 naming the option), not
// skipped or reported with exit 0; outputs may not be the same file as each other or an input (compared
// by inode / canonical path, not by string); nothing is left behind.
TEST_F(Cli, OutputsThatCannotBeProducedAreRefusedUpFront) {
  const std::string missing_dir = (dir_ / "no_such_dir").string();
  // bench used to exit 0 after failing to write --json-out (an unchecked std::ofstream).
  expect_bad_input(run_cli("bench --tokens 64 --seq-lens 32 --chunk-sizes 16 --dqk 8 --dhv 8 --repeats 1 --kernels "
                           "chunkwise--cpu_xl_chunk --csv " +
                           path("b_csv") + " --json-out " + missing_dir + "/b.json"),
                   "--json-out");
  EXPECT_FALSE(fs::exists(path("b_csv")));
  expect_bad_input(run_cli("bench --tokens 64 --seq-lens 32 --chunk-sizes 16 --dqk 8 --dhv 8 --repeats 1 --csv " +
                           path("b") + " --json-out " + (dir_ / "." / "b.npy").string()),
                   "--json-out");
  expect_bad_input(run_cli("forward " + inputs() + " --out " + missing_dir + "/h.npy"), "--out");
  // An empty path (the fuzzer: it read as "not given", so h was computed, not written, and the exit code 0).
  expect_bad_input(run_cli("forward " + inputs() + " --out ''"), "--out");
  expect_bad_input(run_cli("forward " + inputs() + " --out " + path("h") + " --out-c ''"), "--out-c");
  expect_bad_input(run_cli("bench --tokens 64 --seq-lens 32 --csv " + path("b") + " --json-out ''"), "--json-out");
  expect_bad_input(run_cli("forward " + inputs() + " --out " + dir_.string()), "--out");
  expect_bad_input(run_cli("forward " + inputs() + " --out " + path("h") + " --out-c " +
                           (dir_ / ".." / dir_.filename() / "h.npy").string()),
                   "--out-c");
  // The input q through another spelling, a symlink and a hard link: each refused, q left as it was.
  const auto q_before = npy::read(path("q"), "q");
  fs::create_symlink(path("q"), path("q_sym"));
  fs::create_hard_link(path("q"), path("q_hard"));
  for (const std::string& alias : {(dir_ / "." / "q.npy").string(), path("q_sym"), path("q_hard")}) {
    expect_bad_input(run_cli("forward " + inputs() + " --out " + alias), "--out");
  }
  expect_bad_input(run_cli("step --q " + path("q") + " --k " + path("k") + " --v " + path("v") + " --i " + path("i") +
                           " --f " + path("f") + " --out " + path("x") + " --out-m " + path("i")),
                   "--out-m");
  EXPECT_TRUE(testing::matches(npy::read(path("q"), "q"), q_before, 0.0, "mlstm forward", "q", spec_));
  // Gradients of an initial state that was not given: refused, not silently skipped.
  expect_bad_input(
      run_cli("backward " + inputs() + " --dh " + path("dh") + " --out-dq " + path("dq") + " --out-dc0 " + path("dc0")),
      "--out-dc0");
  EXPECT_FALSE(fs::exists(path("dq")));
  // Nothing but the files made here is in the directory (no temporary files).
  for (const auto& e : fs::directory_iterator(dir_)) {
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();
  }
}

std::string bytes_of(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// The files a run makes or removes next to an output (a stream's partial file `.<out>.partial` and progress record
// `.<out>.progress`, temporary files `.<out>.tmp.<pid>.XXXXXX` and the stale ones the next writer removes) are
// never an input or another output: refused up front naming the user's option, every file left as it was. Before
// (probe 39): --out-c onto the partial file wrote C into h.npy, onto the progress record lost C, and an input so
// named was deleted, all with exit 0.
TEST_F(Cli, WorkingFilesOfAnOutputAreNeverTheUsers) {
  auto sub = [&](const std::string& name) {
    fs::create_directories(dir_ / name);
    return dir_ / name;
  };
  auto expect_only = [](const fs::path& d, std::vector<std::string> names) {
    std::vector<std::string> got;
    for (const auto& e : fs::directory_iterator(d)) got.push_back(e.path().filename().string());
    std::sort(got.begin(), got.end());
    std::sort(names.begin(), names.end());
    EXPECT_EQ(got, names) << d;
  };
  const std::string q_bytes = bytes_of(path("q"));
  // 1a, 1b: an output onto --out's partial file or progress record.
  const fs::path d1 = sub("d1"), d2 = sub("d2");
  expect_bad_input(run_cli("forward " + inputs() + " --out " + (d1 / "h.npy").string() + " --out-c " +
                           (d1 / ".h.npy.partial").string() + " --stream-tokens 8"),
                   "--out-c");
  expect_only(d1, {});
  expect_bad_input(run_cli("forward " + inputs() + " --out " + (d2 / "h.npy").string() + " --out-c " +
                           (d2 / ".h.npy.progress").string() + " --stream-tokens 8"),
                   "--out-c");
  expect_only(d2, {});
  // Through another spelling of the directory too.
  expect_bad_input(run_cli("forward " + inputs() + " --out " + (d2 / "h.npy").string() + " --out-n " +
                           (d2 / ".." / "d2" / ".h.npy.partial").string() + " --stream-tokens 8"),
                   "--out-n");
  // 1c: an input named like the partial file (deleted before), 1d: like a dead writer's temporary file of --out
  // (removed by the stale-temporary cleanup before).
  const fs::path d3 = sub("d3"), d4 = sub("d4");
  fs::copy_file(path("q"), d3 / ".h.npy.partial");
  const auto r3 =
      run_cli("forward --q " + (d3 / ".h.npy.partial").string() + " --k " + path("k") + " --v " + path("v") + " --i " +
              path("i") + " --f " + path("f") + " --out " + (d3 / "h.npy").string() + " --stream-tokens 8");
  expect_bad_input(r3, "--q");
  EXPECT_NE(r3.err.find("partial file of --out"), std::string::npos) << r3.err;
  expect_only(d3, {".h.npy.partial"});
  EXPECT_TRUE(bytes_of(d3 / ".h.npy.partial") == q_bytes);
  fs::copy_file(path("q"), d4 / ".h.npy.tmp.abcdef");
  const auto r4 = run_cli("forward --q " + (d4 / ".h.npy.tmp.abcdef").string() + " --k " + path("k") + " --v " +
                          path("v") + " --i " + path("i") + " --f " + path("f") + " --out " + (d4 / "h.npy").string());
  expect_bad_input(r4, "--q");
  EXPECT_NE(r4.err.find("temporary file of --out"), std::string::npos) << r4.err;
  expect_only(d4, {".h.npy.tmp.abcdef"});
  // A symbolic link to such a file: the cleanup would remove its target.
  fs::create_symlink(d4 / ".h.npy.tmp.abcdef", dir_ / "q_link.npy");
  expect_bad_input(run_cli("forward --q " + (dir_ / "q_link.npy").string() + " --k " + path("k") + " --v " + path("v") +
                           " --i " + path("i") + " --f " + path("f") + " --out " + (d4 / "h.npy").string()),
                   "--q");
  EXPECT_TRUE(bytes_of(d4 / ".h.npy.tmp.abcdef") == q_bytes);
  // Every subcommand that writes: an output onto another's temporary file (the current name, with a pid), the
  // progress record's temporary file, backward's and step's inputs, bench's outputs.
  const fs::path d5 = sub("d5");
  expect_bad_input(run_cli("forward " + inputs() + " --out " + (d5 / "h.npy").string() + " --out-m " +
                           (d5 / ".h.npy.tmp.4242.Ab12Cd").string()),
                   "--out-m");
  expect_bad_input(run_cli("forward " + inputs() + " --out " + (d5 / "h.npy").string() + " --out-c " +
                           (d5 / "..h.npy.progress.tmp.7.abcdef").string() + " --stream-tokens 8"),
                   "--out-c");
  fs::copy_file(path("dh"), d5 / ".dq.npy.tmp.1.zzzzzz");
  expect_bad_input(run_cli("backward " + inputs() + " --dh " + (d5 / ".dq.npy.tmp.1.zzzzzz").string() + " --out-dq " +
                           (d5 / "dq.npy").string()),
                   "--dh");
  fs::copy_file(path("c0"), d5 / ".sh.npy.partial");
  expect_bad_input(
      run_cli("step --q " + path("q") + " --k " + path("k") + " --v " + path("v") + " --i " + path("i") + " --f " +
              path("f") + " --c " + (d5 / ".sh.npy.partial").string() + " --out " + (d5 / "sh.npy").string()),
      "--c");
  expect_bad_input(run_cli("bench --tokens 64 --seq-lens 32 --chunk-sizes 16 --dqk 8 --dhv 8 --repeats 1 --kernels "
                           "chunkwise--cpu_xl_chunk --csv " +
                           (d5 / "b.csv").string() + " --json-out " + (d5 / ".b.csv.progress").string()),
                   "--json-out");
  expect_only(d5, {".dq.npy.tmp.1.zzzzzz", ".sh.npy.partial"});
  EXPECT_TRUE(bytes_of(d5 / ".dq.npy.tmp.1.zzzzzz") == bytes_of(path("dh")));
  // Names that are not working files are outputs like any other.
  const fs::path d6 = sub("d6");
  const auto ok = run_cli("forward " + inputs() + " --out " + (d6 / "h.npy").string() + " --out-c " +
                          (d6 / "h.npy.partial").string() + " --out-n " + (d6 / ".h.npy.tmp.abcde").string() +
                          " --stream-tokens 8");
  EXPECT_EQ(ok.code, 0) << ok.err;
  expect_only(d6, {"h.npy", "h.npy.partial", ".h.npy.tmp.abcde"});
}

// An input that is not a regular file is refused up front naming its option, in every subcommand: a FIFO (read
// whole for its header, then opened again: the run hung), a pipe (`<(cat q.npy)`, /dev/stdin: "bad magic" about a
// valid stream), a directory ("bad magic"), a character device. --stream-tokens had a check of its own; one now.
TEST_F(Cli, InputsThatAreNotRegularFilesAreRefusedNamingTheOption) {
  const fs::path fifo = dir_ / "fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  const std::string rest = " --k " + path("k") + " --v " + path("v") + " --i " + path("i") + " --f " + path("f");
  auto expect_not_regular = [](const mlstm::Run& r, const std::string& option, const std::string& what) {
    expect_bad_input(r, option + ": ");
    EXPECT_NE(r.err.find("is not a regular file (" + what), std::string::npos) << r.err;
  };
  // A FIFO fed by a writer (the probe's reproducer), and one without (the streamed reader's open blocked).
  const std::string writer = "(timeout 10 cat " + path("q") + " > " + fifo.string() + " &) >/dev/null 2>&1; ";
  expect_not_regular(run_cli("forward --q " + fifo.string() + rest + " --out " + path("h"), writer + "timeout 60 "),
                     "--q", "a FIFO");
  expect_not_regular(run_cli("forward " + inputs() + " --out " + path("h") + " --stream-tokens 8 --c0 " +
                                 fifo.string() + " --n0 " + path("n0") + " --m0 " + path("m0"),
                             "timeout 60 "),
                     "--c0", "a FIFO");
  expect_not_regular(run_cli("forward --q /dev/stdin" + rest + " --out " + path("h"), "cat " + path("q") + " | "),
                     "--q", "a FIFO");
  expect_not_regular(run_cli("forward --q " + dir_.string() + rest + " --out " + path("h")), "--q", "a directory");
  expect_not_regular(
      run_cli("forward " + inputs() + " --out " + path("h") + " --stream-tokens 8 --cu-seqlens /dev/null"),
      "--cu-seqlens", "a character device");
  expect_not_regular(run_cli("backward " + inputs() + " --dh /dev/null --out-dq " + path("dq")), "--dh",
                     "a character device");
  expect_not_regular(run_cli("step --q " + path("q") + " --k " + path("k") + " --v " + path("v") + " --i " + path("i") +
                             " --f " + path("f") + " --c " + dir_.string() + " --out " + path("sh")),
                     "--c", "a directory");
  EXPECT_FALSE(fs::exists(path("h")));
  EXPECT_FALSE(fs::exists(path("dq")));
  EXPECT_FALSE(fs::exists(path("sh")));
}

// MLSTM_GRAPH_DOT (the flow graph's DOT dump) is an output of the CLI: checked up front with the others, so that
// it never overwrites an input (the probe: q replaced by the DOT text, exit 0) or another output, and a path that
// cannot be written is exit 2 naming it (it was a warning, exit 0).
TEST_F(Cli, GraphDotIsCheckedLikeAnOutput) {
  const testing::ScopedEnv dot("MLSTM_GRAPH_DOT", nullptr);
  fs::copy_file(path("q"), path("qcopy"));
  const std::string q_bytes = bytes_of(path("qcopy"));
  const std::string graph_run = "forward --q " + path("qcopy") + " --k " + path("k") + " --v " + path("v") + " --i " +
                                path("i") + " --f " + path("f") + " --devices workers --out " + path("h");
  auto refused = [&](const std::string& value, const std::string& args) {
    dot.set(value.c_str());
    expect_bad_input(run_cli(args), "MLSTM_GRAPH_DOT: ");
  };
  refused(path("qcopy"), graph_run);
  EXPECT_TRUE(bytes_of(path("qcopy")) == q_bytes);
  refused((dir_ / "." / "h.npy").string(), graph_run);
  refused(dir_.string(), graph_run);
  refused((dir_ / "missing" / "g.dot").string(), graph_run);
  refused((dir_ / ".h.npy.partial").string(), graph_run + " --stream-tokens 8");
  refused((dir_ / "missing" / "g.dot").string(), "run --seq-len 64 --heads 1 --dqk 8 --dhv 8 --devices workers");
  EXPECT_FALSE(fs::exists(path("h")));
  dot.set((dir_ / "g.dot").c_str());
  const auto r = run_cli(graph_run);
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(bytes_of(dir_ / "g.dot").rfind("digraph", 0), 0u);
  EXPECT_TRUE(bytes_of(path("qcopy")) == q_bytes);
}

// A huge --chunk-size used to segfault (2^62) or throw bad_alloc (2^31): a chunk longer than the sequence
// is the sequence, and values past 2^31 - 1 are refused. On OpenCL a chunk of 2^32 (0 in 32 bits) hung.
TEST_F(Cli, HugeChunkSizesAreTheSequenceOrRefused) {
  ASSERT_EQ(run_cli("forward " + inputs() + " --chunk-size 50 --out " + path("h50")).code, 0);
  const auto r = run_cli("forward " + inputs() + " --chunk-size 2147483647 --out " + path("hbig"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(testing::matches(npy::read(path("hbig"), "h"), npy::read(path("h50"), "h"), 0.0, "chunk", "h", spec_));
  for (const char* value : {"2147483648", "4611686018427387904", "9223372036854775807", "-1", "0"}) {
    expect_bad_input(run_cli("forward " + inputs() + " --chunk-size " + value + " --out " + path("h")), "--chunk-size");
  }
  expect_bad_input(run_cli("forward " + inputs() +
                           " --kernel chunkwise--opencl_xl_chunk --chunk-size 4294967296 --out " + path("h")),
                   "--chunk-size");
  expect_bad_input(run_cli("backward " + inputs() + " --dh " + path("dh") +
                           " --chunk-size 99999999999999999999 --out-dq " + path("dq")),
                   "--chunk-size");
  expect_bad_input(run_cli("run --seq-len 100 --chunk-size 4294967296"), "--chunk-size");
}

// --chunk-size auto (the default): the size the devices choose, which --json reports; the run equals the run that
// names it, bit for bit, on one kernel and through the graph's CPU workers. Anything but auto or a size is refused
// naming the option, in every subcommand that takes it.
TEST_F(Cli, AnAutomaticChunkSizeIsReportedAndEqualsNamingIt) {
  for (const std::string engine : {"", " --devices workers"}) {
    const auto a = run_cli("--json forward " + inputs() + engine + " --out " + path("ha"));
    ASSERT_EQ(a.code, 0) << a.err;
    const auto b = run_cli("--json forward " + inputs() + engine + " --chunk-size auto --out " + path("hb"));
    ASSERT_EQ(b.code, 0) << b.err;
    const auto ja = nlohmann::json::parse(a.out), jb = nlohmann::json::parse(b.out);
    ASSERT_TRUE(ja.contains("chunk_size")) << a.out;
    const std::int64_t L = ja["chunk_size"];
    EXPECT_GE(L, 1);
    EXPECT_EQ(jb["chunk_size"], L);
    const auto c =
        run_cli("--json forward " + inputs() + engine + " --chunk-size " + std::to_string(L) + " --out " + path("hc"));
    ASSERT_EQ(c.code, 0) << c.err;
    EXPECT_EQ(nlohmann::json::parse(c.out)["chunk_size"], L);
    EXPECT_EQ(testing::slurp(path("ha")), testing::slurp(path("hc"))) << engine;
    EXPECT_EQ(testing::slurp(path("hb")), testing::slurp(path("hc"))) << engine;
    const auto g = run_cli("--json backward " + inputs() + engine + " --dh " + path("dh") + " --out-dq " + path("dq"));
    ASSERT_EQ(g.code, 0) << g.err;
    EXPECT_EQ(nlohmann::json::parse(g.out)["chunk_size"], L) << g.out;
  }
  for (const char* value : {"Auto", "fast", "", "12x", "0x40"}) {
    expect_bad_input(run_cli("forward " + inputs() + " --chunk-size '" + value + "' --out " + path("h")),
                     "--chunk-size");
  }
  expect_bad_input(run_cli("run --seq-len 100 --chunk-size none"), "--chunk-size");
}

// bench died on --seq-lens 0 (SIGFPE) and --repeats 0 (SIGSEGV); a sequence length that does not divide
// --tokens was skipped silently.
TEST_F(Cli, BenchRefusesBadSizes) {
  const std::string base =
      "bench --tokens 64 --chunk-sizes 16 --dqk 8 --dhv 8 --csv " + path("b1") + " --json-out " + path("b2");
  expect_bad_input(run_cli(base + " --seq-lens 0"), "--seq-lens");
  expect_bad_input(run_cli(base + " --seq-lens -32"), "--seq-lens");
  expect_bad_input(run_cli(base + " --seq-lens 48"), "--seq-lens");
  expect_bad_input(run_cli(base + " --seq-lens 128"), "--seq-lens");
  expect_bad_input(run_cli(base + " --seq-lens 32 --repeats 0"), "--repeats");
  expect_bad_input(run_cli(base + " --seq-lens 32 --chunk-sizes 0"), "--chunk-sizes");
  expect_bad_input(run_cli(base + " --seq-lens 32 --heads 0"), "--heads");
  expect_bad_input(run_cli(base + " --seq-lens 32 --head-dims 0"), "--head-dims");
  expect_bad_input(run_cli(base + " --seq-lens 32 --kernels nope"), "--kernels");
  expect_bad_input(run_cli(base + " --seq-lens 32 --kernels cpu"), "--kernels");
  // Probe 42: a value named twice in a list option was measured twice (or dropped unseen): refused.
  expect_bad_input(run_cli(base + " --seq-lens 32 --kernels chunkwise--cpu_xl_chunk chunkwise--cpu_xl_chunk"),
                   "--kernels");
  expect_bad_input(run_cli(base + " --seq-lens 32 32"), "--seq-lens");
  expect_bad_input(run_cli(base + " --seq-lens 32 --chunk-sizes 16 16"), "--chunk-sizes");
  expect_bad_input(run_cli(base + " --seq-lens 32 --head-dims 8 8"), "--head-dims");
  expect_bad_input(run_cli(base + " --seq-lens 32 --graph-devices workers workers"), "--graph-devices");
  expect_bad_input(
      run_cli("bench --system --system-tokens 4096 4096 --csv " + path("b1") + " --json-out " + path("b2")),
      "--system-tokens");
  expect_bad_input(
      run_cli("bench --system --system-problems 2x16x16 02x16x16 --csv " + path("b1") + " --json-out " + path("b2")),
      "--system-problems");
  expect_bad_input(run_cli("bench --tokens 4611686018427387904 --seq-lens 32"), "--tokens");
  expect_bad_input(run_cli(base + " --seq-lens 32 --dqk 1099511627776 --dhv 1099511627776"), "--dqk");
  EXPECT_FALSE(fs::exists(path("b1")));
}

// Every option has an effect or is refused: --no-normalize with the exp gate, --devices with a CPU kernel,
// --gate against a kernel that fixes it, --piece in resident mode, --weak-seq-len without --graph-devices,
// --backward in pipeline mode were silently ignored.
TEST_F(Cli, OptionsWithoutEffectAreRefused) {
  expect_bad_input(run_cli("forward " + inputs() + " --no-normalize --out " + path("h")), "--no-normalize");
  expect_bad_input(run_cli("forward " + inputs() + " --devices gpu:7 --out " + path("h")), "--devices");
  expect_bad_input(
      run_cli("forward " + inputs() + " --kernel chunkwise--cpu_xl_chunk_siging --gate exp --out " + path("h")),
      "--gate");
  expect_bad_input(run_cli("forward " + inputs() + " --kernel cpu --out " + path("h")), "--kernel");
  expect_bad_input(run_cli("backward " + inputs() + " --kernel sequence--cpu --dh " + path("dh")), "--kernel");
  expect_bad_input(run_cli("run --mode resident --piece 100 --seq-len 200"), "--piece");
  expect_bad_input(run_cli("run --mode pipeline --backward --seq-len 200"), "--backward");
  // pipeline asks for the GPU's pinned-staging stream: refused (before the run) when the engine chose another.
  expect_bad_input(run_cli("run --mode pipeline --devices workers --seq-len 200 --heads 1 --dqk 16 --dhv 16"),
                   "--mode");
  expect_bad_input(
      run_cli("bench --tokens 64 --seq-lens 32 --weak-seq-len 64 --csv " + path("b1") + " --json-out " + path("b2")),
      "--weak-seq-len");
  // ... and where they do apply they work: the sigmoid gate without the normaliser differs from with it.
  ASSERT_EQ(run_cli("forward " + inputs() + " --gate sig --out " + path("hs")).code, 0);
  ASSERT_EQ(run_cli("forward " + inputs() + " --gate sig --no-normalize --out " + path("hn")).code, 0);
  EXPECT_NE(npy::read(path("hs"), "h").to_vector(), npy::read(path("hn"), "h").to_vector());
}

// Numbers: sizes of run named by their option (they used to surface as "shape:" from the library); eps in
// float32; --check-finite covers initial states and incoming gradients.
TEST_F(Cli, NumbersAreCheckedAndNamed) {
  for (const char* opt : {"--heads", "--batch", "--dqk", "--dhv", "--seq-len", "--piece"}) {
    expect_bad_input(run_cli(std::string("run ") + opt + " 0"), opt);
    expect_bad_input(run_cli(std::string("run ") + opt + " -1"), opt);
  }
  expect_bad_input(run_cli("run --heads 1099511627776 --seq-len 100"), "--heads");
  // A product past 2^128 must not wrap to a small number that passes.
  expect_bad_input(
      run_cli("run --batch 1024 --heads 1099511627776 --seq-len 1024 --piece 1024 --dqk 1099511627776 --dhv "
              "1099511627776"),
      "--heads");
  expect_bad_input(run_cli("run --check-tokens -1"), "--check-tokens");
  // Library names mapped to the user's options, one line (the device list used to follow on more lines).
  expect_bad_input(run_cli("run --seq-len 100 --devices nope"), "--devices");
  expect_bad_input(run_cli("run --seq-len 100 --devices ''"), "--devices");  // was a null runner: SIGSEGV
  expect_bad_input(run_cli("bench --tokens 64 --seq-lens 32 --dqk 8 --dhv 8 --repeats 1 --graph-devices gpu:99 --csv " +
                           path("b1") + " --json-out " + path("b2")),
                   "--graph-devices");
  for (const char* eps : {"1e-46", "1e39", "0", "-1", "nan", "inf"}) {
    expect_bad_input(run_cli("forward " + inputs() + " --eps " + eps + " --out " + path("h")), "--eps");
  }
  Tensor c_nan = in_.c0;
  c_nan.data<float>()[3] = NAN;
  save("c0_nan", c_nan);
  expect_bad_input(run_cli("forward --check-finite " + inputs() + " --c0 " + path("c0_nan") + " --n0 " + path("n0") +
                           " --m0 " + path("m0") + " --out " + path("h")),
                   "--c0");
  Tensor dh_inf = in_.dh;
  dh_inf.data<float>()[5] = INFINITY;
  save("dh_inf", dh_inf);
  expect_bad_input(
      run_cli("backward --check-finite " + inputs() + " --dh " + path("dh_inf") + " --out-dq " + path("dq")), "--dh");
  Tensor dc_nan = Tensor::zeros({2, 3, 8, 12}, DType::f32);
  dc_nan.data<float>()[0] = NAN;
  save("dc_nan", dc_nan);
  expect_bad_input(run_cli("backward --check-finite " + inputs() + " --dh " + path("dh") + " --dc " + path("dc_nan") +
                           " --out-dq " + path("dq")),
                   "--dc");
  Tensor sc = Tensor::zeros({2, 3, 8, 12}, DType::f32);
  sc.data<float>()[1] = NAN;
  save("sc_nan", sc);
  const Tensor sq = testing::slice_seq(in_.q, 0, 1).reshaped({2, 3, 8}),
               sk = testing::slice_seq(in_.k, 0, 1).reshaped({2, 3, 8});
  const Tensor sv = testing::slice_seq(in_.v, 0, 1).reshaped({2, 3, 12});
  save("sq", sq);
  save("sk", sk);
  save("sv", sv);
  save("si", Tensor::zeros({2, 3}, DType::f32));
  save("sf", Tensor::zeros({2, 3}, DType::f32));
  save("sn", Tensor::zeros({2, 3, 8}, DType::f32));
  save("sm", Tensor::zeros({2, 3}, DType::f32));
  expect_bad_input(run_cli("step --check-finite --q " + path("sq") + " --k " + path("sk") + " --v " + path("sv") +
                           " --i " + path("si") + " --f " + path("sf") + " --c " + path("sc_nan") + " --n " +
                           path("sn") + " --m " + path("sm") + " --out " + path("sh")),
                   "--c");
}

// Found by probing the CLI as a new user (session 37): options that had no effect are refused naming them. step
// listed --c0/--n0/--m0 (the forward's initial state) and ignored them, even of the wrong shape: its state is --c,
// --n, --m. --chunk-size with a kernel that has no chunks, an empty --devices, a backward that writes nothing.
TEST_F(Cli, MoreOptionsWithoutEffectAreRefused) {
  const std::string step_in = save_step_inputs();
  for (const char* opt : {"--c0", "--n0", "--m0"})
    expect_bad_input(run_cli("step " + step_in + " " + opt + " " + path("c0") + " --out " + path("sh")), opt);
  for (const char* kernel : {"sequence--cpu", "parallel--cpu", "sequence--reference_f64"}) {
    expect_bad_input(run_cli("forward " + inputs() + " --kernel " + kernel + " --chunk-size 3 --out " + path("h")),
                     "--chunk-size");
  }
  expect_bad_input(run_cli("backward " + inputs() + " --kernel parallel--cpu --chunk-size 16 --dh " + path("dh") +
                           " --out-dq " + path("dq")),
                   "--chunk-size");
  ASSERT_EQ(run_cli("forward " + inputs() + " --kernel sequence--cpu --chunk-size auto --out " + path("h")).code, 0);
  expect_bad_input(run_cli("forward " + inputs() + " --devices '' --out " + path("h")), "--devices");
  expect_bad_input(run_cli("step " + step_in + " --devices '' --out " + path("sh")), "--devices");
  expect_bad_input(run_cli("backward " + inputs() + " --dh " + path("dh")), "--out-dq");
  EXPECT_FALSE(fs::exists(path("sh")));
}

// Log lines go to stderr: --json's stdout is one JSON document whatever is logged (it began with a warning when
// the program cache could not be written, and with every info line at --log-level info).
TEST_F(Cli, JsonStdoutIsOnlyJsonWhateverIsLogged) {
  const auto r = run_cli("--json --log-level debug forward " + inputs() + " --devices 0 --out " + path("h"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_FALSE(r.err.empty()) << "nothing was logged at --log-level debug";
  const auto doc = nlohmann::json::parse(r.out, nullptr, false);
  EXPECT_FALSE(doc.is_discarded()) << r.out;
}

// A NaN gate has no value in the recurrence; the chunkwise and parallel forms took it as -inf and returned finite
// h (exit 0), the sequence forms and the references NaN. Every path refuses it naming the gate.
TEST_F(Cli, NaNGatesAreRefusedNamingTheGate) {
  for (const char* gate : {"i", "f"}) {
    Tensor g = (std::string(gate) == "i" ? in_.i : in_.f).to(DType::f32);
    g.data<float>()[37] = std::numeric_limits<float>::quiet_NaN();
    save(std::string(gate) + "_nan", g);
    const std::string args = "--q " + path("q") + " --k " + path("k") + " --v " + path("v") + " --i " +
                             path(std::string(gate) == "i" ? "i_nan" : "i") + " --f " +
                             path(std::string(gate) == "f" ? "f_nan" : "f");
    for (const char* how :
         {"", " --kernel sequence--reference_f64", " --kernel parallel--cpu", " --devices 0,1", " --gate sig"}) {
      expect_bad_input(run_cli("forward " + args + how + " --out " + path("h")), "--" + std::string(gate));
    }
    expect_bad_input(run_cli("backward " + args + " --dh " + path("dh") + " --out-dq " + path("dq")),
                     "--" + std::string(gate));
  }
  EXPECT_FALSE(fs::exists(path("h")));
}

// An input gate of +inf is taken as the largest float32 (stages.hpp "Gates at +-inf"): every path runs it, each
// equal to the same path at i = 3.4028235e38, and the last stabiliser leaves at that value; --check-finite still
// refuses it, naming --i. A float64 1e300 reads as +inf in float32 and runs the same.
TEST_F(Cli, InputGateOfPlusInfinityRunsAsTheLargestFloat) {
  Tensor i_inf = in_.i.to(DType::f32), i_max = in_.i.to(DType::f32), i_big = in_.i.to(DType::f64);
  const std::int64_t S = in_.i.dim(2);
  for (const std::int64_t t : {std::int64_t{1}, S / 2, S - 2}) {
    i_inf.data<float>()[t] = std::numeric_limits<float>::infinity();
    i_max.data<float>()[t] = std::numeric_limits<float>::max();
    i_big.data<double>()[t] = 1e300;
  }
  save("i_inf", i_inf);
  save("i_max", i_max);
  save("i_big", i_big);
  save("f_f64", in_.f.to(DType::f64));
  const std::string qkv = "--q " + path("q") + " --k " + path("k") + " --v " + path("v") + " --f " + path("f");
  const std::string qkv64 = "--q " + path("q") + " --k " + path("k") + " --v " + path("v") + " --f " + path("f_f64");
  for (const char* how : {"", " --kernel sequence--reference_f64", " --kernel parallel--cpu", " --devices workers",
                          " --devices 0,1", " --stream-tokens 16"}) {
    SCOPED_TRACE(how);
    const auto want = run_cli("forward " + qkv + " --i " + path("i_max") + how + " --out " + path("h_max") +
                              " --out-m " + path("m_max"));
    ASSERT_EQ(want.code, 0) << want.err;
    for (const char* i : {"i_inf", "i_big"}) {
      const auto r = run_cli("forward " + (std::string(i) == "i_big" ? qkv64 : qkv) + " --i " + path(i) + how +
                             " --out " + path("h_inf") + " --out-m " + path("m_inf"));
      ASSERT_EQ(r.code, 0) << i << ": " << r.err;
      EXPECT_EQ(testing::slurp(fs::path(path("h_inf"))), testing::slurp(fs::path(path("h_max")))) << i;
      const Tensor m = npy::read(path("m_inf"), "m");
      EXPECT_EQ(m.get({0, 0}), static_cast<double>(std::numeric_limits<float>::max())) << i;
    }
  }
  const auto bw = run_cli("backward " + qkv + " --i " + path("i_inf") + " --dh " + path("dh") + " --out-di " +
                          path("di") + " --out-df " + path("df"));
  ASSERT_EQ(bw.code, 0) << bw.err;
  for (const char* out : {"di", "df"}) {
    for (const double x : npy::read(path(out), out).to_vector()) EXPECT_TRUE(std::isfinite(x)) << out;
  }
  expect_bad_input(run_cli("forward " + qkv + " --i " + path("i_inf") + " --check-finite --out " + path("h2")), "--i");
}

// With --dtype bfloat16, uint16 gates, states and gradients are bfloat16 bits as q, k, v are (the gates were
// refused with "pass the dtype bfloat16" although it was passed); float32 ones stay float32.
TEST_F(Cli, Bfloat16GatesAndGradients) {
  // npy::write stores bfloat16 as uint16 ('<u2'), as numpy has no bfloat16.
  save("bq", in_.q.to(DType::bf16));
  save("bk", in_.k.to(DType::bf16));
  save("bv", in_.v.to(DType::bf16));
  save("bi", in_.i.to(DType::bf16));
  save("bf", in_.f.to(DType::bf16));
  save("bdh", in_.dh.to(DType::bf16));
  const std::string bf = "--q " + path("bq") + " --k " + path("bk") + " --v " + path("bv") + " --dtype bfloat16";
  const auto r1 = run_cli("forward " + bf + " --i " + path("bi") + " --f " + path("bf") + " --out " + path("h1"));
  ASSERT_EQ(r1.code, 0) << r1.err;
  // The same gates as float32 files: the same h (bfloat16 gates hold values float32 holds exactly).
  save("fi", in_.i.to(DType::bf16).to(DType::f32));
  save("ff", in_.f.to(DType::bf16).to(DType::f32));
  const auto r2 = run_cli("forward " + bf + " --i " + path("fi") + " --f " + path("ff") + " --out " + path("h2"));
  ASSERT_EQ(r2.code, 0) << r2.err;
  EXPECT_TRUE(testing::matches(npy::read(path("h1"), "h", DType::bf16), npy::read(path("h2"), "h", DType::bf16), 1e-2,
                               "bf16 gates", "h", spec_));
  const auto b = run_cli("backward " + bf + " --i " + path("bi") + " --f " + path("bf") + " --dh " + path("bdh") +
                         " --out-dq " + path("dq"));
  EXPECT_EQ(b.code, 0) << b.err;
}

// The outputs of one command are all or none: a write that fails (a full disk; the file size limit as its stand-in,
// SIGXFSZ ignored) leaves every output as it was, the ones written before it too, and no temporary file. A killed
// writer's temporary file is removed by the next write of the same output.
TEST_F(Cli, FailedWriteLeavesEveryOutputAsItWas) {
  // step's outputs: h (2 x 3 x 12 floats) is written first and fits the limit, C (2 x 3 x 8 x 12) does not.
  const std::string step_in = save_step_inputs();
  for (const char* name : {"h", "c", "n"}) save(std::string("old_") + name, Tensor::full({1}, DType::f32, 7.0));
  const std::string step =
      " step " + step_in + " --out " + path("old_h") + " --out-c " + path("old_c") + " --out-n " + path("old_n");
  const auto full = testing::run_command(dir_, "exec " + std::string(MLSTM_CLI_PATH) + step, [] {
    std::signal(SIGXFSZ, SIG_IGN);
    const rlimit limit{1024, 1024};  // h's 416 bytes fit, C's 2432 do not
    setrlimit(RLIMIT_FSIZE, &limit);
  });
  EXPECT_EQ(full.code, 1) << full.err;
  for (const char* name : {"h", "c", "n"}) {
    EXPECT_EQ(npy::read(path(std::string("old_") + name), name).numel(), 1) << name << " was replaced";
  }
  const std::string outs = " --out " + path("old_h");
  // A temporary file of a writer that was killed (its pid no longer runs) goes with the next write; another live
  // writer's stays.
  const pid_t gone = fork();
  if (gone == 0) _exit(0);
  ASSERT_GT(gone, 0);
  waitpid(gone, nullptr, 0);
  const std::string stale = (dir_ / (".old_h.npy.tmp." + std::to_string(gone) + ".Ab3xYz")).string();
  const std::string live = (dir_ / (".old_h.npy.tmp." + std::to_string(getpid()) + ".Ab3xYz")).string();
  for (const auto& f : {stale, live}) std::fclose(std::fopen(f.c_str(), "w"));
  ASSERT_EQ(run_cli("forward " + inputs() + outs).code, 0);
  EXPECT_EQ(npy::read(path("old_h"), "h").shape(), in_.dh.shape());
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_TRUE(fs::exists(live));
  fs::remove(live);
  for (const auto& e : fs::directory_iterator(dir_)) {
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();
  }
}

// An output path that is a symbolic link writes the file it points to; the link stays a link.
TEST_F(Cli, OutputThroughASymlinkWritesItsTarget) {
  save("target", Tensor::full({1}, DType::f32, 7.0));
  fs::create_symlink(path("target"), path("link"));
  ASSERT_EQ(run_cli("forward " + inputs() + " --out " + path("link")).code, 0);
  EXPECT_TRUE(fs::is_symlink(path("link")));
  EXPECT_EQ(npy::read(path("target"), "h").shape(), in_.dh.shape());
  // Streamed (the partial file, then a rename): the link stays too, and its target gets the same h.
  const Tensor whole = npy::read(path("target"), "h");
  fs::remove(path("target"));
  save("target", Tensor::full({1}, DType::f32, 7.0));
  ASSERT_EQ(run_cli("forward " + inputs() + " --devices workers --stream-tokens 16 --out " + path("link")).code, 0);
  EXPECT_TRUE(fs::is_symlink(path("link")));
  EXPECT_TRUE(testing::slurp(path("target")) == testing::slurp(path("link")));
  EXPECT_LE(testing::compare(npy::read(path("target"), "h"), whole).rel, 1e-4);
}

// Refused before anything runs (the probe saw bench measure and write its kernel rows, and run open and measure the
// devices and print its problem line, before the exit-2 line), and messages that read as the user wrote things.
TEST_F(Cli, RefusedUpFrontWithReadableMessages) {
  const std::string bench =
      "bench --tokens 128 --heads 1 --dqk 8 --dhv 8 --seq-lens 64 --chunk-sizes 16 --kernels "
      "chunkwise--cpu_xl_chunk --repeats 1 --csv " +
      path("b") + " --graph-devices ";
  for (const char* spec : {"''", "bogus", "0,0"}) {
    expect_bad_input(run_cli(bench + spec), "--graph-devices");
    EXPECT_FALSE(fs::exists(path("b"))) << spec;
  }
  auto r = run_cli("run --seq-len 256 --heads 1 --dqk 8 --dhv 8 --dtype float32 --devices workers --mode pipeline");
  expect_bad_input(r, "--mode");
  EXPECT_EQ(r.out, "");
  r = run_cli("run --seq-len 256 --heads 1 --dqk 16 --dhv 16 --devices workers --mode pipeline");
  expect_bad_input(r, "--mode");
  EXPECT_EQ(r.out, "");
  // A tensor-core kernel where there are none (PoCL's CPU devices): the user's --kernel, exit 2 (was exit 1).
  expect_bad_input(run_cli("forward " + inputs() + " --kernel chunkwise--opencl_tc_xl_chunk --out " + path("h")),
                   "--kernel");
  r = run_cli("forward " + inputs() + " --stream-tokens 0 --out " + path("h"));
  expect_bad_input(r, "--stream-tokens");
  EXPECT_LT(r.err.size(), 120u) << r.err;  // CLI::PositiveNumber printed its range in 300 digits
  r = run_cli("forward " + inputs() + " --memory-limit 100 --out " + path("h"));
  expect_bad_input(r, "--memory-limit");
  EXPECT_NE(r.err.find("100 bytes"), std::string::npos) << r.err;  // was "0.0 MiB"
  // int32 offsets: the dtype, not "truncated" (the same count of int32 is half the bytes).
  npy::write(path("cu"), Tensor::from(std::vector<float>{0, 10, 50}, {3}).to(DType::f64).view());
  {
    std::string bytes = testing::slurp(path("cu"));
    const auto at = bytes.find("<f8");
    bytes.replace(at, 3, "<i4");
    bytes.resize(bytes.size() - 12);  // 3 int32
    std::ofstream(path("cu32"), std::ios::binary) << bytes;
  }
  r = run_cli("forward " + inputs() + " --cu-seqlens " + path("cu32") + " --out " + path("h"));
  expect_bad_input(r, "--cu-seqlens");
  EXPECT_NE(r.err.find("int64"), std::string::npos) << r.err;
  // A structured dtype: named as such (the message was cut at the list's first quote).
  {
    std::string bytes = testing::slurp(path("q"));
    const auto at = bytes.find("'<f4'");
    bytes.replace(at, 5, "[('a', '<f4')]");
    std::ofstream(path("qs"), std::ios::binary) << bytes;
  }
  r = run_cli("forward --q " + path("qs") + " --k " + path("k") + " --v " + path("v") + " --i " + path("i") + " --f " +
              path("f") + " --out " + path("h"));
  expect_bad_input(r, "--q");
  EXPECT_NE(r.err.find("structured"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(path("h")));
}

}  // namespace
}  // namespace mlstm

// Initial stabiliser m0 = +inf (exp gate): the chunkwise, parallel and graph forms gave h = 0 (exit 0), the sequence
// forms and the references NaN. Every path refuses it as i = +inf is, exit 2 naming --m0 (a step's --m) and the
// element; so is a float64 m0 that is +inf in float32, and NaN. -inf (the empty state) stays valid.
namespace mlstm {
namespace {

TEST_F(Cli, StabiliserPlusInfinityIsRefusedNamingM0) {
  Tensor m0_inf = in_.m0.to(DType::f32), m0_big = in_.m0.to(DType::f64), m0_empty = in_.m0.to(DType::f32);
  m0_inf.data<float>()[4] = std::numeric_limits<float>::infinity();
  m0_big.data<double>()[4] = 1e300;
  m0_empty.data<float>()[4] = -std::numeric_limits<float>::infinity();
  save("m0_inf", m0_inf);
  save("m0_big", m0_big);
  save("m0_empty", m0_empty);
  const std::string state = " --c0 " + path("c0") + " --n0 " + path("n0") + " --m0 ";
  for (const char* m0 : {"m0_inf", "m0_big"}) {
    for (const char* how :
         {"", " --kernel sequence--reference_f64", " --kernel sequence--cpu", " --kernel parallel--reference_f64",
          " --kernel parallel--cpu", " --devices workers", " --devices 0,1", " --stream-tokens 16"}) {
      const auto r = run_cli("forward " + inputs() + state + path(m0) + how + " --out " + path("h"));
      expect_bad_input(r, "--m0");
      EXPECT_NE(r.err.find("element 4 is +inf"), std::string::npos) << how << ": " << r.err;
    }
    expect_bad_input(run_cli("backward " + inputs() + state + path(m0) + " --dh " + path("dh") + " --out-dq " +
                             path("dq") + " --out-dm0 " + path("dm0")),
                     "--m0");
    expect_bad_input(run_cli("forward " + inputs() + state + path(m0) + " --gate sig --out " + path("h")), "--m0");
  }
  // NaN: no stabiliser either (the forms disagreed the same way), refused without --check-finite.
  Tensor m0_nan = in_.m0.to(DType::f32);
  m0_nan.data<float>()[4] = std::numeric_limits<float>::quiet_NaN();
  save("m0_nan", m0_nan);
  for (const char* how : {"", " --kernel sequence--reference_f64", " --devices workers"}) {
    const auto r = run_cli("forward " + inputs() + state + path("m0_nan") + how + " --out " + path("h"));
    expect_bad_input(r, "--m0");
    EXPECT_NE(r.err.find("element 4 is NaN"), std::string::npos) << how << ": " << r.err;
  }
  EXPECT_FALSE(fs::exists(path("h")));
  EXPECT_FALSE(fs::exists(path("dq")));
  const auto empty = run_cli("forward " + inputs() + state + path("m0_empty") + " --out " + path("h"));
  EXPECT_EQ(empty.code, 0) << empty.err;
  // A step's m.
  const std::string step =
      "step " + save_step_inputs() + " --c " + path("c0") + " --n " + path("n0") + " --out " + path("sh") + " --m ";
  for (const char* m : {"m0_inf", "m0_big"}) {
    const auto r = run_cli(step + path(m));
    expect_bad_input(r, "--m:");
    EXPECT_NE(r.err.find("element 4 is +inf"), std::string::npos) << r.err;
  }
  EXPECT_FALSE(fs::exists(path("sh")));
  EXPECT_EQ(run_cli(step + path("m0_empty")).code, 0);
  // Packed sequences' (N,NH) m0, read per sequence when streamed (their own check before the run).
  testing::InputSpec ps = spec_;
  ps.initial_state = true;
  const testing::Inputs in = testing::make_packed_inputs({20, 30}, ps, testing::fresh_seed());
  Tensor pm0 = in.m0.to(DType::f32);
  pm0.data<float>()[3] = std::numeric_limits<float>::infinity();
  const std::string packed = "forward " + save_packed(in, pm0) + " --out " + path("ph");
  for (const char* how : {"", " --stream-tokens 16", " --devices workers"}) {
    const auto r = run_cli(packed + how);
    expect_bad_input(r, "--m0");
    EXPECT_NE(r.err.find("element 3 is +inf"), std::string::npos) << how << ": " << r.err;
  }
  EXPECT_FALSE(fs::exists(path("ph")));
}

// Probe 39: bench without --csv / --json-out replaced a user's ./bench.csv (exit 0). A file at a default path is
// replaced only when bench wrote it (it begins as bench's output begins); the rows run each chunk as the kernels do
// (min(chunk, S), once), a kernel of another form once without a chunk, and --chunk-sizes with no chunkwise kernel
// is refused (it had no effect).
TEST_F(Cli, BenchNeverReplacesAUsersFileAtADefaultPath) {
  const fs::path work = dir_ / "bench_defaults";
  fs::create_directories(work);
  const std::string in = "cd " + work.string() + " && ";
  const std::string bench = "bench --tokens 64 --heads 1 --dqk 8 --dhv 8 --seq-lens 64 --repeats 1 ";
  { std::ofstream(work / "bench.csv") << "the user's table\n"; }
  expect_bad_input(run_cli(bench + "--chunk-sizes 16 --kernels chunkwise--cpu_xl_chunk", in), "--csv");
  {
    std::ifstream f(work / "bench.csv");
    std::string line;
    std::getline(f, line);
    EXPECT_EQ(line, "the user's table");
  }
  fs::remove(work / "bench.csv");
  { std::ofstream(work / "bench.json") << "{}\n"; }
  expect_bad_input(run_cli(bench + "--chunk-sizes 16 --kernels chunkwise--cpu_xl_chunk", in), "--json-out");
  fs::remove(work / "bench.json");
  // Its own files are replaced; chunks 16, 1000 and 128 at S = 64 run as 16 and 64; sequence--cpu once, chunk 0.
  ASSERT_EQ(run_cli(bench + "--chunk-sizes 16 --kernels chunkwise--cpu_xl_chunk", in).code, 0);
  const auto r = run_cli(bench + "--chunk-sizes 16 1000 128 --kernels chunkwise--cpu_xl_chunk sequence--cpu", in);
  ASSERT_EQ(r.code, 0) << r.err;
  std::ifstream csv(work / "bench.csv");
  std::vector<std::string> rows;
  for (std::string line; std::getline(csv, line);) rows.push_back(line);
  ASSERT_EQ(rows.size(), 4u) << r.out;
  EXPECT_NE(rows[1].find(",float32,16,fw,"), std::string::npos) << rows[1];
  EXPECT_NE(rows[2].find(",float32,64,fw,"), std::string::npos) << rows[2];
  EXPECT_EQ(rows[3].rfind("sequence--cpu,", 0), 0u) << rows[3];
  EXPECT_NE(rows[3].find(",float32,0,fw,"), std::string::npos) << rows[3];
  expect_bad_input(run_cli(bench + "--chunk-sizes 16 --kernels sequence--cpu", in), "--chunk-sizes");
  // Named paths are the user's request: replaced whatever they held.
  { std::ofstream(work / "mine.csv") << "old\n"; }
  EXPECT_EQ(run_cli(bench + "--kernels sequence--cpu --csv mine.csv --json-out mine.json", in).code, 0);
}

// Probe 39: an unknown word was reported as "A subcommand is required", extras last first ("3 --heads"), or as a
// missing --q; now the first unknown word, as written, with its subcommand.
TEST_F(Cli, ParseErrorsNameTheUnknownWord) {
  const auto sub = run_cli("frobnicate");
  expect_bad_input(sub, "unknown subcommand 'frobnicate'");
  const auto option = run_cli("kernels --heads 3");
  expect_bad_input(option, "unknown option '--heads' of mlstm kernels");
  expect_bad_input(run_cli("forward --heads 3"), "unknown option '--heads' of mlstm forward");
  expect_bad_input(run_cli("kernels x y"), "unexpected argument 'x' to mlstm kernels");
  expect_bad_input(run_cli("--bogus kernels"), "unknown option '--bogus'");
  expect_bad_input(run_cli("forward --q a.npy"), "--k is required");  // CLI11's words where no word is unknown
}

// Probe 39: run --check-tokens above --seq-len was cut quietly, and --check-tokens 0 reported a passed check of 0
// tokens. Now the first is refused, the second says there was no check, and the JSON gives the tokens checked.
TEST_F(Cli, RunSpotCheckSaysWhatItChecked) {
  const std::string run = "--json run --devices workers --seq-len 256 --heads 1 --dqk 8 --dhv 8 --piece 64 ";
  expect_bad_input(run_cli(run + "--check-tokens 1000"), "--check-tokens");
  const auto none = run_cli(run + "--check-tokens 0");
  ASSERT_EQ(none.code, 0) << none.err;
  const auto doc = nlohmann::json::parse(none.out);
  EXPECT_TRUE(doc["spot_check_ok"].is_null()) << none.out;
  EXPECT_EQ(doc["spot_check_tokens"], 0) << none.out;
  const auto some = run_cli(run);  // the default 2048: the first piece's 64 tokens
  ASSERT_EQ(some.code, 0) << some.err;
  EXPECT_EQ(nlohmann::json::parse(some.out)["spot_check_tokens"], 64) << some.out;
  EXPECT_EQ(nlohmann::json::parse(some.out)["spot_check_ok"], true) << some.out;
}

}  // namespace
}  // namespace mlstm

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <functional>
#include <vector>

namespace mlstm {
namespace {

// Probe 41: CLI11 read integers with strtoll's base 0, so a leading zero made a number octal ("--seq-len 010" ran 8
// tokens, exit 0), "0x10" was 16 and "09" no number. Every integer option of every subcommand is decimal now.
TEST_F(Cli, IntegerOptionsAreDecimal) {
  const std::string run = "--json run --devices workers --heads 1 --dqk 8 --dhv 8 ";
  const auto r = run_cli(run + "--seq-len 030 --piece 010 --check-tokens 020");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto doc = nlohmann::json::parse(r.out);
  // Read as octal these were 24, 16 and 8 (the automatic chunk is the piece).
  EXPECT_EQ(doc["tokens"].get<double>(), 30.0) << r.out;
  EXPECT_EQ(doc["spot_check_tokens"], 20) << r.out;
  EXPECT_EQ(doc["chunk_size"], 10) << r.out;
  // "09" was no number; --chunk-size has its own parser (auto or a number).
  const auto nine = run_cli(run + "--seq-len 64 --check-tokens 09 --chunk-size 016");
  ASSERT_EQ(nine.code, 0) << nine.err;
  EXPECT_EQ(nlohmann::json::parse(nine.out)["spot_check_tokens"], 9) << nine.out;
  EXPECT_EQ(nlohmann::json::parse(nine.out)["chunk_size"], 16) << nine.out;
  // List options too (--seq-lens, --chunk-sizes); path options keep their text: --csv 010 is the file "010".
  const auto bench = run_cli(
      "bench --tokens 064 --seq-lens 032 --chunk-sizes 016 --dqk 8 --dhv 8 --repeats 1 "
      "--kernels chunkwise--cpu_xl_chunk --csv 010 --json-out 011",
      "cd " + dir_.string() + " && ");
  ASSERT_EQ(bench.code, 0) << bench.err;
  ASSERT_TRUE(fs::exists(dir_ / "010")) << bench.out;
  ASSERT_TRUE(fs::exists(dir_ / "011")) << bench.out;
  std::ifstream csv(dir_ / "010");
  std::string header, row;
  std::getline(csv, header);
  std::getline(csv, row);
  EXPECT_EQ(row.rfind("chunkwise--cpu_xl_chunk,2,4,32,8,8,float32,16,", 0), 0u) << row;  // B = 64 / 32
  // Anything but [+-]?[0-9]+ is refused naming the option (exit 2, one line).
  expect_bad_input(run_cli(run + "--seq-len 0x10"), "--seq-len: '0x10' is not a decimal integer");
  expect_bad_input(run_cli(run + "--seq-len 1e3"), "--seq-len: '1e3' is not a decimal integer");
  expect_bad_input(run_cli(run + "--seq-len 99999999999999999999"),
                   "--seq-len: '99999999999999999999' is out of range");
  expect_bad_input(run_cli("bench --seq-lens 64 0x40"), "--seq-lens: '0x40' is not a decimal integer");
  expect_bad_input(run_cli("bench --system --system-tokens 64,0b1"), "--system-tokens: '0b1' is not a decimal integer");
  expect_bad_input(run_cli("forward " + inputs() + " --out " + path("h") + " --stream-tokens 0x100"),
                   "--stream-tokens: '0x100' is not a decimal integer");
  // forward --stream-tokens 010: slices of 10 tokens (checked by positive_count_check, then read), h as a whole run.
  const auto sliced = run_cli("forward " + inputs() + " --out " + path("h") + " --stream-tokens 010");
  ASSERT_EQ(sliced.code, 0) << sliced.err;
  const auto negative = run_cli(run + "--seq-len -010");  // a sign is fine; the range check refuses it
  expect_bad_input(negative, "--seq-len: must be in [1,");
  EXPECT_NE(negative.err.find("got -10"), std::string::npos) << negative.err;
}

// Probe 41: the report on stdout was not checked: `--json run > /dev/full` exited 0 with the JSON lost, and a
// reader that closed its pipe killed mlstm with SIGPIPE. A lost report is exit code 1 with one line naming stdout.
TEST_F(Cli, ALostReportOnStdoutIsAFailure) {
  if (!fs::exists("/dev/full")) GTEST_SKIP() << "no /dev/full";
  const auto to_full = [] {
    const int fd = ::open("/dev/full", O_WRONLY);
    ::dup2(fd, 1);
    ::close(fd);
    std::signal(SIGPIPE, SIG_DFL);
  };
  const auto to_closed_pipe = [] {  // a pipe whose reader is gone before the first write: no timing
    int ends[2];
    if (::pipe(ends) != 0) ::_exit(126);
    ::close(ends[0]);
    ::dup2(ends[1], 1);
    ::close(ends[1]);
    std::signal(SIGPIPE, SIG_DFL);  // as a shell starts it; mlstm must not die of it
  };
  const std::string cli = "exec " + std::string(MLSTM_CLI_PATH) + " ";
  const std::vector<std::string> commands{
      "kernels",
      "--json kernels",
      "devices",
      "--json run --devices workers --seq-len 256 --heads 1 --dqk 8 --dhv 8 --check-tokens 0",
      "run --devices workers --seq-len 256 --heads 1 --dqk 8 --dhv 8 --check-tokens 0",
      "--json forward " + inputs() + " --out " + path("h"),
      "--help"};
  for (const auto& command : commands) {
    for (const auto& [where, setup] :
         {std::pair<const char*, std::function<void()>>{"/dev/full", to_full},
          std::pair<const char*, std::function<void()>>{"a closed pipe", to_closed_pipe}}) {
      fs::remove(path("h"));
      const auto r = testing::run_command(dir_, cli + command, setup);
      EXPECT_EQ(r.signal, 0) << command << " to " << where;
      testing::expect_refused(r, 1, "mlstm: error: writing the output to stdout failed");
      if (command.find("forward") != std::string::npos) {  // the .npy output is written all the same
        EXPECT_TRUE(fs::exists(path("h"))) << command << " to " << where;
      }
    }
  }
  // A failure of its own keeps its exit code and its one line.
  const auto bad = testing::run_command(dir_, cli + "run --seq-len 0", to_full);
  testing::expect_refused(bad, 2, "--seq-len");
  // The message names why where the last write said so.
  const auto full = testing::run_command(dir_, cli + "kernels", to_full);
  EXPECT_NE(full.err.find(std::strerror(ENOSPC)), std::string::npos) << full.err;
  const auto pipe = testing::run_command(dir_, cli + "--json kernels", to_closed_pipe);
  EXPECT_NE(pipe.err.find(std::strerror(EPIPE)), std::string::npos) << pipe.err;
}

// Probe 41: step --devices 0 without --kernel said "kernel 'cpu' runs on the CPU; leave --kernel out to run the flow
// graph over '0'": a step has no flow graph, and --kernel was left out. It runs on a device with --kernel opencl.
TEST_F(Cli, StepDevicesNeedTheOpenclStepKernel) {
  const std::string step = "step " + save_step_inputs() + " --out " + path("sh") + " --devices 0";
  const auto r = run_cli(step);
  expect_bad_input(r,
                   "--devices: a step runs on one OpenCL device only with --kernel opencl (the default kernel "
                   "'cpu' runs on the CPU)");
  EXPECT_EQ(r.err.find("flow graph"), std::string::npos) << r.err;
  const auto named = run_cli(step + " --kernel reference_f64");
  expect_bad_input(named,
                   "--devices: a step runs on one OpenCL device only with --kernel opencl (kernel "
                   "'reference_f64' runs on the CPU)");
  EXPECT_FALSE(fs::exists(path("sh")));
  // forward's message stands: there, leaving --kernel out runs the flow graph over the devices.
  expect_bad_input(run_cli("forward " + inputs() + " --out " + path("h") +
                           " --kernel chunkwise--cpu_xl_chunk "
                           "--devices 0"),
                   "leave --kernel out to run the flow graph over '0'");
  ASSERT_EQ(run_cli(step + " --kernel opencl").code, 0);  // PoCL's device 0
  EXPECT_TRUE(fs::exists(path("sh")));
}

}  // namespace
}  // namespace mlstm
