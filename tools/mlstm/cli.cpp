// The shared conventions of `mlstm` (cli.hpp): option and output checks, peak memory, the .npy input options
// of forward/backward/step and their loading, error renaming, kernel lookup and run options.
#include "cli.hpp"

#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <type_traits>

#include "mlstm/core/env.hpp"
#include "mlstm/core/npy.hpp"
#include "mlstm/devices/opencl/tc_routine.hpp"

namespace mlstm::cli {

namespace fs = std::filesystem;

// ---- checks of the user's options (exit code 2, one line naming the option) ------------------------------

void require_range(std::int64_t value, std::int64_t lo, std::int64_t hi, const std::string& option) {
  if (value < lo || value > hi) {
    throw InvalidArgument(
        option, "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + std::to_string(value));
  }
}

void refuse_repeats(const std::vector<std::string>& values, const std::string& option) {
  for (std::size_t j = 1; j < values.size(); ++j) {
    if (std::find(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(j), values[j]) !=
        values.begin() + static_cast<std::ptrdiff_t>(j)) {
      throw InvalidArgument(option, "'" + values[j] + "' is given twice");
    }
  }
}

void refuse_repeats(const std::vector<std::int64_t>& values, const std::string& option) {
  std::vector<std::string> text;
  for (const auto v : values) text.push_back(std::to_string(v));
  refuse_repeats(text, option);
}

CLI::Option* add_chunk_size_option(CLI::App* app, std::int64_t& chunk) {
  return app->add_option_function<std::string>(
      "--chunk-size",
      [&chunk](const std::string& text) {
        if (text == "auto") {
          chunk = kAutoChunk;
          return;
        }
        std::int64_t v = 0;
        const char* end = text.data() + text.size();
        const auto [at, ec] = std::from_chars(text.data(), end, v);
        if (ec != std::errc() || at != end || v < 1 || v > kMaxChunkSize)
          throw CLI::ValidationError("--chunk-size", "expected auto or a chunk size of 1 to " +
                                                         std::to_string(kMaxChunkSize) + " tokens, got '" + text + "'");
        chunk = v;
      },
      "tokens per chunk of the chunkwise kernels, or auto (the default): the fastest that the devices' tables of "
      "measured rows give for the problem");
}

namespace {

// How CLI11 converts the values of `option`: its type name is INT or UINT for integers (a list option's names its
// elements' type), followed by the descriptions of its checks (":N"). Flags take no value.
enum class IntegerType { none, int_, uint_ };
IntegerType integer_type(const CLI::Option& option) {
  if (option.get_expected_max() == 0) return IntegerType::none;
  const std::string type = option.get_type_name();
  const std::string base = type.substr(0, type.find(':'));
  return base == "INT" ? IntegerType::int_ : base == "UINT" ? IntegerType::uint_ : IntegerType::none;
}

// [+-]?[0-9]+ rewritten with no leading zeros ("010" -> "10", "-0" -> "0"), which strtoll's base 0 reads as decimal;
// a value past 64 bits is refused here (strtoll would saturate it quietly).
template <typename T>
std::string as_decimal(std::string& value) {
  const bool negative = !value.empty() && value.front() == '-';
  const std::size_t start = !value.empty() && (value.front() == '-' || value.front() == '+') ? 1 : 0;
  if (start == value.size() || value.find_first_not_of("0123456789", start) != std::string::npos)
    return "'" + value + "' is not a decimal integer";
  const std::size_t first = value.find_first_not_of('0', start);
  const std::string decimal = first == std::string::npos ? "0" : (negative ? "-" : "") + value.substr(first);
  if (std::is_unsigned_v<T> && decimal.front() == '-') return "'" + value + "' is not a decimal integer from 0";
  T n{};
  const auto [end, ec] = std::from_chars(decimal.data(), decimal.data() + decimal.size(), n);
  if (ec != std::errc() || end != decimal.data() + decimal.size()) return "'" + value + "' is out of range";
  value = decimal;
  return {};
}

}  // namespace

void decimal_integers_only(CLI::App* app) {
  for (CLI::Option* option : app->get_options()) {
    // A transform runs before the option's checks (positive_count_check sees "10" too) and its result is what
    // CLI11 converts; no description, so --help's INT stays as it was.
    const IntegerType type = integer_type(*option);
    if (type == IntegerType::int_) option->transform(CLI::Validator(as_decimal<std::int64_t>, "", "decimal"));
    if (type == IntegerType::uint_) option->transform(CLI::Validator(as_decimal<std::uint64_t>, "", "decimal"));
  }
  for (CLI::App* sub : app->get_subcommands([](CLI::App*) { return true; })) decimal_integers_only(sub);
}

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

namespace {

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

// The spellings of a path whose name a working-file pattern is matched against: as given, and the file it
// resolves to (a symbolic link's target: the file a stale-temporary cleanup would remove).
std::vector<fs::path> spellings_of(const std::string& path) {
  std::vector<fs::path> out{fs::path(path)};
  std::error_code ec;
  const fs::path resolved = fs::weakly_canonical(fs::absolute(path, ec), ec);
  if (!ec && !resolved.empty()) out.push_back(resolved);
  return out;
}

fs::path directory_of(const fs::path& p) { return p.parent_path().empty() ? fs::path(".") : p.parent_path(); }

// Whether `path` is (or is named like) one of `output`'s working files: "the partial file", "named like a temporary
// file", ...
std::optional<std::string> working_file_match(const std::string& path, const std::string& output) {
  const WorkingFiles w = working_files_of(output);
  const PathIdentity id = identity_of(path);
  for (const auto& [file, what] : w.exact) {
    if (identity_of(file) == id) return "the " + what;
  }
  for (const auto& [base, what] : w.temporaries_of) {
    const PathIdentity dir = identity_of(directory_of(fs::path(base)).string());
    for (const fs::path& p : spellings_of(path)) {
      if (is_atomic_temporary_of(base, p.filename().string()) && identity_of(directory_of(p).string()) == dir)
        return "named like a " + what;
    }
  }
  return std::nullopt;
}

}  // namespace

std::string progress_path_of(const std::string& out) {
  const fs::path p(out);
  // native() (the same text as string()): "." + a temporary string draws a false -Wrestrict from GCC 12 at -O3.
  return (p.parent_path() / ("." + p.filename().native() + ".progress")).string();
}

// One list for every output of every subcommand (whether this run streams or not): a name the run could use for
// its own files is never the user's.
WorkingFiles working_files_of(const std::string& output) {
  const std::string record = progress_path_of(output);
  return {{{partial_path_of(write_target(output)), "partial file"}, {record, "progress record"}},
          {{write_target(output), "temporary file"}, {record, "progress record's temporary file"}}};
}

void check_outputs(const std::vector<NamedPath>& inputs, const std::vector<NamedPath>& given_outputs) {
  std::vector<NamedPath> outputs = given_outputs;
  // The flow graph writes its DOT dump there (graph/runner.cpp): an output like the others, checked up front.
  if (const auto dot = env::get("MLSTM_GRAPH_DOT")) outputs.push_back({"MLSTM_GRAPH_DOT", *dot});
  std::vector<std::pair<NamedPath, PathIdentity>> seen;
  for (const auto& in : inputs) {
    if (in.path.empty()) continue;
    npy::require_regular_file(in.path, in.option);  // a FIFO read as a header and then again would block
    seen.push_back({in, identity_of(in.path)});
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
    // access() says yes to root everywhere (/sys, a read-only mount): a file made and removed there says for sure.
    {
      std::string probe = (dir / ".mlstm-write-probe.XXXXXX").string();
      const int fd = ::mkstemp(probe.data());
      if (fd < 0) {
        throw InvalidArgument(out.option, "cannot create a file in '" + dir.string() + "': " + std::strerror(errno));
      }
      ::close(fd);
      ::unlink(probe.c_str());
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
  // No input or output is a file the run makes or removes for an output: a stream's partial file or progress
  // record, a temporary file (or one named like it: the stale-temporary cleanup would remove it).
  for (const auto& entry : seen) {
    const NamedPath& user = entry.first;
    for (const auto& out : outputs) {
      if (out.path.empty()) continue;
      if (const auto what = working_file_match(user.path, out.path)) {
        throw InvalidArgument(user.option, "'" + user.path + "' is " + *what + " of " + out.option + " ('" + out.path +
                                               "'), which the run makes and removes; give another name");
      }
    }
  }
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown";
}

namespace {
const Clock::time_point started = Clock::now();  // static initialisation: before main
}  // namespace

Clock::time_point process_start() noexcept { return started; }

// VmHWM (/proc/self/status): the high-water mark of this process image's own memory. Not getrusage's
// ru_maxrss, which Linux carries across exec: a child started by a large parent (posix_spawn, fork + exec)
// reports at least the parent's size there. ru_maxrss only where /proc is not mounted.
double peak_rss_mib() {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("VmHWM:", 0) == 0) return std::strtod(line.c_str() + 6, nullptr) / 1024.0;  // in kB
  }
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) / 1024.0;  // ru_maxrss is in KiB on Linux
}

double median_seconds(std::int64_t repeats, const std::function<void()>& fn, bool warm_up, double budget_seconds,
                      std::int64_t* runs) {
  if (warm_up) fn();
  std::vector<double> times;
  double total = 0;
  for (std::int64_t rep = 0; rep < std::max<std::int64_t>(repeats, 1) && (rep == 0 || total < budget_seconds); ++rep) {
    const auto t0 = Clock::now();
    fn();
    times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    total += times.back();
  }
  if (runs) *runs = static_cast<std::int64_t>(times.size());
  return median_of(std::move(times));
}

double median_of(std::vector<double> times) {
  if (times.empty()) return 0;
  std::nth_element(times.begin(), times.begin() + static_cast<std::ptrdiff_t>(times.size() / 2), times.end());
  return times[times.size() / 2];
}

// A file option given an empty string is refused (it used to mean "not given": --out '' computed and wrote nothing).
const CLI::Validator& path_check() {
  static const CLI::Validator check(
      [](std::string& path) { return path.empty() ? std::string("empty path") : std::string(); }, "PATH");
  return check;
}

// A whole number from 1 (CLI::PositiveNumber's refusal printed its range up to 1.8e308 in 300 digits).
const CLI::Validator& positive_count_check() {
  static const CLI::Validator check(
      [](std::string& value) {
        const auto n = env::whole_number(value);
        return n && *n > 0 ? std::string() : "expected a whole number from 1, got '" + value + "'";
      },
      "N");
  return check;
}

// A value option given an empty string is refused (--devices '' ran the one-kernel path as if it were not given).
const CLI::Validator& nonempty_check() {
  static const CLI::Validator check(
      [](std::string& value) { return value.empty() ? std::string("empty value") : std::string(); }, "TEXT");
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
  if (sequence) {  // a step's state is --c, --n, --m (its own options)
    app->add_option("--c0", in.c0, "initial C .npy (B or N,NH,DHQK,DHHV)")->check(path_check());
    app->add_option("--n0", in.n0, "initial n .npy (B or N,NH,DHQK)")->check(path_check());
    app->add_option("--m0", in.m0, "initial m .npy (B or N,NH)")->check(path_check());
    app->add_option("--cu-seqlens", in.cu_seqlens,
                    "packed sequences: .npy of N+1 int64 offsets 0 < ... < S; the N sequences lie one after the "
                    "other in one row (B = 1), each starts from its own initial state (--c0 etc. are then "
                    "(N,...)) or the zero state, and the last states are (N,...)")
        ->check(path_check());
  }
  app->add_option("--dtype", in.dtype, "read uint16 arrays as this dtype (bfloat16)")
      ->check(CLI::IsMember({"bfloat16", "bf16"}));
  in.gate_option =
      app->add_option("--gate", in.gate, "input gate: exp or sig")->check(CLI::IsMember({"exp", "sig", "sigmoid"}));
  app->add_flag("--no-normalize", in.no_normalize, "sigmoid gate: skip the normaliser (refused with the exp gate)");
  app->add_option("--eps", in.eps, "normaliser epsilon (> 0)");
  app->add_flag("--check-finite", in.check_finite, "refuse inputs with NaN or Inf");
  if (sequence) {
    in.kernel_option = app->add_option("--kernel", in.kernel, "kernel name (see `mlstm kernels`)");
    add_chunk_size_option(app, in.chunk_size);
    app->add_option("--devices", in.devices,
                    "run the flow graph over these devices, sequence parallel: workers (CPU workers), all, gpu:all, "
                    "0,1, cpu, or several joined by + (workers+gpu:all); with --kernel, the one OpenCL device that "
                    "kernel runs on")
        ->check(nonempty_check());
    in.balancing_option =
        app->add_option("--balancing", in.balancing,
                        "with --devices (the flow graph): pull (free devices pull segments; the default), calibrated "
                        "(shares by measured speed, cached) or fastest (forward: each device alone and the graph "
                        "measured, the fastest runs; backward as pull)")
            ->check(CLI::IsMember({"pull", "calibrated", "fastest"}));
  } else {
    in.step = true;
    in.kernel = "cpu";
    in.kernel_option = app->add_option("--kernel", in.kernel, "step kernel name (see `mlstm kernels`)");
    app->add_option("--devices", in.devices, "the one OpenCL device of an OpenCL step kernel: 0, gpu:0, cpu, ...")
        ->check(nonempty_check());
  }
}

std::optional<DType> as_dtype(const InputFiles& in) {
  if (in.dtype.empty()) return std::nullopt;
  return parse_dtype(in.dtype, "--dtype");
}

Tensor read_optional(const std::string& path, const std::string& name, std::optional<DType> dt) {
  if (path.empty()) return Tensor();
  return npy::read_any(path, name, dt);
}

ForwardInputs load_inputs(const InputFiles& in) {
  const auto dt = as_dtype(in);
  ForwardInputs l;
  l.q = npy::read(in.q, "--q", dt);
  l.k = npy::read(in.k, "--k", dt);
  l.v = npy::read(in.v, "--v", dt);
  // Gates and states keep their own dtype; with --dtype bfloat16 a uint16 one is bfloat16 bits too.
  l.i = npy::read_any(in.i, "--i", dt);
  l.f = npy::read_any(in.f, "--f", dt);
  l.c0 = read_optional(in.c0, "--c0", dt);
  l.n0 = read_optional(in.n0, "--n0", dt);
  l.m0 = read_optional(in.m0, "--m0", dt);
  if (!in.cu_seqlens.empty()) l.cu_seqlens = npy::read_offsets(in.cu_seqlens, "--cu-seqlens");
  return l;
}

namespace {

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
                                                        {"gate", "--gate"},
                                                        {"cu_seqlens", "--cu-seqlens"}};
  return names;
}

}  // namespace

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

graph::Balancing balancing_of(const InputFiles& in) { return graph::parse_balancing(in.balancing, "--balancing"); }

// The options of a run, every combination checked (an option without effect is refused): --gate against a
// kernel that fixes the gate, --no-normalize (sigmoid gate only), --devices (OpenCL kernels only), --balancing
// (flow-graph runs only), --eps and --chunk-size in range (in float32, as the kernels use them).
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
  if (in.step && !in.devices.empty() && info.device_kind != "opencl") {
    // A step has no flow graph: --devices is the one device of an OpenCL step kernel.
    const bool named = in.kernel_option && in.kernel_option->count() > 0;
    throw InvalidArgument("--devices", "a step runs on one OpenCL device only with --kernel opencl (" +
                                           std::string(named ? "kernel '" : "the default kernel '") + info.name +
                                           "' runs on the CPU)");
  }
  if (!in.devices.empty() && runs_one_kernel(in) && info.device_kind != "opencl") {
    throw InvalidArgument("--devices", "kernel '" + info.name +
                                           "' runs on the CPU; leave --kernel out to run the flow graph over '" +
                                           in.devices + "'");
  }
  // A tensor-core kernel on a device without them was a DeviceError at run time (exit 1): the user's choice of
  // --kernel (and --devices) is what cannot run, so it is refused naming --kernel.
  if (runs_one_kernel(in) && info.name.find("opencl_tc_") != std::string::npos) {
    std::vector<opencl::DeviceInfo> devices;
    try {
      devices = opencl::select_devices(in.devices);
    } catch (const InvalidArgument& e) {
      rethrow_as_cli(e, {{"devices", "--devices"}});
    }
    if (!devices.empty()) {
      const auto support = opencl::tensor_core_support(devices.front());
      if (!support.available) {
        throw InvalidArgument("--kernel", "'" + info.name + "' runs on tensor cores, which " + devices.front().name +
                                              " has not (" + support.reason + "); name a chunkwise--opencl kernel");
      }
    }
  }
  if (in.balancing_option && in.balancing_option->count() > 0 && runs_one_kernel(in)) {
    throw InvalidArgument("--balancing", "shares a flow-graph run among its devices; " +
                                             std::string(in.devices.empty() ? "without --devices" : "with --kernel") +
                                             " this is one kernel call (give --devices without --kernel)");
  }
  if (in.chunk_size != kAutoChunk && runs_one_kernel(in) && info.form != KernelForm::chunkwise) {
    throw InvalidArgument("--chunk-size", "kernel '" + info.name + "' is a " + std::string(form_name(info.form)) +
                                              " kernel and has no chunks (a chunkwise kernel or --devices takes one)");
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
  return {{"--q", in.q},   {"--k", in.k},   {"--v", in.v},
          {"--i", in.i},   {"--f", in.f},   {"--c0", in.c0},
          {"--n0", in.n0}, {"--m0", in.m0}, {"--cu-seqlens", in.cu_seqlens}};
}

void OutputFiles::add(const std::string& option, const std::string& path, const Tensor& t) {
  if (path.empty()) return;
  // Refused up front when it could not be computed; an empty result here is a bug, never a skipped file.
  if (t.empty()) throw Error(option + ": the kernel returned no such output");
  npy::write_to(group_.add(path), t.view());
}

}  // namespace mlstm::cli
