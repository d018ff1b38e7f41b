// A fuzzer of the mlstm command line (issue 21 item 6): random combinations of subcommands, options and
// values (valid ones, and edge ones: 0, -1, huge, 2^31, 2^63, NaN, empty, missing and malformed files,
// colliding outputs) over small inputs. Every invocation must end with exit code 0, 1 or 2, without a
// signal and within its timeout, and a refusal (exit code 2) must be one line on stderr.
//
// Deterministic by default (the seed is fixed per test name, like every test of the suite);
// MLSTM_TEST_SEED=random (or =<n>) draws other invocations. MLSTM_CLI_FUZZ_COUNT sets the number of
// invocations (default 300), MLSTM_CLI_FUZZ_SECONDS the time budget (default 420; the draw stops early
// and says so when it is spent), MLSTM_CLI_FUZZ_TIMEOUT the limit of one invocation (default 60 s).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "mlstm/core/npy.hpp"
#include "test_util.hpp"

namespace mlstm {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

struct Outcome {
  bool timed_out = false;
  int signal = 0;
  int code = -1;
  std::string err;
  double seconds = 0;
};

Outcome run_with_timeout(const std::vector<std::string>& args, const fs::path& err_file, double timeout_s) {
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(MLSTM_CLI_PATH));
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  const auto t0 = Clock::now();
  const pid_t pid = fork();
  if (pid == 0) {
    const int null_fd = ::open("/dev/null", O_RDWR);
    const int err_fd = ::open(err_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (null_fd >= 0) {
      dup2(null_fd, 0);
      dup2(null_fd, 1);
    }
    if (err_fd >= 0) dup2(err_fd, 2);
    execv(MLSTM_CLI_PATH, argv.data());
    _exit(127);
  }
  Outcome o;
  int status = 0;
  for (;;) {
    const pid_t done = waitpid(pid, &status, WNOHANG);
    if (done == pid) break;
    if (std::chrono::duration<double>(Clock::now() - t0).count() > timeout_s) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      o.timed_out = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  o.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  if (!o.timed_out && WIFSIGNALED(status)) o.signal = WTERMSIG(status);
  if (!o.timed_out && WIFEXITED(status)) o.code = WEXITSTATUS(status);
  std::ifstream in(err_file);
  std::ostringstream ss;
  ss << in.rdbuf();
  o.err = ss.str();
  return o;
}

double env_number(const char* name, double fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atof(v) : fallback;
}

// An option of a subcommand: a name, the values that make a valid (and quick) invocation, and edge values.
struct Opt {
  std::string name;
  std::vector<std::string> valid;  // empty + flag: a flag
  std::vector<std::string> edge;
  bool flag = false;
};

class CliFuzz : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("mlstm_cli_fuzz_" + std::to_string(getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "sub");
    const auto spec = testing::spec(1, 2, 20, 8, 12, DType::f32, GateVariant::exp, true);
    const auto in = testing::make_inputs(spec, 1234);
    save("q", in.q);
    save("k", in.k);
    save("v", in.v);
    save("i", in.i);
    save("f", in.f);
    save("c0", in.c0);
    save("n0", in.n0);
    save("m0", in.m0);
    save("dh", in.dh);
    save("dc", in.dc_last);
    save("dn", in.dn_last);
    save("q16", in.q.to(DType::bf16));
    npy::write_offsets(file("offsets"), std::vector<std::int64_t>{0, 7, 20});   // packed: two sequences
    npy::write_offsets(file("offsets_bad"), std::vector<std::int64_t>{0, 25});  // past S
    save("sq", Tensor::zeros({1, 2, 8}, DType::f32));
    save("sk", Tensor::full({1, 2, 8}, DType::f32, 0.5));
    save("sv", Tensor::full({1, 2, 12}, DType::f32, 0.25));
    save("si", Tensor::zeros({1, 2}, DType::f32));
    save("sf", Tensor::full({1, 2}, DType::f32, 2.0));
    save("wrong_shape", Tensor::zeros({1, 2, 19, 8}, DType::f32));
    Tensor nan = in.q;
    nan.data<float>()[3] = NAN;
    save("nan", nan);
    // Malformed files: empty, truncated, big-endian, int32, a header promising 2^40 elements.
    std::ofstream(file("empty")).flush();
    {
      std::string bytes = npy::serialize(in.q.view());
      std::ofstream(file("truncated"), std::ios::binary) << bytes.substr(0, bytes.size() / 2);
      std::string be = bytes, i4 = bytes;
      be.replace(be.find("'<f4'"), 5, "'>f4'");
      i4.replace(i4.find("'<f4'"), 5, "'<i4'");
      std::ofstream(file("bigendian"), std::ios::binary) << be;
      std::ofstream(file("int32"), std::ios::binary) << i4;
      std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776,), }";
      while ((10 + header.size() + 1) % 64 != 0) header.push_back(' ');
      header.push_back('\n');
      std::string huge("\x93NUMPY\x01\x00", 8);
      huge.push_back(static_cast<char>(header.size() & 0xff));
      huge.push_back(static_cast<char>(header.size() >> 8));
      std::ofstream(file("huge"), std::ios::binary) << huge << header << std::string(64, '\0');
    }
  }
  void TearDown() override { fs::remove_all(dir_); }
  void save(const std::string& name, const Tensor& t) { npy::write(file(name), t.view()); }
  std::string file(const std::string& name) const { return (dir_ / (name + ".npy")).string(); }

  std::vector<std::string> bad_inputs() const {
    return {file("missing"), dir_.string(),       file("empty"), file("truncated"), file("bigendian"), file("int32"),
            file("huge"),    file("wrong_shape"), file("nan"),   file("q16"),       "/dev/null",       ""};
  }
  std::vector<std::string> bad_outputs() const {
    return {file("q"),
            (dir_ / "." / "k.npy").string(),
            (dir_ / "missing_dir" / "x.npy").string(),
            dir_.string(),
            "",
            file("out"),
            (dir_ / "sub" / ".." / "out.npy").string()};
  }

  fs::path dir_;
};

const std::vector<std::string> kInts{"0",
                                     "-1",
                                     "2147483648",
                                     "4294967296",
                                     "4611686018427387904",
                                     "9223372036854775807",
                                     "9223372036854775808",
                                     "-9223372036854775808",
                                     "18446744073709551616",
                                     "nan",
                                     "",
                                     "abc",
                                     "1e3",
                                     "0x10"};
const std::vector<std::string> kReals{"0",    "-0", "1e-46",  "1e-40",  "1e39", "nan",  "inf",
                                      "-inf", "",   "1e-300", "3.4e38", "abc",  "-1e-6"};

TEST_F(CliFuzz, EveryInvocationEndsWithExitCode012) {
  const std::uint64_t seed = testing::fresh_seed();
  std::mt19937_64 rng(seed);
  auto pick = [&](const std::vector<std::string>& from) {
    return from[std::uniform_int_distribution<std::size_t>(0, from.size() - 1)(rng)];
  };
  auto chance = [&](double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; };

  const auto ins = bad_inputs();
  const auto outs = bad_outputs();
  auto in_opt = [&](const std::string& name, const std::string& valid, bool required) {
    Opt o{name, {file(valid)}, ins};
    (void)required;
    return o;
  };
  auto out_opt = [&](const std::string& name) { return Opt{name, {file(name.substr(2))}, outs}; };
  const std::vector<std::string> seq_kernels{
      "chunkwise--cpu_xl_chunk", "chunkwise--cpu_limit_chunk",     "parallel--cpu",
      "sequence--cpu",           "chunkwise--cpu_xl_chunk_siging", "parallel--reference_f64"};
  auto common = [&](bool sequence) {
    std::vector<Opt> o{
        Opt{"--dtype", {"bfloat16"}, {"bf16", "float32", "", "nope"}},
        Opt{"--gate", {"exp", "sig", "sigmoid"}, {"", "nope", "EXP"}},
        Opt{"--no-normalize", {}, {}, true},
        Opt{"--eps", {"1e-6", "1e-3"}, kReals},
        Opt{"--check-finite", {}, {}, true},
    };
    if (sequence) {
      o.push_back(Opt{"--devices", {"workers", "all", "workers+all"}, {"gpu:7", "", "nope", "workers+", "+"}});
    } else {
      o.push_back(Opt{"--devices", {}, {"gpu:7", "all", "", "cpu", "nope"}});
    }
    if (sequence) {
      // Refused unless --devices runs the flow graph (without --kernel); calibrated and fastest measure once.
      o.push_back(Opt{"--balancing", {"pull", "calibrated", "fastest"}, {"", "nope", "Pull", "fast", "1"}});
      o.push_back(Opt{"--kernel", seq_kernels, {"nope", "cpu", "", "chunkwise--opencl_xl_chunk"}});
      std::vector<std::string> cs = kInts;
      cs.push_back("2147483647");
      cs.push_back("Auto");
      o.push_back(Opt{"--chunk-size", {"auto", "1", "8", "16", "64"}, cs});
    } else {
      o.push_back(Opt{"--kernel", {"cpu", "reference_f64"}, {"nope", "chunkwise--cpu_xl_chunk", "", "opencl"}});
    }
    return o;
  };
  // Packed sequences: valid offsets, offsets past S, and every malformed file (an int32 array among them).
  Opt cu_seqlens{"--cu-seqlens", {file("offsets")}, ins};
  cu_seqlens.edge.push_back(file("offsets_bad"));
  struct Sub {
    std::string name;
    std::vector<std::pair<std::string, std::string>> base;  // a valid, quick invocation
    std::vector<Opt> opts;
    std::vector<std::string> keep;  // options never removed (a valid value of them keeps the run short)
  };
  std::vector<Sub> subs;
  {
    Sub s{"forward",
          {{"--q", file("q")},
           {"--k", file("k")},
           {"--v", file("v")},
           {"--i", file("i")},
           {"--f", file("f")},
           {"--out", file("out")}},
          common(true),
          {}};
    for (const auto& [n, f] : std::vector<std::pair<std::string, std::string>>{{"--q", "q"},
                                                                               {"--k", "k"},
                                                                               {"--v", "v"},
                                                                               {"--i", "i"},
                                                                               {"--f", "f"},
                                                                               {"--c0", "c0"},
                                                                               {"--n0", "n0"},
                                                                               {"--m0", "m0"}})
      s.opts.push_back(in_opt(n, f, true));
    for (const char* n : {"--out", "--out-c", "--out-n", "--out-m"}) s.opts.push_back(out_opt(n));
    s.opts.push_back(cu_seqlens);
    subs.push_back(s);
  }
  {
    Sub s{"backward",
          {{"--q", file("q")},
           {"--k", file("k")},
           {"--v", file("v")},
           {"--i", file("i")},
           {"--f", file("f")},
           {"--dh", file("dh")},
           {"--out-dq", file("out_dq")}},
          common(true),
          {}};
    for (const auto& [n, f] : std::vector<std::pair<std::string, std::string>>{{"--q", "q"},
                                                                               {"--k", "k"},
                                                                               {"--v", "v"},
                                                                               {"--i", "i"},
                                                                               {"--f", "f"},
                                                                               {"--c0", "c0"},
                                                                               {"--n0", "n0"},
                                                                               {"--m0", "m0"},
                                                                               {"--dh", "dh"},
                                                                               {"--dc", "dc"},
                                                                               {"--dn", "dn"}})
      s.opts.push_back(in_opt(n, f, true));
    for (const char* n :
         {"--out-dq", "--out-dk", "--out-dv", "--out-di", "--out-df", "--out-dc0", "--out-dn0", "--out-dm0"})
      s.opts.push_back(out_opt(n));
    s.opts.push_back(cu_seqlens);
    subs.push_back(s);
  }
  {
    Sub s{"step",
          {{"--q", file("sq")},
           {"--k", file("sk")},
           {"--v", file("sv")},
           {"--i", file("si")},
           {"--f", file("sf")},
           {"--out", file("out")}},
          common(false),
          {}};
    for (const auto& [n, f] : std::vector<std::pair<std::string, std::string>>{{"--q", "sq"},
                                                                               {"--k", "sk"},
                                                                               {"--v", "sv"},
                                                                               {"--i", "si"},
                                                                               {"--f", "sf"},
                                                                               {"--c", "c0"},
                                                                               {"--n", "n0"},
                                                                               {"--m", "m0"}})
      s.opts.push_back(in_opt(n, f, true));
    for (const char* n : {"--out", "--out-c", "--out-n", "--out-m"}) s.opts.push_back(out_opt(n));
    subs.push_back(s);
  }
  {
    // Sizes of run: valid values stay small (a valid huge --seq-len is a legitimately long run); edge values
    // are the ones that must be refused.
    const std::vector<std::string> seq_edge{
        "0", "-1",  "4611686018427387904", "9223372036854775807", "9223372036854775808", "nan",
        "",  "abc", "1125899906842625"};
    Sub s{"run",
          {{"--seq-len", "300"},
           {"--heads", "2"},
           {"--dqk", "16"},
           {"--dhv", "16"},
           {"--dtype", "float32"},
           {"--piece", "128"},
           {"--check-tokens", "64"}},
          {Opt{"--batch", {"1", "2"}, kInts}, Opt{"--heads", {"1", "2"}, kInts},
           Opt{"--seq-len", {"1", "100", "300"}, seq_edge}, Opt{"--dqk", {"8", "16"}, seq_edge},
           Opt{"--dhv", {"8", "16"}, seq_edge},
           Opt{"--dtype", {"float32", "bfloat16", "float16"}, {"", "nope", "float64"}},
           Opt{"--chunk-size", {"auto", "16", "64", "2147483647"}, kInts},
           Opt{"--piece", {"64", "128", "2147483648"}, kInts},
           Opt{"--devices", {"workers", "auto"}, {"", "nope", "gpu:99", "-1"}},
           Opt{"--balancing", {"pull", "calibrated", "fastest"}, {"", "nope", "fast"}},
           Opt{"--mode", {"auto", "stream", "resident"}, {"", "nope", "pipeline"}}, Opt{"--backward", {}, {}, true},
           Opt{"--progress", {}, {}, true}, Opt{"--check-tokens", {"0", "64", "2147483648"}, kInts}},
          {"--seq-len", "--dqk", "--dhv"}};
    subs.push_back(s);
  }
  {
    const std::vector<std::string> tok_edge{
        "0", "-1", "4611686018427387904", "9223372036854775807", "9223372036854775808", "nan", "", "abc"};
    Sub s{
        "bench",
        {{"--tokens", "64"},
         {"--seq-lens", "32"},
         {"--chunk-sizes", "16"},
         {"--dqk", "8"},
         {"--dhv", "8"},
         {"--repeats", "1"},
         {"--kernels", "chunkwise--cpu_xl_chunk"},
         {"--csv", file("b_csv")},
         {"--json-out", file("b_json")}},
        {Opt{"--tokens", {"64", "128"}, tok_edge}, Opt{"--heads", {"1", "2"}, kInts}, Opt{"--dqk", {"8", "16"}, kInts},
         Opt{"--dhv", {"8", "16"}, kInts},
         Opt{"--seq-lens", {"32", "64"}, {"0", "-1", "48", "128", "2147483648", "9223372036854775808", "nan", ""}},
         Opt{"--chunk-sizes", {"16", "64", "2147483647"}, kInts},
         Opt{"--kernels",
             {"chunkwise--cpu_xl_chunk", "chunkwise--cpu_limit_chunk", "parallel--cpu"},
             {"nope", "cpu", "", "sequence--cpu"}},
         Opt{"--dtype", {"float32", "bfloat16"}, {"", "nope", "float64", "float16"}},
         Opt{"--repeats", {"1", "2"}, {"0", "-1", "1000001", "2147483648", "nan", ""}}, Opt{"--backward", {}, {}, true},
         Opt{"--head-dims", {"8", "16"}, kInts}, Opt{"--graph-devices", {"workers"}, {"nope", "", "gpu:99", "-1"}},
         Opt{"--weak-seq-len", {"32"}, {"0", "-1", "2147483648", "9223372036854775807", "nan", ""}},
         Opt{"--csv", {file("b_csv")}, outs}, Opt{"--json-out", {file("b_json")}, outs},
         // bench --system (the base's --tokens is never dropped, so --system is always refused here: the
         // fuzzer draws its option checks, never a whole system run)
         Opt{"--system", {}, {}, true},
         Opt{"--system-problems",
             {"2x8x8", "1x16x16"},
             {"", "0x8x8", "2x8", "2x8x8x8", "axbxc", "9223372036854775808x1x1"}},
         Opt{"--system-tokens", {"64", "64,128"}, tok_edge}, Opt{"--system-stream-tokens", {"32"}, tok_edge},
         Opt{"--devices", {"0"}, {"", "nope", "gpu:99", "workers", "0+1", "-1"}},
         Opt{"--workdir", {dir_.string()}, {"", (dir_ / "missing").string(), file("q")}},
         Opt{"--memory-limit", {"100000000"}, kInts}},
        {"--tokens", "--repeats"}};
    subs.push_back(s);
  }
  subs.push_back(Sub{"kernels", {}, {}, {}});
  subs.push_back(Sub{"devices", {}, {}, {}});

  const int count = static_cast<int>(env_number("MLSTM_CLI_FUZZ_COUNT", 300));
  const double budget = env_number("MLSTM_CLI_FUZZ_SECONDS", 420);
  const double timeout = env_number("MLSTM_CLI_FUZZ_TIMEOUT", 60);
  const fs::path err_file = dir_ / "stderr.txt";
  const auto start = Clock::now();
  std::map<int, int> codes;
  int done = 0;
  double slowest = 0;
  std::string slowest_cmd;
  for (; done < count; ++done) {
    if (std::chrono::duration<double>(Clock::now() - start).count() > budget) {
      std::printf("[ fuzz     ] time budget of %.0f s spent after %d invocations\n", budget, done);
      break;
    }
    std::vector<std::string> args;
    if (chance(0.1)) args.push_back("--json");
    if (chance(0.05)) {
      args.push_back("--log-level");
      args.push_back(pick({"trace", "off", "nope", ""}));
    }
    const double which = std::uniform_real_distribution<double>(0, 1)(rng);
    const Sub& sub = which < 0.03 ? subs[5]
                     : which < 0.06
                         ? subs[6]
                         : subs[std::min<std::size_t>(4, static_cast<std::size_t>((which - 0.06) / 0.94 * 5))];
    args.push_back(chance(0.01) ? "nope" : sub.name);
    // Start from the valid invocation, then mutate 0 to 4 options.
    std::vector<std::pair<std::string, std::vector<std::string>>> opts;  // name, values (flag: none)
    for (const auto& [n, v] : sub.base) opts.push_back({n, {v}});
    const int mutations = std::uniform_int_distribution<int>(0, 4)(rng);
    for (int m = 0; m < mutations; ++m) {
      const double what = std::uniform_real_distribution<double>(0, 1)(rng);
      if (sub.opts.empty() || what < 0.05) {
        opts.push_back({pick({"--bogus", "--q", "--heads", "-x", "--"}), {pick({"1", ""})}});
        continue;
      }
      const Opt& o = sub.opts[std::uniform_int_distribution<std::size_t>(0, sub.opts.size() - 1)(rng)];
      auto it = std::find_if(opts.begin(), opts.end(), [&](const auto& p) { return p.first == o.name; });
      if (what < 0.15 && it != opts.end() && std::find(sub.keep.begin(), sub.keep.end(), o.name) == sub.keep.end()) {
        opts.erase(it);  // a required option may go missing
        continue;
      }
      std::vector<std::string> values;
      if (!o.flag) {
        const bool edge = !o.edge.empty() && (o.valid.empty() || chance(0.6));
        values.push_back(edge ? pick(o.edge) : pick(o.valid));
        if (o.name == "--seq-lens" || o.name == "--chunk-sizes" || o.name == "--head-dims") {
          if (chance(0.3)) values.push_back(pick(o.valid));
        }
        if (o.name == "--kernels" && chance(0.2)) values.push_back(pick(o.valid));
      }
      if (it != opts.end() && !chance(0.1))
        it->second = values;  // else given twice
      else
        opts.push_back({o.name, values});
    }
    for (const auto& [n, vs] : opts) {
      args.push_back(n);
      for (const auto& v : vs) args.push_back(v);
    }
    std::string cmd = "mlstm";
    for (const auto& a : args) cmd += " '" + a + "'";
    for (const char* leftover : {"out", "out_dq", "b_csv", "b_json"}) fs::remove(file(leftover));
    const Outcome o = run_with_timeout(args, err_file, timeout);
    if (o.seconds > slowest) {
      slowest = o.seconds;
      slowest_cmd = cmd;
    }
    const std::string replay = " (invocation " + std::to_string(done) + ", seed " + std::to_string(seed) + "): " + cmd;
    ASSERT_FALSE(o.timed_out) << "timed out after " << timeout << " s" << replay;
    ASSERT_EQ(o.signal, 0) << "killed by signal " << o.signal << replay << "\n" << o.err;
    ASSERT_TRUE(o.code == 0 || o.code == 1 || o.code == 2) << "exit code " << o.code << replay << "\n" << o.err;
    if (o.code == 2) {
      const auto lines = std::count(o.err.begin(), o.err.end(), '\n');
      const bool opencl = cmd.find("opencl") != std::string::npos;  // PoCL may print build warnings first
      EXPECT_TRUE(lines == 1 || (opencl && lines >= 1)) << "a refusal is one line" << replay << "\n" << o.err;
      EXPECT_EQ(o.err.rfind("mlstm: error: ", 0) == 0 || opencl, true) << replay << "\n" << o.err;
    }
    // No temporary files left behind by any invocation.
    for (const auto& e : fs::directory_iterator(dir_)) {
      ASSERT_EQ(e.path().filename().string().find(".tmp."), std::string::npos) << e.path() << replay;
    }
    if (o.code == 1) std::printf("[ fuzz     ] exit 1%s\n  %s", replay.c_str(), o.err.c_str());  // failures, for review
    ++codes[o.code];
  }
  std::printf("[ fuzz     ] %d invocations in %.1f s: exit 0: %d, exit 1: %d, exit 2: %d; slowest %.2f s: %s\n", done,
              std::chrono::duration<double>(Clock::now() - start).count(), codes[0], codes[1], codes[2], slowest,
              slowest_cmd.c_str());
}

}  // namespace
}  // namespace mlstm
