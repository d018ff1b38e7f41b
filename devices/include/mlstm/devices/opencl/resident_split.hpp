// A chunkwise problem resident on several OpenCL devices (issue 15): every device holds one part of it, uploaded
// once; the forward and the backward run as often as wanted with only state summaries crossing between devices, and
// results stay on the devices until read.
//
// Split::sequence: part d holds tokens [first, first + count) of every row, whole chunks (the last part takes the
// rest). Forward: every part enqueues its summary pass (the state leaving it run from the EMPTY state, and its log
// decay G) and a read of that result, rows x (DHQK x DHHV + DHQK + 2) floats whatever the sequence length; part 0
// starts its forward at once (it enters with the initial state). The host chains the summaries in part order into
// every part's entering state (stages.hpp "Combine") and writes it to that part's device, which then runs its
// forward. The backward mirrors it: every part's gradient summary (the gradient of the state entering it with a zero
// gradient leaving it), the chain in reverse (the gradient leaving part d is the one entering part d + 1), the last
// part at once. A part split into shards inside its device (shards.hpp) reuses its summary pass in its own forward, so
// the exchange costs a combine and two small transfers per device; segments split so by default.
// Split::heads: part d holds rows [first, first + count) of the B*NH rows; nothing is exchanged.
//
// Each device runs the tensor-core kernels where tensor_core_support() and tensor_core_fit() accept the problem, else
// the portable ones (Options::kernels forces either). The result equals one device's in exact arithmetic; rounding
// differs in the last bits (as the split inside one device does).
//
//   std::vector<std::shared_ptr<opencl::Device>> gpus;
//   for (const auto& info : opencl::select_devices("gpu:all")) gpus.push_back(opencl::open_device(info));
//   opencl::ResidentSplit split(gpus, args, options, &grads);
//   split.forward();  split.backward();          // wall-clock timed by the caller; repeatable
//   ForwardResult out = split.read_forward();     // h gathered from the parts
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "mlstm/core/problem.hpp"
#include "mlstm/devices/opencl/device.hpp"
#include "mlstm/devices/opencl/resident.hpp"

namespace mlstm::opencl {

enum class SplitBy { sequence, heads };
enum class SplitKernels { automatic, portable, emulated_tensor_cores };  // emulated: TensorCoreRunner::Config::emulate
struct SplitOptions {
  SplitBy split = SplitBy::sequence;
  // A part's share of the chunks (sequence) or rows (heads) per device, in the devices' order; empty: equal. A
  // device whose share rounds to nothing gets no part.
  std::vector<double> weights;
  int shards = 0;  // the runners' Config::shards (0: automatic; segments split in two or more where they can)
  SplitKernels kernels = SplitKernels::automatic;
};

class ResidentSplit {
 public:
  using Split = SplitBy;
  using Kernels = SplitKernels;
  using Options = SplitOptions;
  struct Part {
    std::size_t device = 0;             // index into the devices given
    std::int64_t first = 0, count = 0;  // tokens (sequence) or rows (heads)
    std::string kernels;                // "tensor cores, 2 shards", "portable", ...
  };

  // Uploads every part (the devices in parallel). Throws InvalidArgument for a bad problem (as a one-device run
  // would), for packed sequences, for no devices or for weights that do not match them. The inputs (and gradients)
  // are the caller's memory and must stay valid and unchanged while the split lives: when a device fails during a
  // run or a read, its part (and, in the sequence split, the others) is rebuilt from them on the remaining devices,
  // the passes run again there and the results are those of the whole problem (logged; lost() names the device).
  // DeviceError when no device is left.
  ResidentSplit(std::vector<std::shared_ptr<Device>> devices, const ForwardArgs& args, const MlstmOptions& options,
                const BackwardArgs* grads = nullptr, Options split_options = {});
  ~ResidentSplit();
  ResidentSplit(const ResidentSplit&) = delete;
  ResidentSplit& operator=(const ResidentSplit&) = delete;

  const std::vector<Part>& parts() const noexcept { return parts_; }
  std::string describe() const;  // one line per part

  // Every part's forward; returns when all have finished.
  void forward();
  // Every part's backward (after forward(); needs the gradients given at construction); returns when all finished.
  void backward();
  // h (and the last state when options.return_last_states) gathered from the parts.
  ForwardResult read_forward();
  BackwardResult read_backward();

  // The devices taken out after a failure (indices into the devices given), in no particular order.
  std::vector<std::size_t> lost() const;

 private:
  void build();  // the parts over the devices still in, uploaded
  void run_forward();
  void run_backward();
  // `pass` on every part at once, nothing exchanged (the head split, or one part); returns when all finished.
  void run_apart(void (ResidentChunkwise::*pass)(std::vector<KernelEvent>*));
  // Runs `fn` for part j; a DeviceError it throws is marked as that part's device's (MLSTM_SPLIT_FAULT=<device
  // index> injects one there, a test hook).
  void on_part(std::size_t j, const std::function<void()>& fn);
  // Runs `attempt`; when a part's device fails, takes the device out, rebuilds the parts on the others, runs `replay`
  // (what `attempt` needs done first) and tries again; throws when no device is left.
  void recovering(const std::function<void()>& replay, const std::function<void()>& attempt);
  void flush(std::size_t part);
  void wait_all();
  std::string lost_text() const;
  std::vector<std::shared_ptr<Device>> devices_;
  std::vector<double> weights_;
  std::vector<bool> alive_;
  MlstmOptions options_;
  ProblemShape shape_;
  Options split_options_;
  // The caller's inputs (views; the head split's with rows merged, `keep_` holding copies where needed).
  ForwardArgs args_;
  BackwardArgs grads_;
  std::vector<Tensor> keep_;
  bool has_init_ = false, has_grads_ = false, forward_done_ = false, backward_done_ = false;
  int failed_part_ = -1;
  std::vector<Part> parts_;
  std::vector<std::unique_ptr<ResidentChunkwise>> resident_;
  // The ends of the chains (sequence split, float32): the initial state, the last-state gradients (or zeros).
  std::vector<float> initial_c_, initial_n_, initial_m_, final_dc_, final_dn_;
  // Per part (sequence split): the state entering it and the gradient leaving it, as last written to its device
  // (kept alive for the non-blocking writes).
  std::vector<std::vector<float>> enter_c_, enter_n_, enter_m_, leave_dc_, leave_dn_;
};

}  // namespace mlstm::opencl
