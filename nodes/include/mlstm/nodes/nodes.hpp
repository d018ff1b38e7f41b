// The nodes module: oneTBB flow-graph node bodies over segments (a run of tokens for all rows of a problem),
// public so that users can wire them into their own tbb::flow::graph. The messages are small value types whose
// states are StateHandles (shared, immutable), so passing a message through queues and sequencers copies no
// state.
//
// The sequence-parallel forward that graph::FlowGraphRunner builds from them:
//
//   queue_node<Segment> --> function_node<Segment, SegmentSummary, rejecting>  (LocalStateBody, one per device)
//        --> sequencer_node<SegmentSummary> (by index) --> function_node<SegmentSummary, SegmentEntry, serial>
//            (StateRecurrenceBody: the state entering every segment, in order)
//        --> queue_node<SegmentEntry> --> function_node<SegmentEntry, SegmentOutput, rejecting>  (SegmentOutputBody,
//            one per device, fed the segments whose local state that device computed)
//   The last entry (is_last) carries the final state in `leaving`; the runner passes it to an
//   overwrite_node<StateHandle> ("final_state"), the graph's way out (one segment: the output run's SegmentOutput).
//
// Each device node is `serial` + `rejecting`, so a busy device declines and the queue offers the segment
// to the next free one: faster devices pull more segments (oneTBB's binpack pattern).
//
// The sequence-parallel backward (graph::FlowGraphRunner::backward) reuses the first two stages to get the
// true state entering every segment, then runs the reverse state-gradient recurrence the same way (stages.hpp
// "Backward": the gradient of the state entering a segment is decay * (gradient of the state leaving it) +
// the segment's local part, decay = exp(G_seg + m_enter - m_leave)):
//
//   ... StateRecurrenceBody --> sequencer_node<SegmentEntry> (by index) --> function_node<SegmentEntry,
//        continue_msg, serial> (records the entries in the SegmentGradientProblem, which takes them only in
//        segment order; segments 1.. go to the local-gradient queue, and after the last one the last
//        segment's SegmentGradientEntry, with dc_last, goes to the backward queue)
//   The sequencer is needed even behind a serial node: oneTBB runs a serial function_node's bodies in input
//   order but may pass its outputs on in another order (it spawns the next body before handing on the
//   current output), so anything that relies on order after a function_node needs a sequencer_node.
//   queue_node<SegmentEntry> --> function_node<SegmentEntry, SegmentStateGradient, rejecting>
//        (LocalStateGradientBody, one per device: a zero gradient leaving the segment)
//        --> sequencer_node (LAST segment first) --> function_node<..., serial> (StateGradientRecurrenceBody:
//            the gradient of the state leaving every earlier segment, in reverse order)
//   queue_node<SegmentGradientEntry> --> function_node<SegmentGradientEntry, int, rejecting>
//        (SegmentBackwardBody, one per device: dq, dk, dv, di, df of the segment; the initial state's
//        gradients from the first segment)
//
// A segment's gate gradient df needs the sum over all LATER tokens; its backward gets it exactly through
// <dC_leave, C_leave> + <dn_leave, n_leave> (the identity stages.hpp uses for dc_last), so no further pass.
//
//   tbb::flow::graph g;
//   auto problem = std::make_shared<mlstm::nodes::SegmentProblem>(args, options, result_h);
//   tbb::flow::function_node<Segment, SegmentSummary, tbb::flow::rejecting> local(g, 1, LocalStateBody{problem, dev});
//   ...make_edge(...); g.wait_for_all();
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "mlstm/core/tensor.hpp"
#include "mlstm/devices/compute_device.hpp"

namespace mlstm::nodes {

// A run of tokens [t0, t1) of every row. Every node body refuses (InvalidArgument naming the segment) one outside
// the sequence (0 <= t0 < t1 <= S needed) before it reads or writes anything (SegmentProblem::check_segment).
struct Segment {
  int index = 0;
  std::int64_t t0 = 0, t1 = 0;
  int device = -1;  // the device the plan gives it to; -1: whichever device is free pulls it
};

// A segment's local state (from the EMPTY state) and its total log forget decay per row.
struct SegmentSummary {
  int index = 0;
  Segment segment;    // its tokens: StateRecurrenceBody refuses a summary whose tokens are not its list's
  StateHandle local;  // the state leaving the segment when it is entered in the EMPTY state
  Tensor G;           // (B,NH) float32: sum of logsigmoid(f) over the segment
  std::string device;
  int device_index = -1;  // the graph's device that computed it (its inputs are resident there), -1 after a failover
};

// The true state entering a segment. StateRecurrenceBody also gives the state leaving it and marks the
// sequence's last segment, so the final state leaves the graph as the last message (fgbzip2's isLast).
struct SegmentEntry {
  int index = 0;
  Segment segment;
  StateHandle state;
  StateHandle leaving;   // the state leaving the segment (set by StateRecurrenceBody; may be empty elsewhere)
  bool is_last = false;  // the segment that ends the sequence: `leaving` is the final state
};

// What a segment's output run hands on: its index and, when the problem keeps the final state
// (SegmentProblem::keep_final_state) and the segment ends the sequence, the state leaving it.
struct SegmentOutput {
  int index = 0;
  StateHandle leaving;  // empty unless this output run computed the final state
};

// The problem the nodes work on: inputs (the caller keeps them alive), options, the output h (written by
// segment, disjoint slices) and the state entering the first segment.
// It keeps which segments had their local state and their outputs computed (a short list under a mutex): a
// segment index given twice, or tokens that overlap a segment's already taken, are refused (InvalidArgument naming
// both segments), and h() refuses to hand out an h whose segments left tokens out. A user who wires the nodes
// gets an error, never a silently wrong h (a gap or an overlap once ran to the end with h wrong; tokens past S
// wrote past the end of h).
class SegmentProblem {
 public:
  // with_outputs = false: no h is allocated (the backward only needs the entering states). `h_out` (optional): the
  // caller's h, (B,NH,S,DHHV) of q's dtype with rows of S*DHHV contiguous elements; every segment's h goes there
  // (its device writes it in place: ComputeDevice::forward_into) and h() stays empty.
  SegmentProblem(const ForwardArgs& args, const MlstmOptions& options, bool with_outputs = true, TensorView h_out = {});
  const ProblemShape& shape() const noexcept { return shape_; }
  const MlstmOptions& options() const noexcept { return options_; }
  // Refuses (InvalidArgument naming "segment <index>" and the numbers, e.g. "segment 1: tokens [100, 300) are
  // outside the sequence's [0, 200)") a segment with an index outside [0, S) (a sequence of S tokens has at most S
  // segments) or tokens not within the sequence: 0 <= t0 < t1 <= S. segment_args, h_out, log_decay and write_h
  // check their segment with it, and so does every node body first.
  void check_segment(const Segment& s) const;
  // Views of the inputs restricted to a segment (no copies).
  ForwardArgs segment_args(const Segment& s) const;
  // The EMPTY state (C = n = 0, m = -inf; m = 0 for the sigmoid gate; one shared handle) and the problem's
  // initial state.
  SegmentEntry empty_entry() const;
  SegmentEntry initial_entry() const;
  // Per row (B,NH) float32: G of the segment, the sum of logsigmoid(f) over its tokens (float32 like the kernels).
  Tensor log_decay(const Segment& s) const;
  // Writes h of segment s (shaped (B,NH,t1-t0,DHHV)); thread-safe for disjoint segments. A segment covering
  // the whole sequence hands its tensor over instead of copying it.
  void write_h(const Segment& s, Tensor&& h);
  // h of the whole sequence, once the segments' outputs are computed: an mlstm::Error naming the tokens no segment
  // wrote unless their outputs cover [0, S) (check_complete). Empty when the problem has no h (with_outputs =
  // false, or h_out: the caller's h, which check_complete checks the same way).
  Tensor& h();
  // Refuses (mlstm::Error naming the missing tokens) outputs that do not cover [0, S): segments left out, a gap
  // between two, a segment whose index came twice (a sequencer_node drops the second). No-op without outputs.
  void check_complete() const;
  // The caller's h of segment s when the problem has one (h_out), else an empty view.
  TensorView h_out(const Segment& s) const;
  // The slice of this problem's own h of segment s (an output run's forward_into writes it in place).
  TensorView own_h(const Segment& s);
  // Takes segment s for its local state / its outputs (the node bodies do, once per segment): refuses
  // (InvalidArgument) an index taken already or tokens that overlap a taken segment's.
  void take_local(const Segment& s) { take(local_taken_, s, "local state"); }
  void take_outputs(const Segment& s) { take(outputs_taken_, s, "outputs"); }
  // With keep_final_state(true), the output run of the segment that ends the sequence also computes the state
  // leaving it and hands it on in its SegmentOutput (a one-segment plan needs no local-state pass: its
  // entering state is known).
  void keep_final_state(bool keep) noexcept { keep_final_state_ = keep; }
  bool keeps_final_state() const noexcept { return keep_final_state_; }
  // With keep_states(to), every output run is a forward_into (into h_out, or this problem's h) that keeps states
  // for a later backward in `to` (ComputeDevice::KeepStates; tokens of the whole sequence).
  void keep_states(StateCheckpoints* to) noexcept { keep_ = to; }
  StateCheckpoints* kept_states() const noexcept { return keep_; }
  std::vector<std::string> log;  // "segment i: local on <device>" etc., for plans and tests
  std::mutex log_mutex;

 private:
  State make_empty_state() const;
  void take(std::vector<Segment>& taken, const Segment& s, const char* what);
  ForwardArgs args_;
  MlstmOptions options_;
  ProblemShape shape_;
  StateHandle empty_;
  Tensor h_;
  TensorView h_out_;
  bool keep_final_state_ = false;
  StateCheckpoints* keep_ = nullptr;
  mutable std::mutex taken_mutex_;
  std::vector<Segment> local_taken_, outputs_taken_;  // the segments whose local state / outputs were computed
};

// The devices of a graph with failover: work given to a device that fails (DeviceError: kernel error,
// lost device, out of memory) is rerun on the next live device from the same inputs and entering state,
// the failed device is taken out for the rest of the run, and a warning is logged. When no device is left
// the run fails with an mlstm::Error naming every failure.
// Test hook: MLSTM_FAULT_INJECT="<device name substring>:<segment index or *>" makes a matching device fail
// when it starts that segment (any segment for *), checked for every device, with or without a pool.
// Out of memory: a segment whose device reports DeviceError(out_of_memory) is split in halves (whole chunks)
// that run one after the other on the same device with the state carried, down to one chunk, before the
// device is given up (a CPU worker's std::bad_alloc counts as out of memory). Test hook: "<device>:<segment|*>:oom" (every run fails) or ":oom>N" (runs of more than
// N tokens fail).
class DevicePool {
 public:
  explicit DevicePool(std::vector<std::shared_ptr<ComputeDevice>> devices);
  // Runs fn on device `preferred` (or, after failures, the next live one); returns the device used.
  std::shared_ptr<ComputeDevice> run(std::size_t preferred, int segment, const std::function<void(ComputeDevice&)>& fn);
  std::size_t alive() const;
  std::vector<std::string> failures() const;
  // The index of `device` in the pool; -1 when it is not one of the pool's devices.
  int index_of(const ComputeDevice* device) const;

 private:
  std::vector<std::shared_ptr<ComputeDevice>> devices_;
  std::vector<bool> dead_;
  std::vector<std::string> failures_;
  mutable std::mutex mutex_;
};

// Throws DeviceError(lost) when MLSTM_FAULT_INJECT names this device and segment.
void check_injected_fault(const ComputeDevice& device, int segment);
// Throws DeviceError(out_of_memory) when MLSTM_FAULT_INJECT has an :oom form for this device and segment
// and the run has more tokens than it allows.
void check_injected_oom(const ComputeDevice& device, int segment, std::int64_t tokens);

// function_node body: the local summary of a segment on one device (through `pool` when given).
struct LocalStateBody {
  std::shared_ptr<SegmentProblem> problem;
  std::shared_ptr<ComputeDevice> device;
  std::shared_ptr<DevicePool> pool = nullptr;
  std::size_t device_index = 0;
  SegmentSummary operator()(const Segment& s) const;
};

// Serial function_node body fed IN ORDER (through a sequencer_node): combines the running state with each
// summary (stages::combine) and emits the state entering the segment with the state leaving it; the last
// segment's entry is marked is_last and its `leaving` is the final state (`running` is the body's own carried
// state, not a way out of the graph). The bodies run in order, but the entries can reach the successors in
// another order (oneTBB hands a function_node's outputs on after it has started the next body): a consumer
// that needs segment order puts a sequencer_node<SegmentEntry> (by index) behind it. A segment the plan gave
// to no device (pulled) is given to the device that computed its summary, where its inputs are resident
// (ComputeDevice::keep_inputs_resident).
struct StateRecurrenceBody {
  std::shared_ptr<SegmentProblem> problem;
  std::shared_ptr<std::vector<Segment>> segments;
  std::shared_ptr<SegmentEntry> running;  // starts as problem->initial_entry()
  SegmentEntry operator()(const SegmentSummary& summary) const;
};

// The state leaving a segment entered in `in`: stages::combine(in, summary.G, summary.local) per row, into a new
// state (`in` stays as it is for its readers). StateRecurrenceBody's step, and the fold of a shard's summary.
StateHandle combine(const SegmentProblem& problem, const State& in, const SegmentSummary& summary);

// function_node body: h of a segment from its entering state, on one device (through `pool` when given).
// run() also hands on the state leaving the sequence when the problem keeps it
// (SegmentProblem::keep_final_state): wire it as function_node<SegmentEntry, SegmentOutput> through
// SegmentOutputStateBody; operator() returns the index only, for graphs that need just h.
struct SegmentOutputBody {
  std::shared_ptr<SegmentProblem> problem;
  std::shared_ptr<ComputeDevice> device;
  std::shared_ptr<DevicePool> pool = nullptr;
  std::size_t device_index = 0;
  SegmentOutput run(const SegmentEntry& entry) const;
  int operator()(const SegmentEntry& entry) const { return run(entry).index; }
};

// SegmentOutputBody as the body of a function_node<SegmentEntry, SegmentOutput>.
struct SegmentOutputStateBody {
  SegmentOutputBody body;
  SegmentOutput operator()(const SegmentEntry& entry) const { return body.run(entry); }
};

// ---- Sequence-parallel backward --------------------------------------------------------------------

// The local part of the gradient of the state entering a segment: computed with a ZERO gradient leaving it.
struct SegmentStateGradient {
  int index = 0;
  Tensor dC, dn;  // (B,NH,DHQK,DHHV), (B,NH,DHQK) float32
  std::string device;
};

// What the backward of one segment needs: the true state entering it and the gradient of the state leaving it.
struct SegmentGradientEntry {
  int index = 0;
  Segment segment;
  StateHandle state;  // entering state
  Tensor dC, dn;      // gradient of the state leaving the segment
};

// The problem of the backward nodes: the forward's SegmentProblem (for the entering states; no h), dh and the
// gradient of the last state, the table of entering states (recorded in order by the graph), and the gradients,
// written by segment (disjoint slices; thread-safe).
class SegmentGradientProblem {
 public:
  // `out` (optional): the caller's views the token gradients go into (each segment's device writes its slice in
  // place: ComputeDevice::backward_into); take_result() then carries dc0 / dn0 / dm0 only.
  SegmentGradientProblem(const BackwardArgs& args, const MlstmOptions& options, std::vector<Segment> segments,
                         const GradientViews* out = nullptr);
  const ProblemShape& shape() const noexcept { return forward_->shape(); }
  const MlstmOptions& options() const noexcept { return forward_->options(); }
  const std::shared_ptr<SegmentProblem>& forward() const noexcept { return forward_; }
  const std::vector<Segment>& segments() const noexcept { return segments_; }
  // Refuses (InvalidArgument naming the segment) an index outside the problem's segments, or a segment whose tokens
  // are not those the problem has for that index. The backward node bodies check their segment with it first.
  void check_segment(int index, const Segment& s) const;
  // Records the state entering segment e.index. Entries must come in segment order (0, 1, ...; an
  // mlstm::Error otherwise): the reverse recurrence reads segment s-1's entry once segment s's local
  // gradient is done, which the graph queues when it records entry s. `leaving` is the state leaving the
  // sequence, given after the last entry.
  void record_entry(const SegmentEntry& e);
  void record_final_state(const SegmentEntry& leaving);
  // The recorded state entering segment `index` (an mlstm::Error if it is not recorded yet).
  const SegmentEntry& entry(int index) const;
  // The state leaving segment `index` (the next one's entering state, or the final state).
  const SegmentEntry& leaving(int index) const;
  // The last segment's backward entry: its entering state and dc_last / dn_last (zeros when not given).
  SegmentGradientEntry last_entry() const;
  // Per row (B,NH) float32: how the gradient of the state leaving segment `index` reaches the state entering it,
  // exp(G + m_enter - m_leave) (stages.hpp "Backward"); 0 where the entering m is -inf (nothing entered: the
  // stabilised entering state is multiplied by 0, so is its gradient) or G is -inf (a forget gate of -inf in the
  // segment forgets it). Both states must be recorded. Computed once per segment (it reads the segment's f): a
  // shard's backward needs it in its gradient fold and again in the reverse recurrence.
  Tensor decay(int index) const;
  // The arguments of a segment's backward: inputs [t0, t1) with entering state (C, n, m), dh [t0, t1), and
  // the gradient of the state leaving it.
  BackwardArgs segment_args(std::int64_t t0, std::int64_t t1, ConstTensorView C, ConstTensorView n, ConstTensorView m,
                            ConstTensorView dC, ConstTensorView dn) const;
  // Writes the token gradients of [t0, t1) (shaped (B,NH,t1-t0,...)); thread-safe for disjoint ranges. For the
  // whole sequence they are moved out of r instead of copied (r keeps dc0 / dn0 / dm0).
  void write_grads(std::int64_t t0, std::int64_t t1, BackwardResult& r);
  // The caller's views of tokens [t0, t1) when the problem has them (backward_into), else nothing.
  std::optional<GradientViews> grads_out(std::int64_t t0, std::int64_t t1) const;
  // The initial state's gradients (from the first segment's backward; only when the problem has an initial state).
  void write_initial_grads(const BackwardResult& r);
  bool has_initial_state() const noexcept { return args_.inputs.has_initial_state(); }
  BackwardResult take_result();
  std::vector<std::string> log;
  std::mutex log_mutex;

 private:
  BackwardArgs args_;
  std::shared_ptr<SegmentProblem> forward_;
  std::vector<Segment> segments_;
  std::vector<SegmentEntry> entries_;
  std::atomic<int> recorded_{0};  // entries_[0, recorded_) are recorded
  SegmentEntry final_;
  std::atomic<bool> final_recorded_{false};
  BackwardResult result_;
  std::optional<GradientViews> out_;
  mutable std::mutex decays_mutex_;
  mutable std::vector<Tensor> decays_;  // decay(index) once computed (empty until then)
};

// function_node body: the local state gradient of a segment (from its true entering state, a zero gradient
// leaving it) on one device (through `pool` when given).
struct LocalStateGradientBody {
  std::shared_ptr<SegmentGradientProblem> problem;
  std::shared_ptr<ComputeDevice> device;
  std::shared_ptr<DevicePool> pool = nullptr;
  std::size_t device_index = 0;
  SegmentStateGradient operator()(const SegmentEntry& entry) const;
};

// The reverse step of the state-gradient recurrence, per row: (dC, dn) <- decay * (dC, dn) + (lC, ln) (decay: (B,NH),
// the others of the state's shapes, float32). StateGradientRecurrenceBody's step and the fold of a shard's summary.
void decay_and_add(Tensor& dC, Tensor& dn, const Tensor& decay, const Tensor& lC, const Tensor& ln);

// Serial body fed in REVERSE order (last segment first, through a sequencer_node keyed by
// segments - 1 - index), for segments 1 .. last: keeps the gradient of the state leaving the current segment
// (`running`, starting at dc_last / dn_last), turns it into the gradient entering it
// (decay * running + local) and returns the entry of the PREVIOUS segment.
struct StateGradientRecurrenceBody {
  std::shared_ptr<SegmentGradientProblem> problem;
  std::shared_ptr<SegmentGradientEntry> running;  // starts as problem->last_entry()
  SegmentGradientEntry operator()(const SegmentStateGradient& local) const;
};

// function_node body: the gradients of a segment (dq, dk, dv, di, df; for segment 0 also those of the
// initial state) from its entering state and the gradient leaving it, on one device (through `pool`).
struct SegmentBackwardBody {
  std::shared_ptr<SegmentGradientProblem> problem;
  std::shared_ptr<ComputeDevice> device;
  std::shared_ptr<DevicePool> pool = nullptr;
  std::size_t device_index = 0;
  int operator()(const SegmentGradientEntry& entry) const;
};

}  // namespace mlstm::nodes
