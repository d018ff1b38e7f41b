// The subcommands of `mlstm`: their options (filled by main.cpp's CLI11 setup) and their entry points, which
// return the exit code; forward.cpp, forward_stream.cpp, listings.cpp, run.cpp, bench.cpp and bench_system.cpp define
// them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "cli.hpp"

namespace mlstm::cli {

// ---- forward, backward, step (forward.cpp; forward --stream-tokens in forward_stream.cpp) -------------------

struct ForwardOutputs {
  std::string h, c, n, m;
};
// --out, --out-c, --out-n, --out-m with their paths ("" where not given).
std::vector<NamedPath> output_paths(const ForwardOutputs& out);

// forward's streaming options (README "Streaming a file larger than memory").
struct ForwardStreaming {
  std::int64_t tokens = 0;        // --stream-tokens: tokens per slice; 0 = whole arrays in memory
  bool resume = false;            // --resume: continue a killed --stream-tokens run
  std::int64_t memory_limit = 0;  // --memory-limit: bytes; 0 = this machine's physical memory
};

// The header of every sequence input, read and checked against q before anything else is read: B, NH and S
// must agree across the files (a file whose S differs is refused naming its option).
struct InputHeaders {
  Shape q, k, v, i, f;
  DType dtype = DType::f32;
  std::int64_t B = 0, NH = 0, S = 0, DK = 0, DV = 0;
  std::uint64_t bytes = 0;  // data bytes of q, k, v, i, f together
};

struct BackwardFiles {
  std::string dh, dc, dn;
  std::string out_dq, out_dk, out_dv, out_di, out_df, out_dc0, out_dn0, out_dm0;
};
// backward's own inputs (--dh, --dc, --dn) and its outputs (--out-dq ... --out-dm0) with their paths.
std::vector<NamedPath> gradient_input_paths(const BackwardFiles& bf);
std::vector<NamedPath> gradient_output_paths(const BackwardFiles& bf);

struct StepFiles {
  std::string c, n, m, out_h, out_c, out_n, out_m;
};

// The headers of --q, --k, --v, --i, --f, checked against each other (nothing else is read).
InputHeaders read_input_headers(const InputFiles& in);
// Bytes one token of every row takes in memory: its q, k, v, i, f and its h.
std::uint64_t input_and_h_bytes_per_token(const InputHeaders& hdr);
// --memory-limit, or this machine's physical memory.
std::uint64_t memory_limit_of(const ForwardStreaming& st);
std::string mib_text(std::uint64_t bytes);  // "12.5 MiB"

// The longest row a call on these inputs runs: S, or with --cu-seqlens the longest packed sequence.
std::int64_t longest_sequence(std::int64_t S, const std::vector<std::int64_t>& cu_seqlens);
// The device of one registry kernel's calls (--kernel), named as forward's --json lists it with and without
// --stream-tokens: "opencl:<index> <name>" for --devices, else "opencl (default device)" or "cpu".
std::vector<std::string> kernel_devices(const InputFiles& in);

int cmd_forward(const InputFiles& in, const ForwardOutputs& out, const ForwardStreaming& st, bool as_json);
int cmd_forward_streamed(const InputFiles& in, const ForwardOutputs& out, const ForwardStreaming& st,
                         const MlstmOptions& o, const InputHeaders& hdr, bool as_json);
// backward's file options, checked before anything is read: --out-dc0/dn0/dm0 need --c0, outputs apart from inputs
// and from each other.
void check_backward_files(const InputFiles& in, const BackwardFiles& bf);
int cmd_backward(const InputFiles& in, const BackwardFiles& bf, bool as_json);
int cmd_step(const InputFiles& in, const StepFiles& sf, bool as_json);

// ---- forward, backward under mpirun (distributed.cpp; built with MPI) ------------------------------------

// Whether this process was started by an MPI launcher (mpirun / mpiexec / srun with PMI): its environment says so.
bool launched_by_mpi();
// The rank and size the launcher's environment gives (0 and 1 when none), readable before MPI is initialised.
int launcher_rank();
int launcher_size();
#ifdef MLSTM_HAVE_MPI
// MPI for this process's lifetime: MPI_Init_thread (MPI_THREAD_SERIALIZED) on construction, MPI_Finalize on
// destruction.
class MpiSession {
 public:
  MpiSession(int& argc, char**& argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }

 private:
  int rank_ = 0, size_ = 1;
};
// forward / backward with every rank of MPI_COMM_WORLD owning a shard of the sequence (README "Across machines").
int cmd_forward_mpi(const InputFiles& in, const ForwardOutputs& out, const ForwardStreaming& st, bool as_json);
int cmd_backward_mpi(const InputFiles& in, const BackwardFiles& bf, bool as_json);
#endif

// ---- kernels, devices (listings.cpp) ---------------------------------------------------------------------

int cmd_kernels(bool as_json);
// `open_spec` non-empty: opens those devices instead of listing (devices --open).
int cmd_devices(bool as_json, const std::string& open_spec);

// ---- run (run.cpp) ---------------------------------------------------------------------------------------

struct RunOptions {
  std::int64_t batch = 1, heads = 4, seq_len = 1 << 20, dqk = 128, dhv = 128, chunk_size = kAutoChunk, piece = 16384;
  std::string dtype = "bfloat16", devices = "auto", mode = "auto";
  std::string balancing = "calibrated";  // --balancing: the graph's shares when the stream runs it (graph::Balancing)
  bool backward = false, progress = false;
  std::int64_t check_tokens = 2048;
  CLI::Option* piece_option = nullptr;         // to tell an explicit --piece from the default
  CLI::Option* check_tokens_option = nullptr;  // and --check-tokens (its default 2048 may exceed --seq-len)
};

int cmd_run(const RunOptions& ro, bool as_json);
ForwardInputs synthetic_piece(std::int64_t B, std::int64_t NH, std::int64_t len, std::int64_t DK, std::int64_t DV,
                              DType dtype, std::uint64_t seed);
// q, k, v, i, f of `seq_len` tokens made of `pieces` (one length P, one B, NH and head dims) in turn along S:
// tokens [t, t+P) are pieces[(t / P) % pieces.size()], the last tile cut short. Copied in parallel, into tensors
// from `alloc` when given (FlowGraphRunner::host_tensor: page-locked memory).
ForwardInputs tile_pieces(const std::vector<ForwardInputs>& pieces, std::int64_t seq_len,
                          const std::function<Tensor(Shape, DType)>& alloc = {});

// ---- bench (bench.cpp), bench --system (bench_system.cpp) ------------------------------------------------

// bench --system: in one run, what a call through the system achieves against bounds measured in the same run
// (README "Performance"). Defaults: issue 14's problems and sizes.
struct BenchSystemOptions {
  bool enabled = false;                                          // --system
  std::vector<std::string> problems{"4x128x128", "16x128x256"};  // --system-problems: NHxDHQKxDHHV
  std::vector<std::int64_t> tokens{1048576, 8388608};            // --system-tokens: sequence lengths (B = 1)
  std::int64_t stream_tokens = 65536;  // --system-stream-tokens: slices of the CLI run, pieces of streamed runs
  std::string devices = "gpu:all";     // --devices: the OpenCL devices of the GPU side
  std::string workdir;                 // --workdir: where the .npy files go ("" = $TMPDIR, else /tmp)
  std::int64_t memory_limit = 0;       // --memory-limit: bytes the runs may hold (0 = what the machine has free)
};

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
  BenchSystemOptions system;
  std::map<std::string, CLI::Option*> options;  // every option of bench by name: given or left at its default
};

int cmd_bench(const BenchOptions& bo, bool as_json);
int cmd_bench_system(const BenchOptions& bo, bool as_json);
// bench without --system: refuses the options that only --system reads (InvalidArgument naming one).
void refuse_system_options(const BenchOptions& bo);

}  // namespace mlstm::cli
