// The planner and runner of the flow graph: a problem is cut into segments of the sequence (sequence
// parallelism); every device computes segments' local states from the EMPTY state in parallel; a serial,
// in-order combine gives every segment its true entering state; then the devices compute the segments'
// outputs in parallel. Devices pull segments from shared queues, so faster devices take more of them.
//
//   mlstm::graph::FlowGraphRunner runner("workers+gpu:all");
//   auto plan = runner.plan(shape, options);       // printable, testable without running
//   mlstm::ForwardResult out = runner.forward(args, options);
//   runner.last_plan().describe();                 // the same plan: both come from one function
//   runner.dot();                                  // the graph that ran, as Graphviz DOT (named nodes)
//
// The plan is the truth about a run: it is computed by the function the run uses, over the devices whose
// supports() accepts the problem (the others are in Plan::left_out, never in describe() nor given work).
// MLSTM_GRAPH_DOT=<path> writes every run's graph there as DOT once it is built (graph_description.hpp).
//
// Test hooks (environment): MLSTM_FAULT_INJECT (nodes.hpp: device failures, out of memory) and
// MLSTM_FAULT_INJECT_ORDER=entries (the state recurrence's entries handed on in swapped pairs, as oneTBB may
// deliver them; the runner puts them back in segment order).
#pragma once

#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "mlstm/devices/compute_device.hpp"
#include "mlstm/graph/exchange.hpp"
#include "mlstm/graph/graph_description.hpp"
#include "mlstm/nodes/nodes.hpp"

namespace mlstm::graph {

// pull: every free device pulls the next segment from a shared queue.
// calibrated: each device gets a share of the sequence proportional to its measured speed (a short
// calibration run, cached in $XDG_CACHE_HOME/mlstm-flow/calibration.json or ~/.cache/...); a device whose
// share would be under one chunk gets none, so a slow device never holds back a fast one.
// fastest: each capable device alone and the graph over all of them (pull) are measured once on this problem
// (the stream measurement of open_stream, cached with the calibration); a device alone runs the whole problem
// (one segment) when it measured faster, else the graph pulls as `pull`. So CPU workers added to a GPU take a
// share only when that measured faster, and plan().measured says what was measured.
enum class Balancing { pull, calibrated, fastest };
std::string_view balancing_name(Balancing balancing) noexcept;  // "pull", "calibrated", "fastest"
// The Balancing of a name balancing_name() gives; InvalidArgument(argument) for any other text.
Balancing parse_balancing(std::string_view name, const std::string& argument);

// Which run a plan is for: the sequence-parallel forward and backward, or the head splits.
// stream: a sequence in pieces (open_stream).
enum class Pass { forward, backward, forward_head_split, backward_head_split, stream };
std::string_view pass_name(Pass pass) noexcept;  // "forward", "backward", "forward head split", ...

struct Plan {
  Pass pass = Pass::forward;
  std::vector<std::string> devices;   // the devices that get work, in the graph's order
  std::vector<std::string> left_out;  // "name (stage: why not)": refused by supports(); not in describe()
  std::vector<double> speeds;         // tokens/s per device (calibrated plans), empty for pull
  std::int64_t S = 0, chunk_size = 0, segment_tokens = 0;
  // Sequence parallel: device -1 = pulled by the first free device, which then keeps the segment for its
  // later passes (the state recurrence records it); otherwise the device every pass of the segment runs on.
  std::vector<nodes::Segment> segments;
  std::vector<std::pair<std::int64_t, std::int64_t>> rows;  // head split: rows [first, second) of devices[d]
  // stream: how the pieces run ("pinned stream on <device>", "one forward() call per piece on <device>", "the
  // forward graph per piece"); stream and Balancing::fastest: the measured rates behind the choice (tokens/s,
  // one line each).
  std::string engine;
  // stream: true when the engine overlaps the transfers and compute of consecutive pieces (SequenceStream::
  // overlapped(): a GPU through pinned staging); false for one forward call per piece, and for other passes.
  bool overlapped = false;
  std::vector<std::string> measured;
  // Packed sequences (ForwardArgs::cu_seqlens): their count, and the sequences [first, second) of each segment (the
  // segments are cut at sequence boundaries; each is one packed call, no combine). 0 / empty otherwise.
  std::int64_t packed_sequences = 0;
  std::vector<std::pair<std::int64_t, std::int64_t>> sequences;
  // Packed, several devices: the sequences longer than two segments, each cut across every device after the
  // segments above have run (sequence parallel, as an unpacked sequence), not in `segments`.
  std::vector<std::int64_t> spread_sequences;
  std::string describe() const;  // one line per item; MLSTM_PLAN_DEBUG=1 prints it at run time
};

// Plans segments of `segment_tokens` (0: about 4 segments per device, whole chunks, at least one chunk).
Plan make_plan(const ProblemShape& shape, const MlstmOptions& options, const std::vector<std::string>& devices,
               std::int64_t segment_tokens = 0);
// A calibrated plan: shares of the sequence proportional to `speeds`, each cut into segments.
Plan make_calibrated_plan(const ProblemShape& shape, const MlstmOptions& options,
                          const std::vector<std::string>& devices, const std::vector<double>& speeds,
                          std::int64_t segment_tokens = 0);

// The plan of a packed problem (sequence boundaries `offsets`): segments of whole sequences of about
// `segment_tokens` (0: one segment for one device, about 4 per device for several), each at least one sequence;
// with several devices a sequence longer than two segments is spread over all of them instead.
Plan make_packed_plan(const ProblemShape& shape, const MlstmOptions& options, const std::vector<std::string>& devices,
                      std::span<const std::int64_t> offsets, std::int64_t segment_tokens = 0);

class FlowGraphRunner {
 public:
  explicit FlowGraphRunner(std::vector<std::shared_ptr<ComputeDevice>> devices);
  explicit FlowGraphRunner(const std::string& device_spec);  // devices_from_spec

  const std::vector<std::shared_ptr<ComputeDevice>>& devices() const noexcept { return devices_; }
  // A host tensor for a run's inputs (or anything else) in the memory the runner's devices transfer fastest: the
  // first device's that has such memory (ComputeDevice::host_tensor: page-locked memory of an OpenCL device,
  // which its stream uploads from without a host copy), else ordinary memory. The analogue of PyTorch's
  // pin_memory(): fill it, then pass its view in ForwardArgs. Uninitialised contents.
  Tensor host_tensor(Shape shape, DType dtype) const;
  void set_balancing(Balancing b) noexcept { balancing_ = b; }
  // Makes every forward() / backward() (and their _into forms) one shard of a longer sequence whose other shards
  // run elsewhere (exchange.hpp; mlstm::dist::MpiRunner): the graph always computes the shard's summary, hands it
  // to `exchange` through an async_node gateway and goes on from the state (backward: the state gradient) it
  // returns. The head splits, packed sequences and open_stream() are refused with an exchange (InvalidArgument
  // "exchange"). nullptr: a whole sequence again.
  void set_exchange(std::shared_ptr<StateExchange> exchange) noexcept { exchange_ = std::move(exchange); }
  const std::shared_ptr<StateExchange>& exchange() const noexcept { return exchange_; }
  Balancing balancing() const noexcept { return balancing_; }
  // The options a run of `shape` takes: an automatic chunk size (kAutoChunk) resolved over the runner's devices
  // (mlstm::with_chunk: the choice of the device that carries most of a run), any other unchanged. Every method
  // below resolves its options so; plan().chunk_size and last_plan() show the size a run took.
  MlstmOptions with_chunk(const MlstmOptions& options, const ProblemShape& shape) const;
  // Measured forward speed (tokens/s) of every device on this problem's dimensions (cached).
  std::vector<double> calibrate(const ProblemShape& shape, const MlstmOptions& options);
  // The plan of a run of `pass` on this problem: what forward()/backward()/... would run (they call the same
  // function). A calibrated runner measures the devices first (cached).
  Plan plan(const ProblemShape& shape, const MlstmOptions& options, std::int64_t segment_tokens = 0,
            Pass pass = Pass::forward) const;
  // h and (when options.return_last_states) the last state; equal to one call of a chunkwise kernel.
  // Sequence parallel: segments of the sequence across the devices (see the file comment).
  //
  // `keep` (optional): states for the backward of the same inputs (StateCheckpoints, bound to these arguments):
  // a GPU streaming a segment keeps the state entering each of its pieces, and every device the state leaving its
  // segment when it computes it. Pass them as BackwardArgs::checkpoints, and a GPU's streamed backward starts its
  // pieces from them instead of recomputing them (a third of its uploads at 128/128).
  //
  // Packed sequences (args.cu_seqlens): the row is cut at sequence boundaries into segments of whole sequences
  // (make_packed_plan), each one packed call on the device that pulls it; with several devices, a sequence longer
  // than two segments then runs sequence parallel over all of them. `keep` is refused (InvalidArgument "keep").
  ForwardResult forward(const ForwardArgs& args, const MlstmOptions& options, std::int64_t segment_tokens = 0,
                        StateCheckpoints* keep = nullptr);
  // forward() with h written into the caller's `h`: (B,NH,S,DHHV) of q's dtype whose rows of S*DHHV elements are
  // contiguous (InvalidArgument("h") otherwise); the result's h is empty. Each segment's device writes its part
  // in place; in host_tensor() memory a GPU's stream downloads it there directly, so with the inputs there as well
  // no byte of the run passes a host copy.
  ForwardResult forward_into(TensorView h, const ForwardArgs& args, const MlstmOptions& options,
                             std::int64_t segment_tokens = 0, StateCheckpoints* keep = nullptr);
  // Head split: the B*NH rows cut into contiguous groups, one group per device, each over the whole
  // sequence; the same results. Inputs must be contiguous.
  ForwardResult forward_head_split(const ForwardArgs& args, const MlstmOptions& options);
  // Gradients through the graph, sequence parallel over the devices that have a backward (InvalidArgument
  // naming "devices" when none has): the forward's local states and combine give every segment's entering
  // state, the local state gradients (in parallel) and a reverse combine give the gradient leaving every
  // segment, then every segment's gradients are computed in parallel (nodes.hpp). Equal to one call of the
  // chunkwise kernel's backward. One segment (one device, or segment_tokens >= S): one backward call.
  // args.checkpoints (optional): states a forward of these inputs kept (forward's `keep`); InvalidArgument
  // ("checkpoints") when they were kept by a forward of other inputs, shape, gate or chunk size.
  BackwardResult backward(const BackwardArgs& args, const MlstmOptions& options, std::int64_t segment_tokens = 0);
  // backward() with the token gradients written into the caller's views (GradientViews: rows of S*D elements
  // contiguous; InvalidArgument naming the view otherwise); the result keeps dc0 / dn0 / dm0 only. Each segment's
  // device writes its part in place; in host_tensor() memory a GPU's stream downloads them there directly, so with
  // the inputs and dh there as well no byte of the backward passes a host copy.
  BackwardResult backward_into(const GradientViews& out, const BackwardArgs& args, const MlstmOptions& options,
                               std::int64_t segment_tokens = 0);
  // Gradients, head split: the rows cut into one contiguous group per device with a backward, each over the
  // whole sequence. Inputs must be contiguous.
  BackwardResult backward_head_split(const BackwardArgs& args, const MlstmOptions& options);
  // A stream of one sequence in pieces of about `piece.S` tokens (StreamSession's engine), from `initial`
  // (empty: the zero state). The devices that take part are decided once, by measurement (cached with the
  // calibration): each capable device streaming alone (a GPU whose tensor-core kernels take the problem through
  // pinned staging, overlapped; any other device one forward() call per piece), and, with several devices, the
  // forward graph over all of them per piece (sequence parallel). The fastest wins, so adding a device never
  // makes a stream slower than it measured without it. last_plan() says which and why (Pass::stream).
  std::unique_ptr<SequenceStream> open_stream(const ProblemShape& piece, const MlstmOptions& options,
                                              State initial = {});
  // What ran where in the last run ("segment 3: outputs on opencl:1 ...", "segment 2: backward on cpu:numa0").
  const std::vector<std::string>& last_log() const noexcept { return log_; }
  // The plan of the last run (set before it ran) and the flow graph it built, as data and as Graphviz DOT.
  const Plan& last_plan() const noexcept { return last_plan_; }
  const GraphDescription& last_graph() const noexcept { return graph_; }
  std::string dot() const { return graph_.dot(); }

 private:
  struct PlannedRun {
    std::vector<std::shared_ptr<ComputeDevice>> devices;  // devices[d] is plan.devices[d]
    Plan plan;
  };
  ForwardResult run_forward(const ForwardArgs& args, const MlstmOptions& options, std::int64_t segment_tokens,
                            TensorView h_out, StateCheckpoints* keep);  // forward() and forward_into()
  BackwardResult run_backward(const BackwardArgs& args, const MlstmOptions& options, std::int64_t segment_tokens,
                              const GradientViews* out);  // backward() and backward_into()
  // Packed sequences (runner_packed.cpp): segments of whole sequences, pulled by the devices.
  PlannedRun plan_packed(Pass pass, const ForwardArgs& args, const ProblemShape& shape, const MlstmOptions& options,
                         std::int64_t segment_tokens) const;
  ForwardResult run_packed_forward(const ForwardArgs& args, const ProblemShape& shape, const MlstmOptions& options,
                                   std::int64_t segment_tokens, TensorView h_out);
  BackwardResult run_packed_backward(const BackwardArgs& args, const ProblemShape& shape, const MlstmOptions& options,
                                     std::int64_t segment_tokens, const GradientViews* out);
  // The one planning function of every run and of plan(): the capable devices, then the plan over them.
  PlannedRun plan_run(Pass pass, const ProblemShape& shape, const MlstmOptions& options,
                      std::int64_t segment_tokens) const;
  // Keeps the graph the run built and, with MLSTM_GRAPH_DOT=<path>, writes it there (a failed write is logged
  // and noted in last_log(), the run goes on).
  void built(const GraphDescription& graph);
  // InvalidArgument("exchange") naming `what` when the runner has an exchange (set_exchange).
  void refuse_exchange(const std::string& what) const;
  // last_log() of a finished run: its nodes' log, device failures, and a failed DOT write.
  void finish_log(std::vector<std::string> log, const std::vector<std::string>& failures);
  // The devices that support every one of `stages` for this problem (ComputeDevice::supports); those left out
  // are logged and added to `left_out` with the reason, and InvalidArgument("devices") names every reason when
  // none is left.
  std::vector<std::shared_ptr<ComputeDevice>> capable_devices(std::initializer_list<DeviceStage> stages,
                                                              const ProblemShape& shape, const MlstmOptions& options,
                                                              std::vector<std::string>& left_out) const;
  // The plan over `devices`: calibrated shares or pull (balancing_).
  Plan plan_over(const std::vector<std::shared_ptr<ComputeDevice>>& devices, const ProblemShape& shape,
                 const MlstmOptions& options, std::int64_t segment_tokens) const;
  static std::vector<double> calibrate(const std::vector<std::shared_ptr<ComputeDevice>>& devices,
                                       const ProblemShape& shape, const MlstmOptions& options);
  std::vector<std::shared_ptr<ComputeDevice>> devices_;
  std::vector<std::string> log_;
  Plan last_plan_;
  GraphDescription graph_;
  std::string dot_error_;  // the last MLSTM_GRAPH_DOT write's failure, for finish_log
  Balancing balancing_ = Balancing::pull;
  std::shared_ptr<StateExchange> exchange_;
};

}  // namespace mlstm::graph
