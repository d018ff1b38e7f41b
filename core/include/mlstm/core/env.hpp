// Environment knobs: the one place the library reads the environment. Every knob is listed here with the
// module that uses it; code asks `env::get` instead of calling getenv itself, and a knob with a set of values reads
// through `positive_count`, `one_of` or `flag`, which refuse (InvalidArgument naming it) what is not one of them.
//
//   MLSTM_TRACE=1                      core: time every device call, transfer, program lookup and node body
//   MLSTM_NUMA=off                     devices (CPU workers): one worker, no NUMA query (sanitizer runs)
//   MLSTM_CPU_GEMM=openblas|onednn     kernels: the CPU GEMM library (default: oneDNN where built in; gemm.hpp)
//   MLSTM_CPU_WINDOW_CHUNKS=<n>        kernels: chunks of a row a CPU forward or backward holds boundary states
//                                      (and their gradients) for at once (default: 32 MiB of states, at least 8
//                                      chunks a part; tests, tuning)
//   MLSTM_CPU_POISON=1                 kernels: fill every uninitialised or pooled CPU stage buffer with NaN
//   MLSTM_OPENCL_POISON=1              devices (OpenCL): fill every handed-out buffer with NaN bytes
//   MLSTM_OPENCL_STAGING=off|<bytes>   devices (OpenCL): pinned staging slot size (default 32 MiB)
//   MLSTM_OPENCL_UNTILED=1             devices (OpenCL): per-token output and backward kernels
//   MLSTM_OPENCL_OUTPUT_COL_BLOCKS, MLSTM_OPENCL_STATE_COL_BLOCKS, MLSTM_OPENCL_STATE_GRAD_COL_BLOCKS=1..4
//                                      devices (OpenCL): column blocks of the register-tiled kernels (tuning)
//   MLSTM_OPENCL_STATE_SUBTILE=16|32   devices (OpenCL): tokens per staged sub-tile of the portable state kernels
//   MLSTM_OPENCL_STATE_GRAD_SUBTILE=16|32
//                                      devices (OpenCL): the same for the state-gradient kernel (default: as above)
//   MLSTM_TENSOR_CORES=off             devices (OpenCL): never use the tensor-core kernels
//   MLSTM_TC_STATE_TILE=KTxVT          devices (OpenCL): tensor-core state tile (tuning)
//   MLSTM_TC_OUT_TILES=1|2|4|8         devices (OpenCL): output tiles per work-group of the tensor-core chunk kernels
//   MLSTM_TC_OUT_TILE=16|32|64|128     devices (OpenCL): and their columns (tuning)
//   MLSTM_TC_FUSED_TILE=0|16|32|64|128 devices (OpenCL): the tensor cores' fused forward on (its tile) or off (0)
//                                      wherever it fits (default: the launch row's rule)
//   MLSTM_TC_MSPLIT=1                  devices (OpenCL): tensor-core chunk kernels with M split hi + lo (tuning)
//   MLSTM_TC_POISON=1                  devices (OpenCL): tensor-core intermediates start as NaN
//   MLSTM_OPENCL_SHARDS=<n>            devices (OpenCL): shards per row of the sequence split inside one device
//                                      (tensor-core and portable routines; default: chosen by compute units)
//   MLSTM_OPENCL_SHARD_FIXUP=0         devices (OpenCL): the portable split runs its states pass twice instead
//                                      of fixing up the summary pass's states (comparisons)
//   MLSTM_PROGRAM_CACHE=<dir>|off      devices (OpenCL): where compiled programs are cached on disk, or no disk
//                                      cache (default $XDG_CACHE_HOME/mlstm-flow/programs, ~/.cache/...)
//   MLSTM_RESIDENT_INPUTS=off          devices: upload inputs on every call (to measure residency)
//   MLSTM_STREAM_PIECE=<tokens>        devices (OpenCL): tokens per piece of a pinned stream (default: about
//                                      64 MiB of inputs per piece); a forward of 2+ pieces from host memory streams
//   MLSTM_STREAM_STAGING=automatic|page_locked|pageable
//                                      devices (OpenCL): how a pinned stream's first pieces travel while its
//                                      page-locked staging is set up (DeviceStream::Config::staging; default
//                                      page_locked)
//   MLSTM_BACKWARD_KEEP=off            devices (OpenCL): a streamed backward uploads k, v, i, f in both of its
//                                      passes instead of keeping them on the device between them (to measure it)
//   MLSTM_BACKWARD_RUN_PIECES=<n>      devices (OpenCL): at most n pieces of packed sequences per backward stream
//                                      run (default: their entering states within an eighth of device memory)
//   MLSTM_FAULT_INJECT, MLSTM_FAULT_INJECT_ORDER   nodes / graph: fault-injection test hooks
//   MLSTM_SPLIT_FAULT=<device index>   devices (OpenCL): test hook, that device of a ResidentSplit fails when used
//   MLSTM_MPI_FAIL_RANK=<rank>         dist (MPI): test hook, that rank's runs fail as a lost device would
//   MLSTM_TEST_KILL_AFTER_SLICES=<k>  tools (mlstm forward --stream-tokens): test hook, SIGKILL to itself once k
//                                      slices are written and recorded (the --resume test: a kill at a known point)
//   MLSTM_PLAN_DEBUG=1                 graph: log every plan
//   MLSTM_GRAPH_DOT=<path>             graph: write every run's flow graph as Graphviz DOT (named nodes)
//   XDG_CACHE_HOME, HOME               graph, devices (OpenCL): where the calibration and program caches live
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>

namespace mlstm::env {

// The variable's value; nullopt when it is unset or empty.
std::optional<std::string> get(const char* name);

// `text` as a whole number (decimal digits only, nothing before or after them, at most 2^63 - 1); nullopt for
// anything else. The knobs below and the test hooks that take a number inside a longer value (MLSTM_FAULT_INJECT)
// parse with it.
std::optional<std::int64_t> whole_number(std::string_view text);

// A switch: false when unset or "0", true when "1"; anything else throws InvalidArgument naming the variable.
bool flag(const char* name);

// A knob that takes a count: nullopt when unset, else its value in [1, max]. Anything else ("0", "-3", "x", "7x",
// beyond max) throws InvalidArgument naming the variable and `what` is counted ("chunks", "tokens", ...): a knob the
// user set is never ignored.
std::optional<std::int64_t> positive_count(const char* name, const char* what,
                                           std::int64_t max = std::int64_t{1} << 40);

// A knob that takes an index (a rank, a device): nullopt when unset, else its value in [0, max]; anything else
// throws as positive_count does.
std::optional<std::int64_t> index(const char* name, const char* what, std::int64_t max = std::int64_t{1} << 40);

// A knob that takes one of `values`: nullopt when unset, else the value; anything else throws InvalidArgument
// naming the variable and listing the values (followed by `what` they are, when given: "tokens", ...).
std::optional<std::string> one_of(const char* name, std::initializer_list<const char*> values,
                                  const char* what = nullptr);

}  // namespace mlstm::env
