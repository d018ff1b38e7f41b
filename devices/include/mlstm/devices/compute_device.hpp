// The devices module: the one interface every compute device implements (ComputeDevice), its two kinds (CPU
// workers: one TBB arena per NUMA node; OpenCL devices: tensor cores where possible, else the portable
// kernels), the device-spec grammar that names them, and the kernel registry (registry.hpp). The OpenCL layer
// underneath lives in opencl*.hpp. The flow-graph nodes (nodes/) run their work on ComputeDevices.
//
// A ComputeDevice does four things on a segment (a run of tokens for all rows):
//   forward()         h and the state leaving the segment, from the state entering it (c0/n0/m0 in args);
//   last_state()      only the state leaving the segment; from an EMPTY entering state (C = n = 0,
//                     m = -inf) this is the segment's local summary used by sequence parallelism;
//   backward()        the gradients of a run of rows over the whole sequence, or of one segment;
//   state_gradient()  only the gradient of the state entering the run.
// open_stream() streams one sequence through the device in pieces (SequenceStream), the state carried there.
// supports() says, before anything runs, whether a stage of a problem can run on the device, and why not.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "mlstm/core/problem.hpp"
#include "mlstm/devices/chunk_choice.hpp"
#include "mlstm/devices/opencl/device.hpp"

namespace mlstm {

enum class DeviceStage { forward, last_state, backward, state_gradient };
std::string_view stage_name(DeviceStage stage) noexcept;  // "forward", "last_state", ...

// The answer of ComputeDevice::supports(): yes, or no with the reason (for logs and errors) and the argument
// or option that decides it ("q", "chunk_size", ...; empty when it is the device itself).
struct DeviceSupport {
  std::string why_not;  // empty: supported
  std::string argument;
  explicit operator bool() const noexcept { return why_not.empty(); }
};

// One sequence streamed through a device in pieces (q, k, v, i, f of any length, in sequence order, without
// c0/n0/m0): the state (C, n, m) is carried from piece to piece where the device keeps it. submit() hands a
// piece in and returns its ticket (0, 1, 2, ...); the caller may reuse the piece's memory once it returns.
// take() gives a piece's h, waiting for it; tickets may be taken in any order, each once. A caller that
// keeps two or three pieces submitted ahead of the one it takes lets an overlapped stream move piece p+1 up
// the link while piece p computes and piece p-1's h comes back.
class SequenceStream {
 public:
  virtual ~SequenceStream() = default;
  virtual std::uint64_t submit(const ForwardArgs& piece) = 0;
  virtual Tensor take(std::uint64_t ticket) = 0;
  // take() into `out` (B,NH,len,DHHV) of the piece, any strides: no intermediate tensor where the stream can.
  virtual void take_into(std::uint64_t ticket, TensorView out);
  // The state after every submitted piece (waits for them), float32.
  virtual State state() = 0;
  // Packed sequences through one stream: the piece submitted next starts a new sequence from `initial` (float32, the
  // stream's state shapes; empty: the zero state) instead of the carried state. Pieces submitted before go on
  // computing and their h stay to be taken; tickets continue.
  virtual void start_sequence(State initial) = 0;
  // The state leaving the piece submitted next goes into C, n, m (contiguous float32 of the stream's state shapes;
  // InvalidArgument("state") otherwise): there once that piece's take() / take_into() has returned, without waiting
  // for the pieces submitted after it (a packed sequence's last state while the next sequences stream on).
  virtual void state_after_next_piece_into(TensorView C, TensorView n, TensorView m) = 0;
  // True when transfers and compute of consecutive pieces overlap (pinned staging on a GPU); false when each
  // piece is one synchronous forward() call.
  virtual bool overlapped() const noexcept { return false; }
  // Tokens per piece the stream moves at once; longer pieces are cut into pieces of this length.
  virtual std::int64_t max_piece() const noexcept = 0;
};

class ComputeDevice;

// The stream every device has: each piece is one forward call from the carried state, kept on the host
// (a device's forward(), or the flow graph's).
class ForwardCallStream final : public SequenceStream {
 public:
  using Forward = std::function<ForwardResult(const ForwardArgs&, const MlstmOptions&)>;
  // `initial`: the state entering the first piece (float32, shapes of the problem); empty = the zero state.
  ForwardCallStream(Forward forward, const ProblemShape& shape, const MlstmOptions& options, State initial);
  std::uint64_t submit(const ForwardArgs& piece) override;
  Tensor take(std::uint64_t ticket) override;
  State state() override { return state_; }
  void start_sequence(State initial) override { state_ = std::move(initial); }
  void state_after_next_piece_into(TensorView C, TensorView n, TensorView m) override;
  std::int64_t max_piece() const noexcept override { return shape_.S; }

 private:
  Forward forward_;
  ProblemShape shape_;
  MlstmOptions options_;
  State state_;
  std::map<std::uint64_t, Tensor> done_;
  std::uint64_t next_ = 0;
  std::array<TensorView, 3> state_out_;  // state_after_next_piece_into(); empty when none
};

// Where a forward keeps states for a later backward (ComputeDevice::forward_into).
struct KeepStates {
  StateCheckpoints* to = nullptr;
  std::int64_t from = 0;  // the token of to's sequence where the call's token 0 lies
  // Keeps the state leaving a call of S tokens when `r` has it (options.return_last_states) and keeping is on.
  void leaving(std::int64_t S, const ForwardResult& r) const;
};

class ComputeDevice {
 public:
  virtual ~ComputeDevice() = default;
  virtual std::string name() const = 0;
  virtual DeviceSupport supports(DeviceStage stage, const ProblemShape& shape, const MlstmOptions& options) const = 0;
  // The chunk size this device runs `shape` fastest at, from the table of the kernels that would run it
  // (chunk_choice.hpp; options' chunk_size is not read). The default: 64, rank 0.
  virtual ChunkChoice chunk_choice(const ProblemShape& shape, const MlstmOptions& options) const;
  // `options` with an automatic chunk size (kAutoChunk) replaced by chunk_choice(shape, options); any other chunk
  // size unchanged. Every method below resolves the options it is given so (a run over several devices resolves
  // them once, mlstm::with_chunk below, so that all its devices use one chunk size).
  MlstmOptions with_chunk(const MlstmOptions& options, const ProblemShape& shape) const;
  virtual ForwardResult forward(const ForwardArgs& segment, const MlstmOptions& options) = 0;
  // forward() with h written into `h`: (B,NH,S,DHHV) of q's dtype whose rows of S*DHHV elements are contiguous (a
  // slice of a longer h, say); the result's h is empty. The default copies forward()'s h there; an OpenCL device
  // streaming a long segment downloads each piece straight into `h` when it lies in its page-locked memory
  // (host_tensor()), else copies it there from its staging.
  //
  // `keep` (optional): states for a later backward go into keep.to (StateCheckpoints), at this call's tokens plus
  // keep.from. The default keeps the state leaving the segment when options.return_last_states computed it; an
  // OpenCL device streaming the segment keeps the state entering each of its pieces too.
  virtual ForwardResult forward_into(const ForwardArgs& segment, const MlstmOptions& options, TensorView h,
                                     KeepStates keep = {});
  virtual ForwardResult last_state(const ForwardArgs& segment, const MlstmOptions& options) = 0;
  virtual BackwardResult backward(const BackwardArgs& args, const MlstmOptions& options) = 0;
  // backward() with the token gradients written into `out` (check_gradient_views: InvalidArgument naming the view
  // otherwise); the result keeps dc0 / dn0 / dm0 only. The default copies backward()'s gradients there; an OpenCL
  // device streaming a long backward uploads inputs and dh that lie in its page-locked memory (host_tensor()) from
  // where they lie and downloads the gradients straight into views there, without a host copy. Given
  // args.checkpoints (a forward's kept states) that fall on its pieces, such a stream starts from them instead of
  // recomputing them; other devices do not need them.
  virtual BackwardResult backward_into(const BackwardArgs& args, const MlstmOptions& options, const GradientViews& out);
  // Given dh and the gradient of the state leaving the run (dc_last / dn_last): the gradient of the state
  // entering it (dc0, dn0, dm0; the zero state when args has no initial state), through the forward and the
  // reverse state-gradient recurrence, not the token gradients. Sequence-parallel backward: a segment's
  // local part.
  virtual BackwardResult state_gradient(const BackwardArgs& args, const MlstmOptions& options) = 0;
  // One recurrent step from a state (the step kernels, inference). The default runs forward() on a sequence of
  // that one token; a device with a step routine of its own overrides it.
  virtual StepResult step(const StepArgs& args, const MlstmOptions& options);
  // Input residency for one run: until the returned handle is destroyed, what the device uploads from the
  // memory of `inputs` (the run's input tensors) stays on it and is reused when a later call passes the same
  // view again (a segment's local-state pass, then its outputs or gradients), instead of a second transfer.
  // The inputs must not change while the handle lives. Devices that read host memory directly (CPU workers)
  // return nullptr.
  // A stream of one sequence of `shape` (B, NH, DHQK, DHHV, dtype; S = the piece length the caller means to
  // submit, a hint for staging sizes) from `initial` (empty: the zero state). The default is a
  // ForwardCallStream; an OpenCL device whose tensor-core kernels take the problem streams through pinned
  // staging with uploads, kernels and downloads of consecutive pieces overlapped (opencl::DeviceStream).
  virtual std::unique_ptr<SequenceStream> open_stream(const ProblemShape& shape, const MlstmOptions& options,
                                                      State initial = {});
  // Host memory this device transfers from and to fastest, or an empty tensor (the default) when any memory is as
  // good (CPU workers read it in place). An OpenCL device gives page-locked memory of its context
  // (opencl::Device::pinned_tensor): its streams upload inputs that lie there without a copy through their
  // staging. Thrown errors: DeviceError (out of page-locked memory), InvalidArgument("shape").
  virtual Tensor host_tensor(Shape shape, DType dtype) {
    (void)shape;
    (void)dtype;
    return {};
  }
  class InputResidency {
   public:
    virtual ~InputResidency() = default;
  };
  virtual std::unique_ptr<InputResidency> keep_inputs_resident(const std::vector<ConstTensorView>& inputs) {
    (void)inputs;
    return nullptr;
  }
};

// For devices without a pass of their own for the state gradient: it through a full `backward` (called with an
// initial state: the zero state when `args` has none, so that it returns dc0 / dn0 / dm0); the token gradients
// are dropped.
BackwardResult state_gradient_through_backward(const std::function<BackwardResult(const BackwardArgs&)>& backward,
                                               const BackwardArgs& args, const ProblemShape& shape);

// One CPU worker per NUMA node found (hwloc via tbbbind; one worker when the topology is not known). Each runs
// the tiled chunkwise kernels in its own TBB arena.
std::vector<std::shared_ptr<ComputeDevice>> cpu_workers();

// The algorithm a CPU device runs (kernels/cpu_kernels.hpp, kernels/reference.hpp). The registry's CPU kernels
// are CPU devices of each algorithm; the graph's workers run chunkwise_tiled.
enum class CpuAlgorithm {
  chunkwise_tiled,     // TFLA-tiled chunks, any chunk size
  chunkwise_whole,     // a whole chunk at once, chunk size <= 256
  parallel,            // the parallel form, tiled
  sequence,            // the recurrent form, step by step (forward only)
  reference_parallel,  // the float64 parallel form (results converted to the library's dtypes)
  reference_sequence,  // the float64 recurrence, the definition (likewise)
};
// A CPU device of `algorithm`, running in the caller's TBB arena.
std::shared_ptr<ComputeDevice> cpu_device(CpuAlgorithm algorithm);

// Which chunkwise kernels an OpenCL compute device runs.
enum class OpenCLKernels {
  automatic,     // the tensor cores where the device and the problem allow it and their programs build, else the
                 // portable kernels (the first build failure on a device is logged and sends it to them)
  tensor_cores,  // only the tensor cores: a device without them is refused when opened, a problem they
                 // cannot take by supports()
  portable,      // only the portable OpenCL C kernels
  emulated_tensor_cores,  // tests: the tensor-core kernels without PTX on any OpenCL device (PoCL), as
                          // tensor_cores otherwise; slow
};
// The OpenCL devices of an OpenCL device spec (opencl::select_devices), and one of them.
std::vector<std::shared_ptr<ComputeDevice>> opencl_devices(const std::string& spec,
                                                           OpenCLKernels kernels = OpenCLKernels::automatic);
std::shared_ptr<ComputeDevice> opencl_device(const opencl::DeviceInfo& info,
                                             OpenCLKernels kernels = OpenCLKernels::automatic);
// The device-spec grammar: "workers" (the CPU workers), an OpenCL spec ("gpu:all", "0,1", "cpu" = OpenCL CPU
// devices, ...; opencl.hpp), or several joined with '+' ("workers+gpu:all"). An empty part or a device named twice
// ("workers+workers", "all+0") is refused: InvalidArgument("devices").
std::vector<std::shared_ptr<ComputeDevice>> devices_from_spec(const std::string& spec);
// What a spec names, in its order, with the same grammar and refusals, opening nothing: the CPU workers (one entry
// for all of them) or one OpenCL device per entry. devices_from_spec opens these; callers that only check a spec or
// ask what kind of devices it names (a GPU among them?) read them.
struct NamedDevice {
  bool workers = false;              // the CPU workers
  opencl::DeviceInfo opencl_device;  // else this OpenCL device
};
std::vector<NamedDevice> named_devices(const std::string& spec);

// The automatic chunk size of a run over `devices`: `options` with kAutoChunk replaced by the chunk_choice of the
// device of the highest rank (the first of them); options unchanged when their chunk size is set or `devices` is
// empty (the devices then choose, each for itself).
MlstmOptions with_chunk(const MlstmOptions& options, const std::vector<std::shared_ptr<ComputeDevice>>& devices,
                        const ProblemShape& shape);

}  // namespace mlstm
