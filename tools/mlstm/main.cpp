// mlstm: the command line of mlstm-flow.
//   mlstm run | forward | backward | step | kernels | devices | bench   (--help on each)
// Bad input: one line on stderr naming the argument, exit code 2. Other failures: exit code 1.
#include <CL/cl.h>
#include <hwloc.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/parallel_pipeline.h>

#include "mlstm/core/atomic_file.hpp"
#include "mlstm/core/env.hpp"
#include "mlstm/core/npy.hpp"
#include "mlstm/devices/opencl/device.hpp"
#include "mlstm/devices/opencl/stream.hpp"
#include "mlstm/devices/opencl/tc_routine.hpp"
#include "mlstm/mlstm.hpp"
#include "mlstm/nodes/device_stream_node.hpp"
#include "mlstm/reference.hpp"

namespace {

using namespace mlstm;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace fs = std::filesystem;

// ---- checks of the user's options (exit code 2, one line naming the option) ------------------------------

void require_range(std::int64_t value, std::int64_t lo, std::int64_t hi, const std::string& option) {
  if (value < lo || value > hi) {
    throw InvalidArgument(
        option, "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + std::to_string(value));
  }
}

// The largest dimension of a synthetic problem (sums like 2 * dqk + dhv stay far from overflow).
constexpr std::int64_t kMaxDim = std::int64_t{1} << 40;
constexpr std::int64_t kMaxTokens = std::int64_t{1} << 50;  // tokens of a run: counted exactly in a double

// Bytes of a problem's buffers, overflow-safe; refused when more than the machine's memory (an allocation
// that large would fail or, overcommitted, kill the process when touched). Callers pass a lower bound (the
// inputs alone), so that no run that could fit is refused.
void require_fits_memory(std::initializer_list<std::int64_t> factors, const std::string& option) {
  unsigned __int128 bytes = 1;
  for (const std::int64_t f : factors) {
    // bytes <= 2^64 and f < 2^63 before each product: it stays below 2^127, then is capped at 2^64 again.
    bytes *= static_cast<unsigned __int128>(std::max<std::int64_t>(f, 0));
    bytes = std::min(bytes, static_cast<unsigned __int128>(1) << 64);
  }
  const auto pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  const unsigned __int128 memory = pages > 0 && page > 0
                                       ? static_cast<unsigned __int128>(pages) * static_cast<unsigned __int128>(page)
                                       : static_cast<unsigned __int128>(1) << 34;
  if (bytes > memory) {
    char text[160];
    std::snprintf(text, sizeof text, "the problem needs about %.3g GiB, more than this machine's %.3g GiB of memory",
                  static_cast<double>(bytes) / static_cast<double>(1ull << 30),
                  static_cast<double>(memory) / static_cast<double>(1ull << 30));
    throw InvalidArgument(option, text);
  }
}

// Bytes of one token of one head's inputs: q, k, v in `dtype`, the two float32 gates (dims <= kMaxDim: no overflow).
std::int64_t token_bytes(std::int64_t dqk, std::int64_t dhv, DType dtype) {
  return (2 * dqk + dhv) * static_cast<std::int64_t>(dtype_size(dtype)) + 8;
}

// Where a path points, for collision checks: (device, inode) of an existing file (hard links and symlinks
// included), else the canonical directory plus the name.
struct PathIdentity {
  bool exists = false;
  dev_t dev = 0;
  ino_t ino = 0;
  std::string canonical;
  bool operator==(const PathIdentity& o) const {
    return exists == o.exists && (exists ? dev == o.dev && ino == o.ino : canonical == o.canonical);
  }
};

PathIdentity identity_of(const std::string& path) {
  PathIdentity id;
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) {
    id.exists = true;
    id.dev = st.st_dev;
    id.ino = st.st_ino;
    return id;
  }
  std::error_code ec;
  id.canonical = fs::weakly_canonical(fs::absolute(path, ec), ec).string();
  if (ec) id.canonical = path;
  return id;
}

struct NamedPath {
  std::string option, path;
};

// Every requested output can be produced: a file name in an existing, writable directory, not a directory
// itself, not the same file as another output or any input. Checked before anything is read or computed.
void check_outputs(const std::vector<NamedPath>& inputs, const std::vector<NamedPath>& outputs) {
  std::vector<std::pair<NamedPath, PathIdentity>> seen;
  for (const auto& in : inputs) {
    if (!in.path.empty()) seen.push_back({in, identity_of(in.path)});
  }
  const std::size_t n_inputs = seen.size();
  for (const auto& out : outputs) {
    if (out.path.empty()) continue;
    const fs::path p(out.path);
    std::error_code ec;
    if (p.filename().empty() || fs::is_directory(p, ec)) {
      throw InvalidArgument(out.option, "'" + out.path + "' is a directory, not a file name");
    }
    const fs::path dir = p.parent_path().empty() ? fs::path(".") : p.parent_path();
    if (!fs::is_directory(dir, ec))
      throw InvalidArgument(out.option, "directory '" + dir.string() + "' does not exist");
    if (::access(dir.c_str(), W_OK | X_OK) != 0) {
      throw InvalidArgument(out.option, "directory '" + dir.string() + "' is not writable");
    }
    if (fs::exists(p, ec) && !fs::is_regular_file(p, ec)) {
      throw InvalidArgument(out.option, "'" + out.path + "' exists and is not a regular file");
    }
    const PathIdentity id = identity_of(out.path);
    for (std::size_t k = 0; k < seen.size(); ++k) {
      if (seen[k].second == id) {
        throw InvalidArgument(out.option, "'" + out.path + "' is the same file as " +
                                              (k < n_inputs ? "the input " : "the output ") + seen[k].first.option +
                                              " ('" + seen[k].first.path + "')");
      }
    }
    seen.push_back({out, id});
  }
}

double peak_rss_mib() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) / 1024.0;  // ru_maxrss is in KiB on Linux
}

// Progress on stderr: tokens/s and ETA. Shown when stderr is a terminal or --progress is given.
class Progress {
 public:
  Progress(std::int64_t total, bool enabled) : total_(total), enabled_(enabled), start_(Clock::now()) {}
  void update(std::int64_t done) {
    if (!enabled_) return;
    const double secs = std::chrono::duration<double>(Clock::now() - start_).count();
    const double rate = secs > 0 ? static_cast<double>(done) / secs : 0.0;
    const double eta = rate > 0 ? static_cast<double>(total_ - done) / rate : 0.0;
    const int width = 30;
    const int filled =
        static_cast<int>(width * static_cast<double>(done) / static_cast<double>(std::max<std::int64_t>(total_, 1)));
    std::fprintf(stderr, "\r[%s%s] %5.1f%%  %.0f tokens/s  ETA %.1fs   ",
                 std::string(static_cast<std::size_t>(filled), '#').c_str(),
                 std::string(static_cast<std::size_t>(width - filled), '.').c_str(),
                 100.0 * static_cast<double>(done) / static_cast<double>(std::max<std::int64_t>(total_, 1)), rate, eta);
    if (done >= total_) std::fprintf(stderr, "\n");
    std::fflush(stderr);
  }

 private:
  std::int64_t total_;
  bool enabled_;
  Clock::time_point start_;
};

// ---- options shared by forward / backward ----------------------------------------------------------

struct InputFiles {
  std::string q, k, v, i, f, c0, n0, m0;
  std::string dtype;  // "" or bfloat16 (uint16 arrays read as bfloat16)
  std::string kernel = "chunkwise--cpu_xl_chunk";
  std::int64_t chunk_size = 64;
  std::string devices;
  std::string gate = "exp";
  bool no_normalize = false;
  double eps = 1e-6;
  bool check_finite = false;
  CLI::Option* gate_option = nullptr;    // to tell an explicit --gate from the default
  CLI::Option* kernel_option = nullptr;  // and an explicit --kernel
  bool step = false;                     // the step subcommand's inputs
};

// A file option given an empty string is refused (it used to mean "not given": --out '' computed and wrote nothing).
const CLI::Validator& path_check() {
  static const CLI::Validator check(
      [](std::string& path) { return path.empty() ? std::string("empty path") : std::string(); }, "PATH");
  return check;
}

void add_input_options(CLI::App* app, InputFiles& in, bool sequence) {
  const std::string qk = sequence ? "(B,NH,S,DHQK)" : "(B,NH,DHQK)";
  const std::string v = sequence ? "(B,NH,S,DHHV)" : "(B,NH,DHHV)";
  const std::string g = sequence ? "(B,NH,S)" : "(B,NH)";
  app->add_option("--q", in.q, "queries .npy " + qk)->required()->check(path_check());
  app->add_option("--k", in.k, "keys .npy " + qk)->required()->check(path_check());
  app->add_option("--v", in.v, "values .npy " + v)->required()->check(path_check());
  app->add_option("--i", in.i, "input gate pre-activations .npy " + g)->required()->check(path_check());
  app->add_option("--f", in.f, "forget gate pre-activations .npy " + g)->required()->check(path_check());
  app->add_option("--c0", in.c0, "initial C .npy (B,NH,DHQK,DHHV)")->check(path_check());
  app->add_option("--n0", in.n0, "initial n .npy (B,NH,DHQK)")->check(path_check());
  app->add_option("--m0", in.m0, "initial m .npy (B,NH)")->check(path_check());
  app->add_option("--dtype", in.dtype, "read uint16 arrays as this dtype (bfloat16)")
      ->check(CLI::IsMember({"bfloat16", "bf16"}));
  in.gate_option =
      app->add_option("--gate", in.gate, "input gate: exp or sig")->check(CLI::IsMember({"exp", "sig", "sigmoid"}));
  app->add_flag("--no-normalize", in.no_normalize, "sigmoid gate: skip the normaliser (refused with the exp gate)");
  app->add_option("--eps", in.eps, "normaliser epsilon (> 0)");
  app->add_flag("--check-finite", in.check_finite, "refuse inputs with NaN or Inf");
  if (sequence) {
    in.kernel_option = app->add_option("--kernel", in.kernel, "kernel name (see `mlstm kernels`)");
    app->add_option("--chunk-size", in.chunk_size, "chunk size of chunkwise kernels (> 0)");
    app->add_option("--devices", in.devices,
                    "run the flow graph over these devices, sequence parallel: workers (CPU workers), all, gpu:all, "
                    "0,1, cpu, or several joined by + (workers+gpu:all); with --kernel, the one OpenCL device that "
                    "kernel runs on");
  } else {
    in.step = true;
    in.kernel = "cpu";
    in.kernel_option = app->add_option("--kernel", in.kernel, "step kernel name (see `mlstm kernels`)");
    app->add_option("--devices", in.devices, "the one OpenCL device of an OpenCL step kernel: 0, gpu:0, cpu, ...");
  }
}

std::optional<DType> as_dtype(const InputFiles& in) {
  if (in.dtype.empty()) return std::nullopt;
  return parse_dtype(in.dtype, "--dtype");
}

Tensor read_optional(const std::string& path, const std::string& name, std::optional<DType> dt) {
  if (path.empty()) return Tensor();
  return npy::read(path, name, dt);
}

ForwardInputs load_inputs(const InputFiles& in) {
  const auto dt = as_dtype(in);
  ForwardInputs l;
  l.q = npy::read(in.q, "--q", dt);
  l.k = npy::read(in.k, "--k", dt);
  l.v = npy::read(in.v, "--v", dt);
  l.i = npy::read(in.i, "--i");
  l.f = npy::read(in.f, "--f");
  l.c0 = read_optional(in.c0, "--c0", std::nullopt);
  l.n0 = read_optional(in.n0, "--n0", std::nullopt);
  l.m0 = read_optional(in.m0, "--m0", std::nullopt);
  return l;
}

// Renames library argument names to the CLI's option names in error messages (one line).
const std::map<std::string, std::string>& file_option_names() {
  static const std::map<std::string, std::string> names{{"q", "--q"},
                                                        {"k", "--k"},
                                                        {"v", "--v"},
                                                        {"i", "--i"},
                                                        {"f", "--f"},
                                                        {"c0", "--c0"},
                                                        {"n0", "--n0"},
                                                        {"m0", "--m0"},
                                                        {"dh", "--dh"},
                                                        {"dc_last", "--dc"},
                                                        {"dn_last", "--dn"},
                                                        {"eps", "--eps"},
                                                        {"chunk_size", "--chunk-size"},
                                                        {"kernel", "--kernel"},
                                                        {"step_kernel", "--kernel"},
                                                        {"c", "--c"},
                                                        {"n", "--n"},
                                                        {"m", "--m"},
                                                        {"devices", "--devices"},
                                                        {"gate", "--gate"}};
  return names;
}

[[noreturn]] void rethrow_as_cli(const InvalidArgument& e, const std::map<std::string, std::string>& names) {
  auto it = names.find(e.argument());
  if (it == names.end()) throw e;
  std::string what = e.what();
  what = what.substr(std::min(what.size(), e.argument().size() + 2));
  throw InvalidArgument(it->second, what);
}

[[noreturn]] void rethrow_as_cli(const InvalidArgument& e) { rethrow_as_cli(e, file_option_names()); }

// The registry entry of `name` (a sequence kernel, or a step kernel when `step`), refused up front otherwise.
KernelInfo kernel_info(const std::string& name, bool step) {
  for (const auto& k : available_kernels()) {
    if (k.name != name) continue;
    if ((k.form == KernelForm::step) != step) {
      throw InvalidArgument(
          "--kernel", "'" + name + "' is " + (step ? "not a step kernel" : "a step kernel") + "; see `mlstm kernels`");
    }
    return k;
  }
  throw InvalidArgument("--kernel", "unknown kernel '" + name + "'; see `mlstm kernels`");
}

// Whether a forward/backward runs one kernel (--kernel, or no --devices) rather than the flow graph over
// --devices. Steps always run one kernel.
bool runs_one_kernel(const InputFiles& in) {
  return in.step || in.devices.empty() || (in.kernel_option && in.kernel_option->count() > 0);
}

// The options of a run, every combination checked (an option without effect is refused): --gate against a
// kernel that fixes the gate, --no-normalize (sigmoid gate only), --devices (OpenCL kernels only), --eps and
// --chunk-size in range (in float32, as the kernels use them).
MlstmOptions options_of(const InputFiles& in, const KernelInfo& info) {
  MlstmOptions o;
  o.gate = parse_gate(in.gate, "--gate");
  if (info.forced_gate) {
    if (in.gate_option && in.gate_option->count() > 0 && o.gate != *info.forced_gate) {
      throw InvalidArgument("--gate", "kernel '" + info.name + "' always uses the " +
                                          std::string(gate_name(*info.forced_gate)) + " input gate");
    }
    o.gate = *info.forced_gate;
  }
  if (in.no_normalize && o.gate != GateVariant::sigmoid) {
    throw InvalidArgument("--no-normalize", "only the sigmoid input gate (--gate sig) can skip the normaliser");
  }
  if (!in.devices.empty() && runs_one_kernel(in) && info.device_kind != "opencl") {
    throw InvalidArgument("--devices", "kernel '" + info.name +
                                           "' runs on the CPU; leave --kernel out to run the flow graph over '" +
                                           in.devices + "'");
  }
  o.normalize = !in.no_normalize;
  o.eps = in.eps;
  o.chunk_size = in.chunk_size;
  try {
    validate_options(o);
  } catch (const InvalidArgument& e) {
    rethrow_as_cli(e);
  }
  return o;
}

std::vector<NamedPath> input_paths(const InputFiles& in) {
  return {{"--q", in.q}, {"--k", in.k},   {"--v", in.v},   {"--i", in.i},
          {"--f", in.f}, {"--c0", in.c0}, {"--n0", in.n0}, {"--m0", in.m0}};
}

void write_out(const std::string& option, const std::string& path, const Tensor& t) {
  if (path.empty()) return;
  // Refused up front when it could not be computed; an empty result here is a bug, never a skipped file.
  if (t.empty()) throw Error(option + ": the kernel returned no such output");
  npy::write(path, t.view());
}

// Where a forward or backward runs: one registry kernel (on one device), or the flow graph over --devices. A
// spec that names several devices is never cut to one: with --kernel it is refused.
class Engine {
 public:
  explicit Engine(const InputFiles& in) {
    if (!runs_one_kernel(in)) {
      graph_ = std::make_unique<graph::FlowGraphRunner>(in.devices);
      return;
    }
    if (!in.devices.empty()) {
      const auto named = opencl::select_devices(in.devices);
      if (named.size() != 1) {
        throw InvalidArgument("--devices", "'" + in.devices + "' names " + std::to_string(named.size()) +
                                               " devices and --kernel runs on one; leave --kernel out to run the "
                                               "flow graph over all of them");
      }
      devices_ = {"opencl:" + std::to_string(named[0].index) + " " + named[0].name};
    } else {
      devices_ = {kernel_info(in.kernel, false).device_kind == "opencl" ? "opencl (default device)" : "cpu"};
    }
    kernel_ = get_kernel(in.kernel, KernelTarget{in.devices});
  }
  ForwardResult forward(const ForwardArgs& a, const MlstmOptions& o) {
    if (!graph_) return kernel_->forward(a, o);
    ForwardResult r = graph_->forward(a, o);
    devices_ = graph_->last_plan().devices;
    return r;
  }
  BackwardResult backward(const BackwardArgs& b, const MlstmOptions& o) {
    if (!graph_) return kernel_->backward(b, o);
    BackwardResult r = graph_->backward(b, o);
    devices_ = graph_->last_plan().devices;
    return r;
  }
  // The devices that took part in the last call.
  const std::vector<std::string>& devices() const noexcept { return devices_; }
  // "chunkwise--cpu_xl_chunk", or "flow graph over workers+all" (for messages).
  std::string what(const InputFiles& in) const { return graph_ ? "flow graph over " + in.devices : in.kernel; }

 private:
  std::unique_ptr<SequenceKernel> kernel_;
  std::unique_ptr<graph::FlowGraphRunner> graph_;
  std::vector<std::string> devices_;
};

// ---- subcommands -------------------------------------------------------------------------------------

struct ForwardOutputs {
  std::string h, c, n, m;
};

// forward's streaming options (README "Streaming a file larger than memory").
struct ForwardStreaming {
  std::int64_t tokens = 0;        // --stream-tokens: tokens per slice; 0 = whole arrays in memory
  bool resume = false;            // --resume: continue a killed --stream-tokens run
  std::int64_t memory_limit = 0;  // --memory-limit: bytes; 0 = this machine's physical memory
};

// ---- forward --stream-tokens: .npy files of any size in sequence slices ------------------------------------

// The header of every sequence input, read and checked against q before anything else is read: B, NH and S
// must agree across the files (a file whose S differs is refused naming its option).
struct InputHeaders {
  Shape q, k, v, i, f;
  DType dtype = DType::f32;
  std::int64_t B = 0, NH = 0, S = 0, DK = 0, DV = 0;
  std::uint64_t bytes = 0;  // data bytes of q, k, v, i, f together
};

InputHeaders read_input_headers(const InputFiles& in) {
  const auto dt = as_dtype(in);
  InputHeaders h;
  std::pair<Shape, DType> q = npy::read_header(in.q, "--q", dt), k = npy::read_header(in.k, "--k", dt),
                          v = npy::read_header(in.v, "--v", dt), i = npy::read_header(in.i, "--i"),
                          f = npy::read_header(in.f, "--f");
  if (q.first.size() != 4) throw InvalidArgument("--q", "expected (B,NH,S,DHQK), got " + shape_to_string(q.first));
  h.q = q.first;
  h.dtype = q.second;
  h.B = h.q[0];
  h.NH = h.q[1];
  h.S = h.q[2];
  h.DK = h.q[3];
  auto expect = [&](const std::pair<Shape, DType>& got, const Shape& want, const char* option, const char* layout) {
    if (got.first.size() != want.size()) {
      throw InvalidArgument(option, std::string("expected ") + layout + ", got " + shape_to_string(got.first));
    }
    for (std::size_t d = 0; d < want.size(); ++d) {
      if (want[d] >= 0 && got.first[d] != want[d]) {
        const char* dim = d == 0 ? "B" : d == 1 ? "NH" : d == 2 ? "S" : "the head dimension";
        throw InvalidArgument(option, std::string("expected ") + layout + " with " + dim + " = " +
                                          std::to_string(want[d]) + " as in --q, got " + shape_to_string(got.first));
      }
    }
  };
  expect(k, h.q, "--k", "(B,NH,S,DHQK)");
  expect(v, {h.B, h.NH, h.S, -1}, "--v", "(B,NH,S,DHHV)");
  expect(i, {h.B, h.NH, h.S}, "--i", "(B,NH,S)");
  expect(f, {h.B, h.NH, h.S}, "--f", "(B,NH,S)");
  h.k = k.first;
  h.v = v.first;
  h.i = i.first;
  h.f = f.first;
  h.DV = h.v[3];
  for (const auto* t : {&q, &k, &v, &i, &f}) {
    h.bytes += static_cast<std::uint64_t>(shape_numel(t->first)) * dtype_size(t->second);
  }
  return h;
}

std::uint64_t memory_limit_of(const ForwardStreaming& st) {
  if (st.memory_limit > 0) return static_cast<std::uint64_t>(st.memory_limit);
  const auto pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? static_cast<std::uint64_t>(pages) * static_cast<std::uint64_t>(page)
                               : std::uint64_t{1} << 34;
}

std::string mib_text(std::uint64_t bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.1f MiB", static_cast<double>(bytes) / static_cast<double>(1 << 20));
  return text;
}

// The hidden files of a streamed h output next to it: ".<name>.progress" (the record).
std::string progress_path_of(const std::string& out) {
  const fs::path p(out);
  return (p.parent_path() / ("." + p.filename().string() + ".progress")).string();
}

// What a resumed run must share with the run that wrote the record, so that the final h is bit for bit the
// one an uninterrupted run writes: the slice size, every option that changes results, where it runs, and the
// input files (path, size, modification time, shape).
json stream_identity(const InputFiles& in, const ForwardStreaming& st, const MlstmOptions& o) {
  json files = json::array();
  for (const auto& [option, path] : input_paths(in)) {
    if (path.empty()) continue;
    struct stat s {};
    if (::stat(path.c_str(), &s) != 0) throw InvalidArgument(option, "cannot open '" + path + "'");
    std::error_code ec;
    files.push_back({{"option", option},
                     {"path", fs::absolute(path, ec).string()},
                     {"size", static_cast<std::uint64_t>(s.st_size)},
                     {"mtime_ns", static_cast<std::int64_t>(s.st_mtim.tv_sec) * 1000000000 + s.st_mtim.tv_nsec}});
  }
  const float eps = static_cast<float>(o.eps);
  std::uint32_t eps_bits;
  std::memcpy(&eps_bits, &eps, sizeof eps_bits);
  return {{"--stream-tokens", st.tokens},
          {"--chunk-size", o.chunk_size},
          {"--gate", std::string(gate_name(o.gate))},
          {"--no-normalize", !o.normalize},
          {"--eps", eps_bits},
          {"--kernel", runs_one_kernel(in) ? in.kernel : std::string("flow-graph")},
          {"--devices", in.devices},
          {"--dtype", in.dtype},
          {"inputs", files}};
}

constexpr char kRecordMagic[8] = {'M', 'L', 'S', 'T', 'M', 'F', 'W', 'P'};

// The progress record: magic, JSON length (u64), the JSON (identity + tokens done), the StreamSession
// snapshot after those tokens, FNV-1a 64 of everything before it. Written atomically (write_file_atomically)
// only after the h of those tokens is written and synced: it never claims more than the partial file holds.
void write_progress(const std::string& path, const json& identity, std::int64_t tokens_done,
                    const std::string& snapshot) {
  json doc = identity;
  doc["tokens_done"] = tokens_done;
  const std::string text = doc.dump();
  std::string bytes(kRecordMagic, sizeof kRecordMagic);
  const std::uint64_t len = text.size();
  bytes.append(reinterpret_cast<const char*>(&len), sizeof len);
  bytes += text;
  bytes += snapshot;
  const std::uint64_t sum = StreamSession::checksum(bytes);
  bytes.append(reinterpret_cast<const char*>(&sum), sizeof sum);
  write_file_atomically(path, bytes);
}

// Reads the record of `out` for --resume and checks it against this run (each difference refused naming its
// option); returns the session restored from it.
StreamSession read_progress(const std::string& path, const json& identity, const StreamConfig& cfg) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    throw InvalidArgument("--resume", "no progress record '" + path +
                                          "' (nothing to resume: the run finished, never started, or wrote a "
                                          "different --out); run without --resume");
  }
  std::ostringstream ss;
  ss << file.rdbuf();
  const std::string bytes = ss.str();
  auto refuse = [&](const std::string& why) {
    return InvalidArgument("--resume", "progress record '" + path + "' refused: " + why + "; run without --resume");
  };
  std::uint64_t len = 0, sum = 0;
  if (bytes.size() < sizeof kRecordMagic + 16 || std::memcmp(bytes.data(), kRecordMagic, sizeof kRecordMagic) != 0) {
    throw refuse("not a progress record");
  }
  std::memcpy(&sum, bytes.data() + bytes.size() - 8, 8);
  if (sum != StreamSession::checksum(bytes.substr(0, bytes.size() - 8))) throw refuse("checksum mismatch");
  std::memcpy(&len, bytes.data() + sizeof kRecordMagic, 8);
  const std::size_t at = sizeof kRecordMagic + 8;
  if (len > bytes.size() - at - 8) throw refuse("truncated");
  json doc = json::parse(bytes.substr(at, len), nullptr, false);
  if (doc.is_discarded() || !doc.is_object()) throw refuse("unreadable");
  for (const auto& [key, value] : identity.items()) {
    if (key == "inputs") continue;
    if (!doc.contains(key) || doc[key] != value) {
      throw InvalidArgument(key, "differs from the run that wrote the progress record '" + path + "' (" +
                                     (doc.contains(key) ? doc[key].dump() : "absent") + " there, " + value.dump() +
                                     " here); resume with the same options, or run without --resume");
    }
  }
  const json& have = doc["inputs"];
  for (const auto& want : identity["inputs"]) {
    const auto it =
        std::find_if(have.begin(), have.end(), [&](const json& h) { return h["option"] == want["option"]; });
    if (it == have.end() || *it != want) {
      throw InvalidArgument(want["option"].get<std::string>(),
                            "'" + want["path"].get<std::string>() + "' is not the file the progress record '" + path +
                                "' was made from (path, size or modification time differ); run without --resume");
    }
  }
  if (have.size() != identity["inputs"].size()) {
    throw InvalidArgument(
        "--resume", "the progress record '" + path + "' was made with other inputs (an initial state given or not)");
  }
  StreamSession session = StreamSession::restore_bytes(bytes.substr(at + len, bytes.size() - at - len - 8), cfg, path);
  if (!doc.contains("tokens_done") || doc["tokens_done"] != session.tokens()) throw refuse("token counts disagree");
  return session;
}

// Tokens [s0, s1) of every input: read by the pipeline's first stage while the slice before is computed.
struct StreamSlice {
  std::int64_t s0 = 0, s1 = 0;
  ForwardInputs in;
  Tensor h;
  std::string snapshot;  // the session's state after this slice
};

int cmd_forward_streamed(const InputFiles& in, const ForwardOutputs& out, const ForwardStreaming& st,
                         const MlstmOptions& o, const InputHeaders& hdr, bool as_json) {
  const auto dt = as_dtype(in);
  // Up-front validation with the library's own checks on a one-token slice plus the initial state, before
  // any output file exists (dtypes, head dimensions, state shapes; --check-finite on the state).
  ForwardInputs first;
  {
    npy::SeqSliceReader q(in.q, "--q", dt), k(in.k, "--k", dt), v(in.v, "--v", dt), i(in.i, "--i"), f(in.f, "--f");
    const std::int64_t t1 = std::min<std::int64_t>(1, hdr.S);
    first.q = q.read(0, t1);
    first.k = k.read(0, t1);
    first.v = v.read(0, t1);
    first.i = i.read(0, t1);
    first.f = f.read(0, t1);
  }
  first.c0 = read_optional(in.c0, "--c0", std::nullopt);
  first.n0 = read_optional(in.n0, "--n0", std::nullopt);
  first.m0 = read_optional(in.m0, "--m0", std::nullopt);
  StreamConfig cfg;
  cfg.B = hdr.B;
  cfg.NH = hdr.NH;
  cfg.DHQK = hdr.DK;
  cfg.DHHV = hdr.DV;
  cfg.options = o;
  if (runs_one_kernel(in)) {
    if (!in.devices.empty() && opencl::select_devices(in.devices).size() != 1) {
      throw InvalidArgument("--devices", "'" + in.devices +
                                             "' names several devices and --kernel runs on one; leave --kernel out "
                                             "to run the flow graph over all of them");
    }
    cfg.kernel = in.kernel;
    cfg.target = KernelTarget{in.devices};
  } else {
    cfg.devices = in.devices;
  }
  const json identity = stream_identity(in, st, o);
  const std::string record = progress_path_of(out.h);
  std::unique_ptr<StreamSession> session;
  try {
    validate_forward(first.args(), o);
    if (in.check_finite) {
      check_finite(first.c0.view(), "c0");
      check_finite(first.n0.view(), "n0");
      check_finite(first.m0.view(), "m0");
    }
    if (st.resume) {
      remove_stale_temporaries(record);
      session = std::make_unique<StreamSession>(read_progress(record, identity, cfg));
    } else if (first.c0.empty()) {
      session = std::make_unique<StreamSession>(cfg);
    } else {
      State s0{first.c0, first.n0.empty() ? Tensor::zeros({hdr.B, hdr.NH, hdr.DK}, DType::f32) : first.n0,
               first.m0.empty() ? Tensor::zeros({hdr.B, hdr.NH}, DType::f32) : first.m0};
      session = std::make_unique<StreamSession>(cfg, std::move(s0));
    }
  } catch (const InvalidArgument& e) {
    rethrow_as_cli(e);
  }
  first = ForwardInputs();
  // A fresh run forgets an earlier run's record first (a record must never describe another partial file).
  if (!st.resume) {
    remove_stale_temporaries(record);
    if (::unlink(record.c_str()) != 0 && errno != ENOENT) {
      throw Error("cannot remove the stale progress record '" + record + "': " + std::strerror(errno));
    }
  }
  const std::int64_t resumed_from = session->tokens();
  npy::SeqSliceWriter writer(out.h, {hdr.B, hdr.NH, hdr.S, hdr.DV}, hdr.dtype, st.resume);
  npy::SeqSliceReader rq(in.q, "--q", dt), rk(in.k, "--k", dt), rv(in.v, "--v", dt), ri(in.i, "--i"), rf(in.f, "--f");
  std::int64_t kill_after = -1;  // test hook (env.hpp): SIGKILL to itself after this many slices
  if (const auto k = env::get("MLSTM_TEST_KILL_AFTER_SLICES")) kill_after = std::stoll(*k);
  std::int64_t next = resumed_from, slices = 0;
  std::vector<std::string> devices;
  const auto t0 = Clock::now();
  try {
    // Three serial stages, at most three slices in flight (memory flat): read slice k+2 (pread), compute
    // slice k+1 (the session carries the state; with --devices it runs the flow graph), write slice k's h
    // at its strided positions, sync it, then record the progress.
    tbb::parallel_pipeline(3, tbb::make_filter<void, std::shared_ptr<StreamSlice>>(
                                  tbb::filter_mode::serial_in_order,
                                  [&](tbb::flow_control& fc) -> std::shared_ptr<StreamSlice> {
                                    if (next >= hdr.S) {
                                      fc.stop();
                                      return nullptr;
                                    }
                                    auto s = std::make_shared<StreamSlice>();
                                    s->s0 = next;
                                    s->s1 = std::min(hdr.S, next + st.tokens);
                                    next = s->s1;
                                    s->in.q = rq.read(s->s0, s->s1);
                                    s->in.k = rk.read(s->s0, s->s1);
                                    s->in.v = rv.read(s->s0, s->s1);
                                    s->in.i = ri.read(s->s0, s->s1);
                                    s->in.f = rf.read(s->s0, s->s1);
                                    return s;
                                  }) &
                                  tbb::make_filter<std::shared_ptr<StreamSlice>, std::shared_ptr<StreamSlice>>(
                                      tbb::filter_mode::serial_in_order,
                                      [&](std::shared_ptr<StreamSlice> s) {
                                        const ForwardArgs a = s->in.args();
                                        if (in.check_finite) check_finite(a);
                                        s->h = session->push(a);
                                        s->snapshot = session->snapshot_bytes();
                                        s->in = ForwardInputs();  // the inputs go as soon as they are used
                                        return s;
                                      }) &
                                  tbb::make_filter<std::shared_ptr<StreamSlice>, void>(
                                      tbb::filter_mode::serial_in_order, [&](std::shared_ptr<StreamSlice> s) {
                                        writer.write(s->s0, s->h.view());
                                        writer.sync();
                                        write_progress(record, identity, s->s1, s->snapshot);
                                        ++slices;
                                        if (kill_after >= 0 && slices >= kill_after && s->s1 < hdr.S) ::raise(SIGKILL);
                                      }));
    if (session->runner()) devices = session->runner()->last_plan().devices;
  } catch (const InvalidArgument& e) {
    rethrow_as_cli(e);
  }
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  // The last states, then h (its final name appears only complete), then the record goes.
  const State& last = session->state();
  write_out("--out-c", out.c, last.C);
  write_out("--out-n", out.n, last.n);
  write_out("--out-m", out.m, last.m);
  writer.commit();
  ::unlink(record.c_str());
  if (devices.empty()) devices = {runs_one_kernel(in) ? in.kernel : in.devices};
  const Shape shape_h{hdr.B, hdr.NH, hdr.S, hdr.DV};
  if (as_json) {
    std::cout << json{{"command", "forward"},
                      {"kernel", runs_one_kernel(in) ? in.kernel : "flow-graph"},
                      {"devices", devices},
                      {"shape_h", shape_h},
                      {"dtype", dtype_name(hdr.dtype)},
                      {"seconds", secs},
                      {"stream_tokens", st.tokens},
                      {"slices", slices},
                      {"resumed_from", resumed_from},
                      {"input_mib", static_cast<double>(hdr.bytes) / static_cast<double>(1 << 20)},
                      {"peak_rss_mib", peak_rss_mib()}}
                     .dump()
              << "\n";
  } else {
    std::cout << "forward: " << (runs_one_kernel(in) ? in.kernel : "flow graph over " + in.devices) << ", h "
              << shape_to_string(shape_h) << " " << dtype_name(hdr.dtype) << " -> " << out.h << " in " << slices
              << " slices of " << st.tokens << " tokens"
              << (resumed_from > 0 ? " (resumed at token " + std::to_string(resumed_from) + ")" : std::string()) << " ("
              << secs * 1e3 << " ms)\n";
  }
  return 0;
}

int cmd_forward(const InputFiles& in, const ForwardOutputs& out, const ForwardStreaming& st, bool as_json) {
  const KernelInfo info = kernel_info(in.kernel, false);
  const MlstmOptions o = options_of(in, info);
  check_outputs(input_paths(in), {{"--out", out.h}, {"--out-c", out.c}, {"--out-n", out.n}, {"--out-m", out.m}});
  if (st.resume && st.tokens == 0) {
    throw InvalidArgument("--resume", "continues a --stream-tokens run; give the same --stream-tokens");
  }
  const InputHeaders hdr = read_input_headers(in);
  const std::uint64_t limit = memory_limit_of(st);
  const std::uint64_t h_bytes =
      static_cast<std::uint64_t>(hdr.B * hdr.NH) * static_cast<std::uint64_t>(hdr.S * hdr.DV) * dtype_size(hdr.dtype);
  if (st.tokens > 0) {
    require_range(st.tokens, 1, kMaxTokens, "--stream-tokens");
    // About three slices are in flight (read, compute, write): inputs and h of each.
    const std::uint64_t per_token =
        static_cast<std::uint64_t>(hdr.B * hdr.NH) *
        static_cast<std::uint64_t>(token_bytes(hdr.DK, hdr.DV, hdr.dtype) +
                                   hdr.DV * static_cast<std::int64_t>(dtype_size(hdr.dtype)));
    const std::uint64_t slice_tokens =
        static_cast<std::uint64_t>(std::min(st.tokens, std::max<std::int64_t>(hdr.S, 1)));
    if (3 * slice_tokens * per_token > limit) {
      throw InvalidArgument("--stream-tokens", std::to_string(st.tokens) + " tokens per slice need about " +
                                                   mib_text(3 * slice_tokens * per_token) +
                                                   " in flight (three slices), more than the memory limit of " +
                                                   mib_text(limit) + "; pick fewer");
    }
    return cmd_forward_streamed(in, out, st, o, hdr, as_json);
  }
  // Whole arrays: inputs and h in memory at once. Larger than the limit is refused, never streamed behind the
  // user's back (the slice size decides the bits of h: it is the user's choice).
  if (hdr.bytes + h_bytes > limit) {
    throw InvalidArgument("--stream-tokens", "the inputs and h need " + mib_text(hdr.bytes + h_bytes) +
                                                 " in memory, more than the limit of " + mib_text(limit) +
                                                 (st.memory_limit > 0 ? " (--memory-limit)" : " (this machine)") +
                                                 "; stream the files in slices with --stream-tokens N");
  }
  const ForwardInputs l = load_inputs(in);
  ForwardResult r;
  try {
    if (in.check_finite) check_finite(l.args());
    Engine engine(in);
    const auto t0 = Clock::now();
    r = engine.forward(l.args(), o);
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    write_out("--out", out.h, r.h);
    write_out("--out-c", out.c, r.c);
    write_out("--out-n", out.n, r.n);
    write_out("--out-m", out.m, r.m);
    if (as_json) {
      std::cout << json{{"command", "forward"},
                        {"kernel", runs_one_kernel(in) ? in.kernel : "flow-graph"},
                        {"devices", engine.devices()},
                        {"shape_h", r.h.shape()},
                        {"dtype", dtype_name(r.h.dtype())},
                        {"seconds", secs},
                        {"input_mib", static_cast<double>(hdr.bytes) / static_cast<double>(1 << 20)},
                        {"peak_rss_mib", peak_rss_mib()}}
                       .dump()
                << "\n";
    } else {
      std::cout << "forward: " << engine.what(in) << ", h " << shape_to_string(r.h.shape()) << " "
                << dtype_name(r.h.dtype()) << " -> " << out.h << " (" << secs * 1e3 << " ms)\n";
    }
  } catch (const InvalidArgument& e) {
    rethrow_as_cli(e);
  }
  return 0;
}

struct BackwardFiles {
  std::string dh, dc, dn;
  std::string out_dq, out_dk, out_dv, out_di, out_df, out_dc0, out_dn0, out_dm0;
};

int cmd_backward(const InputFiles& in, const BackwardFiles& bf, bool as_json) {
  const KernelInfo info = kernel_info(in.kernel, false);
  if (!info.has_backward) throw InvalidArgument("--kernel", "'" + in.kernel + "' has no backward; see `mlstm kernels`");
  const MlstmOptions o = options_of(in, info);
  // Gradients of the initial state exist only for a given initial state: refused up front, not skipped.
  for (const auto& [option, path] :
       {std::pair{"--out-dc0", bf.out_dc0}, {"--out-dn0", bf.out_dn0}, {"--out-dm0", bf.out_dm0}}) {
    if (!path.empty() && in.c0.empty()) {
      throw InvalidArgument(option,
                            "needs the initial state (--c0, --n0, --m0): without one there is no gradient of it");
    }
  }
  std::vector<NamedPath> inputs = input_paths(in);
  inputs.insert(inputs.end(), {{"--dh", bf.dh}, {"--dc", bf.dc}, {"--dn", bf.dn}});
  check_outputs(inputs, {{"--out-dq", bf.out_dq},
                         {"--out-dk", bf.out_dk},
                         {"--out-dv", bf.out_dv},
                         {"--out-di", bf.out_di},
                         {"--out-df", bf.out_df},
                         {"--out-dc0", bf.out_dc0},
                         {"--out-dn0", bf.out_dn0},
                         {"--out-dm0", bf.out_dm0}});
  BackwardInputs l;
  static_cast<ForwardInputs&>(l) = load_inputs(in);
  l.dh = npy::read(bf.dh, "--dh");
  l.dc_last = read_optional(bf.dc, "--dc", std::nullopt);
  l.dn_last = read_optional(bf.dn, "--dn", std::nullopt);
  try {
    if (in.check_finite) {
      check_finite(l.args());
      check_finite(l.dh.view(), "dh");
      check_finite(l.dc_last.view(), "dc_last");
      check_finite(l.dn_last.view(), "dn_last");
    }
    const BackwardArgs b = l.backward_args();
    Engine engine(in);
    const auto t0 = Clock::now();
    const BackwardResult g = engine.backward(b, o);
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    write_out("--out-dq", bf.out_dq, g.dq);
    write_out("--out-dk", bf.out_dk, g.dk);
    write_out("--out-dv", bf.out_dv, g.dv);
    write_out("--out-di", bf.out_di, g.di);
    write_out("--out-df", bf.out_df, g.df);
    write_out("--out-dc0", bf.out_dc0, g.dc0);
    write_out("--out-dn0", bf.out_dn0, g.dn0);
    write_out("--out-dm0", bf.out_dm0, g.dm0);
    if (as_json) {
      std::cout << json{{"command", "backward"},
                        {"kernel", runs_one_kernel(in) ? in.kernel : "flow-graph"},
                        {"devices", engine.devices()},
                        {"seconds", secs},
                        {"initial_state_gradients", !g.dc0.empty()}}
                       .dump()
                << "\n";
    } else {
      std::cout << "backward: " << engine.what(in) << " (" << secs * 1e3 << " ms)\n";
    }
  } catch (const InvalidArgument& e) {
    rethrow_as_cli(e);
  }
  return 0;
}

struct StepFiles {
  std::string c, n, m, out_h, out_c, out_n, out_m;
};

int cmd_step(const InputFiles& in, const StepFiles& sf, bool as_json) {
  const KernelInfo info = kernel_info(in.kernel, true);
  const MlstmOptions o = options_of(in, info);
  check_outputs({{"--q", in.q},
                 {"--k", in.k},
                 {"--v", in.v},
                 {"--i", in.i},
                 {"--f", in.f},
                 {"--c", sf.c},
                 {"--n", sf.n},
                 {"--m", sf.m}},
                {{"--out", sf.out_h}, {"--out-c", sf.out_c}, {"--out-n", sf.out_n}, {"--out-m", sf.out_m}});
  const auto dt = as_dtype(in);
  const Tensor q = npy::read(in.q, "--q", dt), k = npy::read(in.k, "--k", dt), v = npy::read(in.v, "--v", dt);
  const Tensor i = npy::read(in.i, "--i"), f = npy::read(in.f, "--f");
  const Tensor c = read_optional(sf.c, "--c", std::nullopt), n = read_optional(sf.n, "--n", std::nullopt),
               m = read_optional(sf.m, "--m", std::nullopt);
  try {
    StepArgs a;
    a.q = q.view();
    a.k = k.view();
    a.v = v.view();
    a.i = i.view();
    a.f = f.view();
    if (!c.empty()) a.c = c.view();
    if (!n.empty()) a.n = n.view();
    if (!m.empty()) a.m = m.view();
    if (in.check_finite) {
      for (auto [t, name] :
           {std::pair{a.q, "q"}, {a.k, "k"}, {a.v, "v"}, {a.i, "i"}, {a.f, "f"}, {a.c, "c"}, {a.n, "n"}, {a.m, "m"}}) {
        check_finite(t, name);
      }
    }
    if (!in.devices.empty() && opencl::select_devices(in.devices).size() != 1) {
      throw InvalidArgument("--devices", "a step runs on one device; '" + in.devices + "' names several");
    }
    const StepResult r = get_step_kernel(in.kernel, KernelTarget{in.devices})->step(a, o);
    write_out("--out", sf.out_h, r.h);
    write_out("--out-c", sf.out_c, r.c);
    write_out("--out-n", sf.out_n, r.n);
    write_out("--out-m", sf.out_m, r.m);
    if (as_json) {
      std::cout << json{{"command", "step"}, {"kernel", in.kernel}, {"shape_h", r.h.shape()}}.dump() << "\n";
    } else {
      std::cout << "step: " << in.kernel << ", h " << shape_to_string(r.h.shape()) << "\n";
    }
  } catch (const InvalidArgument& e) {
    rethrow_as_cli(e);
  }
  return 0;
}

int cmd_kernels(bool as_json) {
  const auto list = available_kernels();
  if (as_json) {
    json arr = json::array();
    for (const auto& k : list) {
      json dts = json::array();
      for (auto d : k.dtypes) dts.push_back(dtype_name(d));
      arr.push_back({{"name", k.name},
                     {"form", form_name(k.form)},
                     {"device", k.device_kind},
                     {"backward", k.has_backward},
                     {"dtypes", dts},
                     {"description", k.description}});
    }
    std::cout << arr.dump(2) << "\n";
    return 0;
  }
  std::printf("%-34s %-10s %-7s %-5s %s\n", "name", "form", "device", "bw", "description");
  for (const auto& k : list) {
    std::printf("%-34s %-10s %-7s %-5s %s\n", k.name.c_str(), std::string(form_name(k.form)).c_str(),
                k.device_kind.c_str(), k.has_backward ? "yes" : "no", k.description.c_str());
  }
  return 0;
}

json opencl_devices() {
  json out = json::array();
  cl_uint np = 0;
  if (clGetPlatformIDs(0, nullptr, &np) != CL_SUCCESS || np == 0) return out;
  std::vector<cl_platform_id> ps(np);
  clGetPlatformIDs(np, ps.data(), nullptr);
  int index = 0;
  for (auto p : ps) {
    char pname[256] = {0};
    clGetPlatformInfo(p, CL_PLATFORM_NAME, sizeof pname, pname, nullptr);
    cl_uint nd = 0;
    if (clGetDeviceIDs(p, CL_DEVICE_TYPE_ALL, 0, nullptr, &nd) != CL_SUCCESS) continue;
    std::vector<cl_device_id> ds(nd);
    clGetDeviceIDs(p, CL_DEVICE_TYPE_ALL, nd, ds.data(), nullptr);
    for (auto d : ds) {
      char name[256] = {0}, version[256] = {0};
      cl_device_type type = 0;
      cl_ulong mem = 0;
      cl_uint cus = 0;
      clGetDeviceInfo(d, CL_DEVICE_NAME, sizeof name, name, nullptr);
      clGetDeviceInfo(d, CL_DEVICE_VERSION, sizeof version, version, nullptr);
      clGetDeviceInfo(d, CL_DEVICE_TYPE, sizeof type, &type, nullptr);
      clGetDeviceInfo(d, CL_DEVICE_GLOBAL_MEM_SIZE, sizeof mem, &mem, nullptr);
      clGetDeviceInfo(d, CL_DEVICE_MAX_COMPUTE_UNITS, sizeof cus, &cus, nullptr);
      out.push_back({{"index", index++},
                     {"platform", pname},
                     {"name", name},
                     {"version", version},
                     {"type", (type & CL_DEVICE_TYPE_GPU)   ? "gpu"
                              : (type & CL_DEVICE_TYPE_CPU) ? "cpu"
                                                            : "other"},
                     {"memory_mib", mem >> 20},
                     {"compute_units", cus}});
    }
  }
  return out;
}

json numa_nodes() {
  json out = json::array();
  hwloc_topology_t topo;
  if (hwloc_topology_init(&topo) != 0) return out;
  hwloc_topology_load(topo);
  const int n = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE);
  for (int i = 0; i < n; ++i) {
    hwloc_obj_t node = hwloc_get_obj_by_type(topo, HWLOC_OBJ_NUMANODE, static_cast<unsigned>(i));
    const int cores = hwloc_get_nbobjs_inside_cpuset_by_type(topo, node->cpuset, HWLOC_OBJ_CORE);
    const int pus = hwloc_get_nbobjs_inside_cpuset_by_type(topo, node->cpuset, HWLOC_OBJ_PU);
    out.push_back({{"node", node->os_index},
                   {"cores", cores},
                   {"pus", pus},
                   {"memory_mib", node->attr ? node->attr->numanode.local_memory >> 20 : 0}});
  }
  hwloc_topology_destroy(topo);
  return out;
}

int cmd_devices(bool as_json) {
  const json cl = opencl_devices();
  const json numa = numa_nodes();
  if (as_json) {
    std::cout << json{{"opencl", cl}, {"numa", numa}}.dump(2) << "\n";
    return 0;
  }
  std::cout << "OpenCL devices:\n";
  if (cl.empty()) std::cout << "  (none found)\n";
  for (const auto& d : cl) {
    std::cout << "  [" << d["index"] << "] " << d["type"].get<std::string>() << "  " << d["name"].get<std::string>()
              << "  (" << d["platform"].get<std::string>() << ", " << d["version"].get<std::string>() << ", "
              << d["compute_units"] << " CUs, " << d["memory_mib"] << " MiB)\n";
  }
  std::cout << "NUMA nodes (CPU workers, one TBB arena each):\n";
  for (const auto& n : numa) {
    std::cout << "  node " << n["node"] << ": " << n["cores"] << " cores, " << n["pus"] << " hardware threads, "
              << n["memory_mib"] << " MiB\n";
  }
  return 0;
}

// Synthetic inputs of one piece of a long sequence, deterministic in (seed, element): a counter-based
// generator (splitmix64 + Box-Muller), filled in parallel.
Tensor synthetic_normal(Shape shape, float mean, DType dtype, std::uint64_t seed) {
  const std::int64_t count = shape_numel(shape);
  std::vector<float> x(static_cast<std::size_t>(count));
  auto mix = [](std::uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  };
  tbb::parallel_for(tbb::blocked_range<std::int64_t>(0, (count + 1) / 2),
                    [&](const tbb::blocked_range<std::int64_t>& r) {
                      for (std::int64_t p = r.begin(); p < r.end(); ++p) {
                        const std::uint64_t z = mix(seed * 0x100000001b3ull + static_cast<std::uint64_t>(p));
                        const float u1 = (static_cast<float>(z >> 40) + 1.0f) * (1.0f / 16777217.0f);
                        const float u2 = static_cast<float>((z >> 16) & 0xffffff) * (1.0f / 16777216.0f);
                        const float rad = std::sqrt(-2.0f * std::log(u1));
                        x[static_cast<std::size_t>(2 * p)] = mean + rad * std::cos(6.2831853f * u2);
                        if (2 * p + 1 < count)
                          x[static_cast<std::size_t>(2 * p + 1)] = mean + rad * std::sin(6.2831853f * u2);
                      }
                    });
  return Tensor::from(x, std::move(shape), dtype);
}

ForwardInputs synthetic_piece(std::int64_t B, std::int64_t NH, std::int64_t len, std::int64_t DK, std::int64_t DV,
                              DType dtype, std::uint64_t seed) {
  ForwardInputs l;
  l.q = synthetic_normal({B, NH, len, DK}, 0, dtype, seed * 5 + 0);
  l.k = synthetic_normal({B, NH, len, DK}, 0, dtype, seed * 5 + 1);
  l.v = synthetic_normal({B, NH, len, DV}, 0, dtype, seed * 5 + 2);
  l.i = synthetic_normal({B, NH, len}, 0, DType::f32, seed * 5 + 3);
  l.f = synthetic_normal({B, NH, len}, 3, DType::f32, seed * 5 + 4);
  return l;
}

struct RunOptions {
  std::int64_t batch = 1, heads = 4, seq_len = 1 << 20, dqk = 128, dhv = 128, chunk_size = 128, piece = 16384;
  std::string dtype = "bfloat16", devices = "auto", mode = "auto";
  bool backward = false, progress = false;
  std::int64_t check_tokens = 2048;
  CLI::Option* piece_option = nullptr;  // to tell an explicit --piece from the default
};

// Max relative error of h over the first `check_tokens` tokens of a piece of `len` tokens, against the
// float64 reference (recurrent form) from the zero state.
double spot_check(const ForwardInputs& l, const RunOptions& ro, std::int64_t len, const Tensor& h,
                  const MlstmOptions& o) {
  double max_rel = 0.0;
  const ForwardResult r{h, {}, {}, {}};
  const std::int64_t ct = std::min(ro.check_tokens, len);
  const ForwardInputs& s = l;
  ForwardArgs sa = s.args();
  Tensor q = Tensor::copy_of(ConstTensorView(s.q.bytes(), s.q.dtype(), {ro.batch, ro.heads, ct, ro.dqk},
                                             {ro.heads * len * ro.dqk, len * ro.dqk, ro.dqk, 1}));
  Tensor k = Tensor::copy_of(ConstTensorView(s.k.bytes(), s.k.dtype(), {ro.batch, ro.heads, ct, ro.dqk},
                                             {ro.heads * len * ro.dqk, len * ro.dqk, ro.dqk, 1}));
  Tensor v = Tensor::copy_of(ConstTensorView(s.v.bytes(), s.v.dtype(), {ro.batch, ro.heads, ct, ro.dhv},
                                             {ro.heads * len * ro.dhv, len * ro.dhv, ro.dhv, 1}));
  Tensor i =
      Tensor::copy_of(ConstTensorView(s.i.bytes(), DType::f32, {ro.batch, ro.heads, ct}, {ro.heads * len, len, 1}));
  Tensor f =
      Tensor::copy_of(ConstTensorView(s.f.bytes(), DType::f32, {ro.batch, ro.heads, ct}, {ro.heads * len, len, 1}));
  sa.q = q.view();
  sa.k = k.view();
  sa.v = v.view();
  sa.i = i.view();
  sa.f = f.view();
  const ForwardResult ref = reference::recurrent_forward(sa, o);
  const Tensor got = Tensor::copy_of(ConstTensorView(r.h.bytes(), r.h.dtype(), {ro.batch, ro.heads, ct, ro.dhv},
                                                     {ro.heads * len * ro.dhv, len * ro.dhv, ro.dhv, 1}),
                                     DType::f64);
  double max_abs = 0, max_ref = 0;
  const auto gv = got.to_vector(), rv = ref.h.to_vector();
  for (std::size_t e = 0; e < gv.size(); ++e) {
    max_abs = std::max(max_abs, std::fabs(gv[e] - rv[e]));
    max_ref = std::max(max_ref, std::fabs(rv[e]));
  }
  max_rel = max_abs / std::max(max_ref, 1e-30);
  return max_rel;
}

// The first GPU whose tensor-core path takes this problem (pipeline mode), or null.
std::shared_ptr<opencl::Device> pipeline_device(const RunOptions& ro, DType dtype, const MlstmOptions& o) {
  ProblemShape p;
  p.B = ro.batch;
  p.NH = ro.heads;
  p.S = ro.piece;
  p.DHQK = ro.dqk;
  p.DHHV = ro.dhv;
  p.dtype = dtype;
  const std::string spec = ro.devices == "auto" ? "gpu" : ro.devices;
  std::vector<opencl::DeviceInfo> candidates;
  try {
    candidates = opencl::select_devices(spec);
  } catch (const InvalidArgument&) {
    return nullptr;  // no GPU
  }
  for (const auto& d : candidates) {
    if (d.type == opencl::DeviceType::gpu && opencl::tensor_core_support(d).available &&
        opencl::tensor_core_fit(p, o).empty())
      return opencl::open_device(d);
  }
  return nullptr;
}

// Pipeline mode: the sequence streamed piece by piece through one GPU in a flow graph (DeviceStreamNode,
// an async_node): uploads, kernels and downloads of consecutive pieces overlap; the state stays on the GPU.
int run_pipeline(const RunOptions& ro, DType dtype, const MlstmOptions& o, std::shared_ptr<opencl::Device> gpu,
                 bool as_json) {
  const std::int64_t piece = std::min(ro.piece, ro.seq_len);
  opencl::DeviceStream::Config cfg;
  cfg.B = ro.batch;
  cfg.NH = ro.heads;
  cfg.DHQK = ro.dqk;
  cfg.DHHV = ro.dhv;
  cfg.max_piece = piece;
  cfg.dtype = dtype;
  cfg.options = o;
  if (!as_json) {
    std::cout << "problem: B=" << ro.batch << " NH=" << ro.heads << " S=" << ro.seq_len << " DHQK=" << ro.dqk
              << " DHHV=" << ro.dhv << " " << dtype_name(dtype) << ", chunk " << ro.chunk_size
              << ", mode pipeline: pieces of " << piece << " tokens through " << gpu->name()
              << " (tensor cores; uploads, kernels and downloads overlapped; state on the device)\n";
  }
  constexpr int kDistinctPieces = 4;
  std::vector<ForwardInputs> pieces;
  for (int p = 0; p < kDistinctPieces; ++p)
    pieces.push_back(
        synthetic_piece(ro.batch, ro.heads, piece, ro.dqk, ro.dhv, dtype, 1234567 + static_cast<std::uint64_t>(p)));
  const std::int64_t tail = ro.seq_len % piece;
  ForwardInputs last =
      tail ? synthetic_piece(ro.batch, ro.heads, tail, ro.dqk, ro.dhv, dtype, 7654321) : ForwardInputs{};
  Progress progress(ro.seq_len, ro.progress || isatty(2));
  double max_rel = 0.0;
  std::int64_t done = 0;
  Tensor first_h;
  const auto start = Clock::now();
  tbb::flow::graph g;
  std::exception_ptr failed;
  {
    nodes::DeviceStreamNode stream(g, gpu, cfg);
    tbb::flow::function_node<nodes::StreamOutput> sink(g, tbb::flow::serial, [&](const nodes::StreamOutput& out) {
      if (out.index == 0 && ro.check_tokens > 0) first_h = out.h;  // checked after the timed stream
      done += out.h.dim(2);
      progress.update(done);
      return tbb::flow::continue_msg{};
    });
    tbb::flow::make_edge(stream.node(), sink);
    std::uint64_t index = 0;
    for (std::int64_t t0 = 0; t0 < ro.seq_len; t0 += piece, ++index) {
      const bool partial = ro.seq_len - t0 < piece;
      const ForwardInputs& l = partial ? last : pieces[index % kDistinctPieces];
      stream.node().try_put(nodes::StreamPiece{index, l.args(), nullptr});
    }
    g.wait_for_all();
    failed = stream.error();
  }
  if (failed) std::rethrow_exception(failed);
  const double secs = std::chrono::duration<double>(Clock::now() - start).count();
  if (!first_h.empty()) max_rel = spot_check(pieces[0], ro, first_h.dim(2), first_h, o);
  const double tokens = static_cast<double>(ro.batch * ro.seq_len);
  const bool check_ok = max_rel < 2e-2;
  if (as_json) {
    std::cout << json{{"command", "run"},
                      {"mode", "pipeline"},
                      {"tokens", tokens},
                      {"seconds", secs},
                      {"tokens_per_second", tokens / secs},
                      {"peak_rss_mib", peak_rss_mib()},
                      {"spot_check_rel_error", max_rel},
                      {"spot_check_ok", check_ok},
                      {"devices", gpu->name()},
                      {"revision", MLSTM_GIT_REVISION}}
                     .dump()
              << "\n";
  } else {
    std::printf("throughput: %.0f tokens/s (%.0f tokens in %.2f s)\n", tokens / secs, tokens, secs);
    std::printf("peak memory: %.1f MiB\n", peak_rss_mib());
    std::printf("spot check vs float64 reference (first %lld tokens): max rel error %.3g  %s\n",
                static_cast<long long>(std::min(ro.check_tokens, ro.seq_len)), max_rel, check_ok ? "OK" : "FAILED");
  }
  return check_ok ? 0 : 1;
}

int cmd_run(const RunOptions& ro, bool as_json) {
  // Every size in range before anything is allocated; the inputs of a piece (and, resident, of the whole
  // sequence) must fit in memory.
  require_range(ro.batch, 1, kMaxDim, "--batch");
  require_range(ro.heads, 1, kMaxDim, "--heads");
  require_range(ro.seq_len, 1, kMaxTokens, "--seq-len");
  if (std::int64_t tokens = 0; __builtin_mul_overflow(ro.batch, ro.seq_len, &tokens) || tokens > kMaxTokens) {
    throw InvalidArgument("--seq-len", "--batch x --seq-len must be at most 2^50 tokens");
  }
  require_range(ro.dqk, 1, kMaxDim, "--dqk");
  require_range(ro.dhv, 1, kMaxDim, "--dhv");
  require_range(ro.chunk_size, 1, kMaxChunkSize, "--chunk-size");
  require_range(ro.piece, 1, kMaxDim, "--piece");
  require_range(ro.check_tokens, 0, std::numeric_limits<std::int64_t>::max(), "--check-tokens");
  const bool resident_mode = ro.mode == "resident";
  if (resident_mode && ro.piece_option && ro.piece_option->count() > 0) {
    throw InvalidArgument("--piece", "has no effect with --mode resident (the whole sequence is one piece)");
  }
  if (ro.mode == "pipeline" && ro.backward) {
    throw InvalidArgument("--backward", "--mode pipeline runs the forward only; use --mode stream or resident");
  }
  const DType dtype = parse_dtype(ro.dtype, "--dtype");
  {
    const std::int64_t len = resident_mode ? ro.seq_len : std::min(ro.piece, ro.seq_len);
    const std::int64_t copies = resident_mode ? 1 : 4;  // the tiled sequence, or the distinct pieces
    const std::string what = std::string("--batch/--heads/") +
                             (ro.piece < ro.seq_len && !resident_mode ? "--piece" : "--seq-len") + "/--dqk/--dhv";
    require_fits_memory({ro.batch, ro.heads, len, token_bytes(ro.dqk, ro.dhv, dtype), copies}, what);
    require_fits_memory({ro.batch, ro.heads, ro.dqk, ro.dhv, 4}, "--batch/--heads/--dqk/--dhv");
  }
  MlstmOptions o;
  o.chunk_size = ro.chunk_size;
  validate_options(o);
  // Every usable device: the CPU workers, plus the OpenCL GPUs when there are any.
  std::string spec = ro.devices;
  if (spec == "auto") {
    bool gpu = false;
    for (const auto& d : opencl::list_devices()) gpu = gpu || d.type == opencl::DeviceType::gpu;
    spec = gpu ? "workers+gpu:all" : "workers";
  }
  if (ro.mode == "pipeline" || (ro.mode == "auto" && !ro.backward && ro.devices == "auto")) {
    if (auto gpu = pipeline_device(ro, dtype, o); gpu) return run_pipeline(ro, dtype, o, gpu, as_json);
    if (ro.mode == "pipeline")
      throw InvalidArgument("--mode",
                            "pipeline needs an OpenCL GPU with tensor cores and a problem they take "
                            "(bfloat16/float16, head dims multiples of 16, chunk 64 or 128)");
  }
  // The stream: pieces through the flow graph on `spec`, the state carried between them by the session.
  StreamConfig cfg;
  cfg.B = ro.batch;
  cfg.NH = ro.heads;
  cfg.DHQK = ro.dqk;
  cfg.DHHV = ro.dhv;
  cfg.options = o;
  cfg.devices = spec;
  cfg.balancing = graph::Balancing::calibrated;  // shares by measured device speed
  StreamSession session(cfg);
  if (!as_json) {
    ProblemShape shape;
    shape.B = ro.batch;
    shape.NH = ro.heads;
    shape.S = ro.mode == "resident" ? ro.seq_len : std::min(ro.piece, ro.seq_len);
    shape.DHQK = ro.dqk;
    shape.DHHV = ro.dhv;
    std::cout << "problem: B=" << ro.batch << " NH=" << ro.heads << " S=" << ro.seq_len << " DHQK=" << ro.dqk
              << " DHHV=" << ro.dhv << " " << dtype_name(dtype) << ", chunk " << ro.chunk_size << ", mode "
              << (ro.mode == "auto" ? "stream" : ro.mode)
              << (ro.mode == "resident"
                      ? std::string(", resident: the whole sequence in one graph run")
                      : ", streamed in pieces of " + std::to_string(ro.piece) + " tokens carrying (C,n,m)")
              << (ro.backward ? ", forward+backward per piece (the backward sequence parallel through the graph too)"
                              : "")
              << "\n"
              << (ro.mode == "resident" ? "" : "per piece, ") << session.runner()->plan(shape, o).describe() << "\n";
  }
  Progress progress(ro.seq_len, ro.progress || isatty(2));
  double max_rel = 0.0;
  double compute_secs = 0.0;
  const auto start = Clock::now();
  // A few random pieces generated up front and cycled (generating 1M tokens of fresh normals would cost
  // more than the mLSTM itself); the carried state makes every piece's output different.
  constexpr int kDistinctPieces = 4;
  std::vector<ForwardInputs> pieces;
  for (int p = 0; p < kDistinctPieces; ++p) {
    pieces.push_back(synthetic_piece(ro.batch, ro.heads, std::min(ro.piece, ro.seq_len), ro.dqk, ro.dhv, dtype,
                                     1234567 + static_cast<std::uint64_t>(p)));
  }
  // resident: the whole sequence in memory (the same pieces, tiled), one pass through the graph.
  const bool resident = ro.mode == "resident";
  ForwardInputs full;
  if (resident) {
    auto tile = [&](Tensor ForwardInputs::*member, std::int64_t inner) {
      const Tensor& first = pieces[0].*member;
      Shape shape = first.shape();
      shape[2] = ro.seq_len;
      Tensor out(shape, first.dtype());
      const std::int64_t P = first.dim(2);
      const std::size_t es = dtype_size(first.dtype());
      for (std::int64_t r = 0; r < ro.batch * ro.heads; ++r) {
        for (std::int64_t t0 = 0; t0 < ro.seq_len; t0 += P) {
          const Tensor& src = pieces[static_cast<std::size_t>((t0 / P) % kDistinctPieces)].*member;
          const std::int64_t len = std::min(P, ro.seq_len - t0);
          std::memcpy(out.bytes() + static_cast<std::size_t>((r * ro.seq_len + t0) * inner) * es,
                      src.bytes() + static_cast<std::size_t>(r * P * inner) * es,
                      static_cast<std::size_t>(len * inner) * es);
        }
      }
      return out;
    };
    full.q = tile(&ForwardInputs::q, ro.dqk);
    full.k = tile(&ForwardInputs::k, ro.dqk);
    full.v = tile(&ForwardInputs::v, ro.dhv);
    full.i = tile(&ForwardInputs::i, 1);
    full.f = tile(&ForwardInputs::f, 1);
  }
  const std::int64_t step = resident ? ro.seq_len : ro.piece;
  std::int64_t piece_index = 0;
  for (std::int64_t t0 = 0; t0 < ro.seq_len; t0 += step, ++piece_index) {
    const std::int64_t len = std::min(step, ro.seq_len - t0);
    ForwardInputs l = resident ? full : pieces[static_cast<std::size_t>(piece_index % kDistinctPieces)];
    if (len < l.q.dim(2)) l = synthetic_piece(ro.batch, ro.heads, len, ro.dqk, ro.dhv, dtype, 7654321);
    const ForwardArgs a = l.args();
    const auto c0 = Clock::now();
    const Tensor h = session.push(a);
    if (ro.backward) (void)session.backward_of_last_piece(a, h.view());  // dh = h
    compute_secs += std::chrono::duration<double>(Clock::now() - c0).count();
    if (t0 == 0 && ro.check_tokens > 0) max_rel = spot_check(l, ro, len, h, o);
    progress.update(t0 + len);
  }
  const double secs = std::chrono::duration<double>(Clock::now() - start).count();
  const double tokens = static_cast<double>(ro.batch * ro.seq_len);
  const bool check_ok = max_rel < (dtype == DType::f32 ? 1e-4 : 2e-2);
  if (as_json) {
    std::cout << json{{"command", "run"},
                      {"tokens", tokens},
                      {"seconds", secs},
                      {"compute_seconds", compute_secs},
                      {"tokens_per_second", tokens / secs},
                      {"peak_rss_mib", peak_rss_mib()},
                      {"spot_check_rel_error", max_rel},
                      {"spot_check_ok", check_ok},
                      {"devices", spec},
                      {"revision", MLSTM_GIT_REVISION}}
                     .dump()
              << "\n";
  } else {
    std::printf("throughput: %.0f tokens/s (%.0f tokens in %.2f s; kernels %.2f s)\n", tokens / secs, tokens, secs,
                compute_secs);
    std::printf("peak memory: %.1f MiB\n", peak_rss_mib());
    std::printf("spot check vs float64 reference (first %lld tokens): max rel error %.3g  %s\n",
                static_cast<long long>(std::min(ro.check_tokens, ro.seq_len)), max_rel, check_ok ? "OK" : "FAILED");
  }
  return check_ok ? 0 : 1;
}

struct BenchOptions {
  std::int64_t tokens = 16384, heads = 4, dqk = 128, dhv = 128, repeats = 3;
  std::vector<std::int64_t> seq_lens{512, 1024, 2048, 4096, 8192, 16384};
  std::vector<std::int64_t> chunk_sizes{64, 128};
  std::vector<std::string> kernels{"chunkwise--cpu_xl_chunk", "chunkwise--cpu_limit_chunk"};
  std::vector<std::int64_t> head_dims;     // optional sweep: DHQK = DHHV = each value
  std::vector<std::string> graph_devices;  // optional sweep: the flow graph on each device spec
  std::int64_t weak_seq_len = 0;           // tokens per device for weak scaling (0: the largest --seq-lens)
  std::string dtype = "float32", csv = "bench.csv", json_out = "bench.json";
  bool backward = false;
};

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown";
}

int bench(const BenchOptions& bo, DType dtype, bool as_json);

// Every option of bench in range, and every value used (a sequence length that does not divide --tokens
// would be skipped: refused instead), before anything is allocated or measured.
void check_bench(const BenchOptions& bo, DType dtype) {
  require_range(bo.tokens, 1, kMaxTokens, "--tokens");
  require_range(bo.heads, 1, kMaxDim, "--heads");
  require_range(bo.dqk, 1, kMaxDim, "--dqk");
  require_range(bo.dhv, 1, kMaxDim, "--dhv");
  require_range(bo.repeats, 1, 1000000, "--repeats");
  auto nonempty = [](bool empty, const char* option) {
    if (empty) throw InvalidArgument(option, "needs at least one value");
  };
  nonempty(bo.seq_lens.empty(), "--seq-lens");
  nonempty(bo.chunk_sizes.empty(), "--chunk-sizes");
  nonempty(bo.kernels.empty(), "--kernels");
  for (const auto S : bo.seq_lens) {
    require_range(S, 1, bo.tokens, "--seq-lens");
    if (bo.tokens % S != 0) {
      throw InvalidArgument("--seq-lens", std::to_string(S) + " does not divide --tokens " + std::to_string(bo.tokens));
    }
  }
  for (const auto L : bo.chunk_sizes) require_range(L, 1, kMaxChunkSize, "--chunk-sizes");
  for (const auto d : bo.head_dims) require_range(d, 1, kMaxDim, "--head-dims");
  require_range(bo.weak_seq_len, 0, kMaxTokens, "--weak-seq-len");
  if (bo.weak_seq_len > 0 && bo.graph_devices.empty()) {
    throw InvalidArgument("--weak-seq-len", "has no effect without --graph-devices");
  }
  for (const auto& name : bo.kernels) {
    const KernelInfo info = [&] {
      try {
        return kernel_info(name, false);
      } catch (const InvalidArgument& e) {
        rethrow_as_cli(e, {{"--kernel", "--kernels"}});
      }
    }();
    if (bo.backward && !info.has_backward)
      throw InvalidArgument("--kernels", "'" + name + "' has no backward (--backward)");
    if (!info.dtypes.empty() && std::find(info.dtypes.begin(), info.dtypes.end(), dtype) == info.dtypes.end()) {
      throw InvalidArgument("--dtype", "kernel '" + name + "' does not take " + std::string(dtype_name(dtype)));
    }
  }
  const std::int64_t S_max = *std::max_element(bo.seq_lens.begin(), bo.seq_lens.end());
  require_fits_memory({bo.tokens, bo.heads, token_bytes(bo.dqk, bo.dhv, dtype)}, "--tokens/--heads/--dqk/--dhv");
  require_fits_memory({bo.heads, bo.dqk, bo.dhv, 4}, "--heads/--dqk/--dhv");
  for (const auto d : bo.head_dims) {
    require_fits_memory({std::max<std::int64_t>(1, bo.tokens / S_max) * S_max, bo.heads, token_bytes(d, d, dtype)},
                        "--head-dims/--tokens/--heads");
    require_fits_memory({bo.heads, d, d, 4}, "--head-dims/--heads");
  }
  check_outputs({}, {{"--csv", bo.csv}, {"--json-out", bo.json_out}});
}

int cmd_bench(const BenchOptions& bo, bool as_json) {
  const DType dtype = parse_dtype(bo.dtype, "--dtype");
  check_bench(bo, dtype);
  try {
    return bench(bo, dtype, as_json);
  } catch (const InvalidArgument& e) {
    // A kernel that cannot take the swept problem names q ("parallel--opencl takes S <= 16384"): --kernels.
    rethrow_as_cli(e, {{"chunk_size", "--chunk-sizes"},
                       {"kernel", "--kernels"},
                       {"devices", "--graph-devices"},
                       {"q", "--kernels"},
                       {"v", "--kernels"}});
  }
}

int bench(const BenchOptions& bo, DType dtype, bool as_json) {
  json results = json::array();
  std::ostringstream csv;
  csv << "kernel,B,NH,S,DHQK,DHHV,dtype,chunk,pass,median_ms,tokens_per_s\n";
  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  auto document = [&] {
    return json{
        {"machine", {{"hostname", host}, {"cpu", cpu_model()}, {"cores", sysconf(_SC_NPROCESSORS_ONLN)}}},
        {"revision", MLSTM_GIT_REVISION},
        {"timestamp",
         std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count()},
        {"results", results}};
  };
  // Both files are replaced atomically after every measured row: a sweep cut short (a time limit) keeps the
  // rows measured so far, and a failed write leaves the previous complete file, never half of one.
  auto save = [&] {
    write_file_atomically(bo.csv, csv.str());
    write_file_atomically(bo.json_out, document().dump(2) + "\n");
  };
  for (const auto& kname : bo.kernels) {
    auto kernel = get_kernel(kname);
    for (auto S : bo.seq_lens) {
      if (S > bo.tokens || bo.tokens % S != 0) continue;
      const std::int64_t B = bo.tokens / S;
      const ForwardInputs l = synthetic_piece(B, bo.heads, S, bo.dqk, bo.dhv, dtype, 99);
      for (auto L : bo.chunk_sizes) {
        MlstmOptions o;
        o.chunk_size = L;
        for (int pass = 0; pass < (bo.backward ? 2 : 1); ++pass) {
          std::vector<double> times;
          for (std::int64_t rep = 0; rep <= bo.repeats; ++rep) {
            const auto t0 = Clock::now();
            ForwardResult r = kernel->forward(l.args(), o);
            if (pass == 1) {
              BackwardArgs b;
              b.inputs = l.args();
              b.dh = r.h.view();
              (void)kernel->backward(b, o);
            }
            if (rep > 0) times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());  // rep 0: warm-up
          }
          std::sort(times.begin(), times.end());
          const double med = times[times.size() / 2];
          const char* pass_name = pass == 0 ? "fw" : "fwbw";
          csv << kname << ',' << B << ',' << bo.heads << ',' << S << ',' << bo.dqk << ',' << bo.dhv << ','
              << dtype_name(dtype) << ',' << L << ',' << pass_name << ',' << med * 1e3 << ','
              << static_cast<double>(bo.tokens) / med << '\n';
          results.push_back({{"kernel", kname},
                             {"B", B},
                             {"NH", bo.heads},
                             {"S", S},
                             {"DHQK", bo.dqk},
                             {"DHHV", bo.dhv},
                             {"dtype", dtype_name(dtype)},
                             {"chunk", L},
                             {"pass", pass_name},
                             {"median_ms", med * 1e3},
                             {"tokens_per_s", static_cast<double>(bo.tokens) / med}});
          if (!as_json) {
            std::printf("%-30s S=%6lld B=%4lld chunk=%4lld %-4s %9.2f ms %10.0f tokens/s\n", kname.c_str(),
                        static_cast<long long>(S), static_cast<long long>(B), static_cast<long long>(L), pass_name,
                        med * 1e3, static_cast<double>(bo.tokens) / med);
            std::fflush(stdout);
          }
          save();
        }
      }
    }
  }
  // Head-dimension sweep (first kernel, first chunk size, S = the largest sequence length).
  auto record = [&](const std::string& kernel, std::int64_t B, std::int64_t S, std::int64_t dqk, std::int64_t dhv,
                    std::int64_t L, const std::string& pass, double med, double tokens, const std::string& extra) {
    csv << kernel << ',' << B << ',' << bo.heads << ',' << S << ',' << dqk << ',' << dhv << ',' << dtype_name(dtype)
        << ',' << L << ',' << pass << ',' << med * 1e3 << ',' << tokens / med << '\n';
    results.push_back({{"kernel", kernel},
                       {"B", B},
                       {"NH", bo.heads},
                       {"S", S},
                       {"DHQK", dqk},
                       {"DHHV", dhv},
                       {"dtype", dtype_name(dtype)},
                       {"chunk", L},
                       {"pass", pass},
                       {"median_ms", med * 1e3},
                       {"tokens_per_s", tokens / med},
                       {"sweep", extra}});
    if (!as_json) {
      std::printf("%-30s S=%6lld B=%4lld D=%4lld/%-4lld chunk=%4lld %-6s %9.2f ms %10.0f tokens/s  %s\n",
                  kernel.c_str(), static_cast<long long>(S), static_cast<long long>(B), static_cast<long long>(dqk),
                  static_cast<long long>(dhv), static_cast<long long>(L), pass.c_str(), med * 1e3, tokens / med,
                  extra.c_str());
      std::fflush(stdout);  // rows show up as they are measured (a long sweep cut short keeps them)
    }
    save();
  };
  auto median_of = [&](const std::function<void()>& fn) {
    std::vector<double> times;
    for (std::int64_t rep = 0; rep <= bo.repeats; ++rep) {
      const auto t0 = Clock::now();
      fn();
      if (rep > 0) times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
  };
  const std::int64_t S_max = *std::max_element(bo.seq_lens.begin(), bo.seq_lens.end());
  const std::int64_t L0 = bo.chunk_sizes.front();
  for (auto d : bo.head_dims) {
    const std::int64_t B = std::max<std::int64_t>(1, bo.tokens / S_max);
    const ForwardInputs l = synthetic_piece(B, bo.heads, S_max, d, d, dtype, 98);
    MlstmOptions o;
    o.chunk_size = L0;
    auto kernel = get_kernel(bo.kernels.front());
    const double med = median_of([&] { (void)kernel->forward(l.args(), o); });
    record(bo.kernels.front(), B, S_max, d, d, L0, "fw", med, static_cast<double>(B * S_max), "head_dim");
  }
  // Device sweep through the flow graph: strong scaling (the same tokens on every device set) and weak
  // scaling (tokens proportional to the number of devices).
  for (const auto& spec : bo.graph_devices) {
    graph::FlowGraphRunner runner(spec);
    const auto ndev = static_cast<std::int64_t>(runner.devices().size());
    require_fits_memory(
        {bo.weak_seq_len > 0 ? bo.weak_seq_len : S_max, ndev, bo.heads, token_bytes(bo.dqk, bo.dhv, dtype)},
        bo.weak_seq_len > 0 ? "--weak-seq-len/--graph-devices" : "--seq-lens/--graph-devices");
    MlstmOptions o;
    o.chunk_size = L0;
    for (const char* scaling : {"strong", "weak"}) {
      const std::int64_t S =
          std::string(scaling) == "strong" ? S_max : (bo.weak_seq_len > 0 ? bo.weak_seq_len : S_max) * ndev;
      const ForwardInputs l = synthetic_piece(1, bo.heads, S, bo.dqk, bo.dhv, dtype, 97);
      const std::string what = std::string(scaling) + "_scaling devices=" + std::to_string(ndev);
      // Sequence parallel (segments over the devices) and head split (rows over the devices), forward and,
      // with --backward, forward + backward (dh = h).
      for (const bool head_split : {false, true}) {
        const std::string kernel = "graph[" + spec + "]" + (head_split ? " head split" : "");
        ForwardResult fw;
        const double med =
            median_of([&] { fw = head_split ? runner.forward_head_split(l.args(), o) : runner.forward(l.args(), o); });
        record(kernel, 1, S, bo.dqk, bo.dhv, L0, "fw", med, static_cast<double>(S), what);
        if (!bo.backward) continue;
        BackwardArgs b;
        b.inputs = l.args();
        b.dh = fw.h.view();
        const double med_bw = median_of([&] {
          (void)(head_split ? runner.forward_head_split(l.args(), o) : runner.forward(l.args(), o));
          (void)(head_split ? runner.backward_head_split(b, o) : runner.backward(b, o));
        });
        record(kernel, 1, S, bo.dqk, bo.dhv, L0, "fwbw", med_bw, static_cast<double>(S), what);
      }
    }
    // Streaming vs resident: the same S_max tokens in 8 pieces with the state carried, against one pass
    // (the strong-scaling row above).
    {
      const ForwardInputs l = synthetic_piece(1, bo.heads, S_max, bo.dqk, bo.dhv, dtype, 97);
      const std::int64_t piece = std::max<std::int64_t>(L0, S_max / 8);
      const double med = median_of([&] {
        StreamConfig cfg;
        cfg.B = 1;
        cfg.NH = bo.heads;
        cfg.DHQK = bo.dqk;
        cfg.DHHV = bo.dhv;
        cfg.options = o;
        Tensor C = Tensor::zeros({1, bo.heads, bo.dqk, bo.dhv}, DType::f32),
               n = Tensor::zeros({1, bo.heads, bo.dqk}, DType::f32), m = Tensor::zeros({1, bo.heads}, DType::f32);
        for (std::int64_t t0 = 0; t0 < S_max; t0 += piece) {
          const std::int64_t t1 = std::min(S_max, t0 + piece);
          auto slice = [&](const Tensor& t, std::int64_t inner) {
            Shape shape = t.shape();
            shape[2] = t1 - t0;
            Shape strides = contiguous_strides(t.shape());
            return ConstTensorView(t.bytes() + static_cast<std::size_t>(t0 * inner) * dtype_size(t.dtype()), t.dtype(),
                                   shape, strides);
          };
          ForwardArgs a;
          a.q = slice(l.q, bo.dqk);
          a.k = slice(l.k, bo.dqk);
          a.v = slice(l.v, bo.dhv);
          a.i = slice(l.i, 1);
          a.f = slice(l.f, 1);
          a.c0 = C.view();
          a.n0 = n.view();
          a.m0 = m.view();
          ForwardResult r = runner.forward(a, o);
          C = std::move(r.c);
          n = std::move(r.n);
          m = std::move(r.m);
        }
      });
      record("graph[" + spec + "]", 1, S_max, bo.dqk, bo.dhv, L0, "fw", med, static_cast<double>(S_max),
             "streaming pieces=" + std::to_string((S_max + piece - 1) / piece) + " devices=" + std::to_string(ndev));
    }
  }
  save();  // also when no row was measured: the files say so
  if (as_json) std::cout << document().dump() << "\n";
  return 0;
}

}  // namespace

// Messages are one line on stderr (a library message may hold line breaks, e.g. an OpenCL build log).
static std::string one_line(std::string text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
  std::replace(text.begin(), text.end(), '\n', ' ');
  std::replace(text.begin(), text.end(), '\r', ' ');
  return text;
}

int main(int argc, char** argv) {
  CLI::App app{"mlstm: the mLSTM cell over very long sequences (mlstm-flow " MLSTM_VERSION ", " MLSTM_GIT_REVISION ")"};
  app.require_subcommand(1);
  std::string log_level = "warn";
  bool as_json = false;
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, off")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));
  app.add_flag("--json", as_json, "machine-readable output (JSON)");

  RunOptions ro;
  auto* run = app.add_subcommand(
      "run", "the main job: a long synthetic sequence streamed through the flow graph on every usable device");
  run->add_option("--batch", ro.batch, "B");
  run->add_option("--heads", ro.heads, "NH");
  run->add_option("--seq-len", ro.seq_len, "S (tokens per batch row)");
  run->add_option("--dqk", ro.dqk, "DHQK");
  run->add_option("--dhv", ro.dhv, "DHHV");
  run->add_option("--dtype", ro.dtype, "float32, float16, bfloat16");
  run->add_option("--chunk-size", ro.chunk_size, "chunk size");
  ro.piece_option = run->add_option("--piece", ro.piece, "tokens per streamed piece (not with --mode resident)");
  run->add_option("--devices", ro.devices,
                  "devices: auto (CPU workers + OpenCL GPUs), workers, an OpenCL spec (gpu:all, 0,1, cpu), or a+b");
  run->add_option("--mode", ro.mode, "auto (pipeline on a tensor-core GPU, else stream), pipeline, stream or resident")
      ->check(CLI::IsMember({"auto", "pipeline", "stream", "resident"}));
  run->add_flag("--backward", ro.backward, "forward + backward");
  run->add_flag("--progress", ro.progress, "progress bar even when stderr is not a terminal");
  run->add_option("--check-tokens", ro.check_tokens, "tokens spot-checked against the float64 reference (0: none)");

  InputFiles fin;
  ForwardOutputs fout;
  auto* forward = app.add_subcommand("forward", "forward pass on .npy inputs");
  add_input_options(forward, fin, true);
  forward->add_option("--out", fout.h, "h output .npy (input dtype)")->required()->check(path_check());
  forward->add_option("--out-c", fout.c, "last C output .npy")->check(path_check());
  forward->add_option("--out-n", fout.n, "last n output .npy")->check(path_check());
  forward->add_option("--out-m", fout.m, "last m output .npy")->check(path_check());
  ForwardStreaming fstream;
  forward
      ->add_option("--stream-tokens", fstream.tokens,
                   "stream the .npy inputs in slices of this many tokens (pread, reads overlapping compute), "
                   "writing h incrementally: memory stays flat whatever S; resumable with --resume")
      ->check(CLI::PositiveNumber);
  forward->add_flag("--resume", fstream.resume,
                    "continue a killed --stream-tokens run from its progress record (.<out>.progress) and partial "
                    "h (.<out>.partial): same options and inputs, h bit for bit that of an uninterrupted run");
  forward
      ->add_option("--memory-limit", fstream.memory_limit,
                   "bytes a forward may hold (default: this machine's memory): whole arrays above it are "
                   "refused (use --stream-tokens), and so is a --stream-tokens whose slices exceed it")
      ->check(CLI::PositiveNumber);

  InputFiles bin;
  BackwardFiles bfiles;
  auto* backward = app.add_subcommand("backward", "backward pass on .npy inputs");
  add_input_options(backward, bin, true);
  backward->add_option("--dh", bfiles.dh, "gradient of h .npy (B,NH,S,DHHV)")->required()->check(path_check());
  backward->add_option("--dc", bfiles.dc, "gradient of the last C .npy")->check(path_check());
  backward->add_option("--dn", bfiles.dn, "gradient of the last n .npy")->check(path_check());
  backward->add_option("--out-dq", bfiles.out_dq, "dq output .npy")->check(path_check());
  backward->add_option("--out-dk", bfiles.out_dk, "dk output .npy")->check(path_check());
  backward->add_option("--out-dv", bfiles.out_dv, "dv output .npy")->check(path_check());
  backward->add_option("--out-di", bfiles.out_di, "di output .npy")->check(path_check());
  backward->add_option("--out-df", bfiles.out_df, "df output .npy")->check(path_check());
  backward->add_option("--out-dc0", bfiles.out_dc0, "initial C gradient .npy")->check(path_check());
  backward->add_option("--out-dn0", bfiles.out_dn0, "initial n gradient .npy")->check(path_check());
  backward->add_option("--out-dm0", bfiles.out_dm0, "initial m gradient .npy")->check(path_check());

  InputFiles sin;
  StepFiles sfiles;
  auto* step = app.add_subcommand("step", "one recurrent step on .npy inputs");
  add_input_options(step, sin, false);
  step->add_option("--c", sfiles.c, "state C .npy (B,NH,DHQK,DHHV)")->check(path_check());
  step->add_option("--n", sfiles.n, "state n .npy (B,NH,DHQK)")->check(path_check());
  step->add_option("--m", sfiles.m, "state m .npy (B,NH)")->check(path_check());
  step->add_option("--out", sfiles.out_h, "h output .npy (B,NH,DHHV)")->required()->check(path_check());
  step->add_option("--out-c", sfiles.out_c, "new C .npy")->check(path_check());
  step->add_option("--out-n", sfiles.out_n, "new n .npy")->check(path_check());
  step->add_option("--out-m", sfiles.out_m, "new m .npy")->check(path_check());

  auto* kernels = app.add_subcommand("kernels", "list the kernel registry");
  auto* devices = app.add_subcommand("devices", "list OpenCL devices and NUMA nodes");

  BenchOptions bo;
  auto* bench = app.add_subcommand("bench", "constant-token sweep (TFLA paper style) to CSV and JSON");
  bench->add_option("--tokens", bo.tokens, "B*S, fixed across the sweep");
  bench->add_option("--heads", bo.heads, "NH");
  bench->add_option("--dqk", bo.dqk, "DHQK");
  bench->add_option("--dhv", bo.dhv, "DHHV");
  bench->add_option("--seq-lens", bo.seq_lens, "sequence lengths");
  bench->add_option("--chunk-sizes", bo.chunk_sizes, "chunk sizes");
  bench->add_option("--kernels", bo.kernels, "kernels");
  bench->add_option("--dtype", bo.dtype, "input dtype");
  bench->add_option("--repeats", bo.repeats, "timed repeats (median)");
  bench->add_flag("--backward", bo.backward, "also time forward+backward");
  bench->add_option("--head-dims", bo.head_dims, "also sweep DHQK = DHHV over these values");
  bench->add_option("--graph-devices", bo.graph_devices,
                    "also run the flow graph on each device spec (strong and weak scaling), e.g. workers 0 0,1");
  bench->add_option("--weak-seq-len", bo.weak_seq_len,
                    "tokens per device for the weak-scaling rows of --graph-devices (default: the largest --seq-lens)");
  bench->add_option("--csv", bo.csv, "CSV output path")->check(path_check());
  bench->add_option("--json-out", bo.json_out, "JSON output path")->check(path_check());

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "mlstm: error: %s (see --help)\n", one_line(e.what()).c_str());
    return 2;
  }
  spdlog::set_level(spdlog::level::from_str(log_level));
  try {
    if (*run) {
      try {
        return cmd_run(ro, as_json);
      } catch (const InvalidArgument& e) {
        rethrow_as_cli(e, {{"devices", "--devices"}, {"chunk_size", "--chunk-size"}, {"mode", "--mode"}});
      }
    }
    if (*forward) return cmd_forward(fin, fout, fstream, as_json);
    if (*backward) return cmd_backward(bin, bfiles, as_json);
    if (*step) return cmd_step(sin, sfiles, as_json);
    if (*kernels) return cmd_kernels(as_json);
    if (*devices) return cmd_devices(as_json);
    if (*bench) return cmd_bench(bo, as_json);
  } catch (const InvalidArgument& e) {
    std::fprintf(stderr, "mlstm: error: %s\n", one_line(e.what()).c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mlstm: failed: %s\n", one_line(e.what()).c_str());
    return 1;
  }
  return 0;
}
