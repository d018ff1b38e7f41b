// Shared by the files of `mlstm`: the checks of the user's options (exit code 2, one line naming the option),
// the .npy inputs of forward/backward/step (InputFiles, loading, error renaming) and the Engine that runs them.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "mlstm/core/atomic_file.hpp"
#include "mlstm/devices/opencl/device.hpp"
#include "mlstm/mlstm.hpp"

namespace CLI {
class App;
class Option;
class Validator;
}  // namespace CLI

namespace mlstm::cli {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

// ---- checks of the user's options and outputs (cli.cpp) ---------------------------------------------------

void require_range(std::int64_t value, std::int64_t lo, std::int64_t hi, const std::string& option);
// A list option that names one value twice (`--kernels a a`, `--seq-lens 512 512`) would measure it twice, or drop
// the repeat unseen: refused naming the option and the value.
void refuse_repeats(const std::vector<std::string>& values, const std::string& option);
void refuse_repeats(const std::vector<std::int64_t>& values, const std::string& option);
// --chunk-size auto|N into `chunk` (kAutoChunk for auto, the default): anything but auto or 1..kMaxChunkSize is a
// parse error naming the option (exit 2).
CLI::Option* add_chunk_size_option(CLI::App* app, std::int64_t& chunk);
// Every integer option (CLI11's type INT or UINT, list options included) of `app` and of its subcommands, all the
// way down, reads its values as decimal: CLI11 converts with strtoll's base 0, so "010" was octal 8, "0x10" 16 and
// "09" no number. Now "010" is 10, and anything but [+-]?[0-9]+ ("0x10", "0b1", "1e3") is a parse error naming the
// option (exit 2). Call once, after every option is defined.
void decimal_integers_only(CLI::App* app);

// The largest dimension of a synthetic problem (sums like 2 * dqk + dhv stay far from overflow).
constexpr std::int64_t kMaxDim = std::int64_t{1} << 40;
constexpr std::int64_t kMaxTokens = std::int64_t{1} << 50;  // tokens of a run: counted exactly in a double

void require_fits_memory(std::initializer_list<std::int64_t> factors, const std::string& option);
std::int64_t token_bytes(std::int64_t dqk, std::int64_t dhv, DType dtype);

struct NamedPath {
  std::string option, path;
};

// Every file a command reads or writes, checked before anything is read or computed (one line naming the user's
// option, exit code 2): each input, where it exists, is a regular file (not a directory, FIFO, device or socket);
// each output can be produced (a file name in an existing, writable directory); no output is the same file as
// another output or an input; and no input or output is one of the working files the run makes or removes next
// to an output (working_files_of). MLSTM_GRAPH_DOT, where set, is one more output (the flow graph writes it).
void check_outputs(const std::vector<NamedPath>& inputs, const std::vector<NamedPath>& outputs);
// The progress record of a streamed output (forward --stream-tokens): ".<name>.progress" next to it.
std::string progress_path_of(const std::string& out);
// The files a run makes, replaces or removes next to `output` besides `output` itself: its partial file
// (resumable writes), its progress record, and the temporary files (".<name>.tmp.<pid>.XXXXXX", where a stale
// one is removed) of the output and of the record. `exact`: paths; `temporaries_of`: paths whose temporary
// files' names (is_atomic_temporary_of) are working files too. Each with what it is, for messages.
struct WorkingFiles {
  std::vector<std::pair<std::string, std::string>> exact, temporaries_of;
};
WorkingFiles working_files_of(const std::string& output);
double peak_rss_mib();  // this process image's peak resident memory (VmHWM), MiB
// The median wall time of up to `repeats` calls of fn (at least one), after one untimed call when `warm_up`; no
// further call once the timed ones have taken `budget_seconds` together (a long run is its own average). `runs`,
// when given, is set to the number of timed calls.
// The middle element of `times` (the upper one of an even count, as median_seconds reports); 0 when empty.
double median_of(std::vector<double> times);
double median_seconds(std::int64_t repeats, const std::function<void()>& fn, bool warm_up = true,
                      double budget_seconds = std::numeric_limits<double>::infinity(), std::int64_t* runs = nullptr);
std::string cpu_model();  // /proc/cpuinfo's "model name", or "unknown"
// The git revision this binary was built from ("abc1234", "-dirty" appended when tracked files differed; "unknown"
// outside a git checkout), read at build time (tools/revision.cmake).
const char* git_revision() noexcept;
// When this process started (static initialisation, before main): the origin of first_token_seconds.
Clock::time_point process_start() noexcept;

// ---- options shared by forward / backward ----------------------------------------------------------

struct InputFiles {
  std::string q, k, v, i, f, c0, n0, m0;
  std::string cu_seqlens;  // --cu-seqlens: offsets of packed sequences (.npy int64)
  std::string dtype;       // "" or bfloat16 (uint16 arrays read as bfloat16)
  std::string kernel = "chunkwise--cpu_xl_chunk";
  std::int64_t chunk_size = kAutoChunk;
  std::string devices;
  std::string balancing = "pull";  // --balancing: of a flow-graph run (graph::Balancing; Python's default)
  std::string gate = "exp";
  bool no_normalize = false;
  double eps = 1e-6;
  bool check_finite = false;
  CLI::Option* gate_option = nullptr;       // to tell an explicit --gate from the default
  CLI::Option* kernel_option = nullptr;     // and an explicit --kernel
  CLI::Option* balancing_option = nullptr;  // and an explicit --balancing (refused where nothing is balanced)
  bool step = false;                        // the step subcommand's inputs
};

const CLI::Validator& path_check();
const CLI::Validator& nonempty_check();
const CLI::Validator& positive_count_check();
void add_input_options(CLI::App* app, InputFiles& in, bool sequence);
std::optional<DType> as_dtype(const InputFiles& in);
Tensor read_optional(const std::string& path, const std::string& name, std::optional<DType> dt);
ForwardInputs load_inputs(const InputFiles& in);

[[noreturn]] void rethrow_as_cli(const InvalidArgument& e, const std::map<std::string, std::string>& names);
[[noreturn]] void rethrow_as_cli(const InvalidArgument& e);

KernelInfo kernel_info(const std::string& name, bool step);
bool runs_one_kernel(const InputFiles& in);
graph::Balancing balancing_of(const InputFiles& in);  // --balancing (checked by the parser)
MlstmOptions options_of(const InputFiles& in, const KernelInfo& info);
std::vector<NamedPath> input_paths(const InputFiles& in);
// The .npy outputs of one command, all or none (AtomicFileGroup): add() writes each to its temporary file now (an
// empty path: not asked for), commit() renames them once every one is complete, so a failed write leaves every
// output file as it was. A requested output the run did not produce is an Error (refused up front, never skipped).
class OutputFiles {
 public:
  void add(const std::string& option, const std::string& path, const Tensor& t);
  void commit() { group_.commit(); }

 private:
  AtomicFileGroup group_;
};

// Where a forward or backward runs: one registry kernel (on one device), or the flow graph over --devices. A
// spec that names several devices is never cut to one: with --kernel it is refused.
class Engine {
 public:
  explicit Engine(const InputFiles& in) {
    if (!runs_one_kernel(in)) {
      graph_ = std::make_unique<graph::FlowGraphRunner>(in.devices);
      graph_->set_balancing(balancing_of(in));
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
  // The chunk size a call with these arguments runs at (an automatic one resolved).
  std::int64_t chunk_for(const ForwardArgs& a, const MlstmOptions& o) const {
    return graph_ ? graph_->with_chunk(o, shape_hint(a)).chunk_size : kernel_->chunk_for(shape_hint(a), o);
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
  // --json's "balancing": the flow graph's ("pull", ...), null for one kernel call (nothing to balance).
  json balancing() const { return graph_ ? json(graph::balancing_name(graph_->balancing())) : json(nullptr); }
  // "chunkwise--cpu_xl_chunk", or "flow graph over workers+all" (for messages).
  std::string what(const InputFiles& in) const { return graph_ ? "flow graph over " + in.devices : in.kernel; }

 private:
  std::unique_ptr<SequenceKernel> kernel_;
  std::unique_ptr<graph::FlowGraphRunner> graph_;
  std::vector<std::string> devices_;
};

}  // namespace mlstm::cli
