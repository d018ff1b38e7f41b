// OpenCL compute devices: each runs the chunkwise kernels on one OpenCL device, choosing per problem between
// the tensor-core kernels (opencl/tc_routine) and the portable ones (opencl/chunkwise_routine).
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <thread>
#include <utility>

#include "mlstm/core/env.hpp"
#include "mlstm/core/packed.hpp"
#include "mlstm/core/trace.hpp"
#include "mlstm/devices/compute_device.hpp"
#include "mlstm/devices/opencl/backward_stream.hpp"
#include "mlstm/devices/opencl/chunkwise_routine.hpp"
#include "mlstm/devices/opencl/launch_params.hpp"
#include "mlstm/devices/opencl/stream.hpp"
#include "mlstm/devices/opencl/tc_routine.hpp"

namespace mlstm {

namespace {

// "B*NH*S" of a (B,NH,S,D) view, for traces.
std::string token_rows(ConstTensorView t) { return std::to_string(t.numel() / std::max<std::int64_t>(1, t.dim(-1))); }

// The device fact: its tensor-core programs failed to build (then the portable kernels run there, for every
// compute device opened on it).
const std::string kTensorCoreBuildFailed = "tensor-core programs failed to build";

// Tokens per piece of a pinned stream of this problem: MLSTM_STREAM_PIECE, else about 64 MiB of inputs, whole
// chunks, 1..64 Ki tokens.
// The most pieces of packed sequences one BackwardStream run takes: their entering states within an eighth of the
// device's memory, or MLSTM_BACKWARD_RUN_PIECES (a positive count; tests cut runs short with it).
std::int64_t backward_run_pieces(const ProblemShape& p, std::uint64_t device_memory) {
  if (const auto n = env::positive_count("MLSTM_BACKWARD_RUN_PIECES", "pieces")) return *n;
  return static_cast<std::int64_t>(
      std::max<std::uint64_t>(1, device_memory / 8 / std::max<std::size_t>(1, state_bytes(p))));
}

// How a pinned stream's pieces travel before its page-locked staging is ready (DeviceStream::Config::staging):
// MLSTM_STREAM_STAGING=automatic|page_locked|pageable, page_locked by default.
opencl::DeviceStream::Config::Staging stream_staging() {
  using Staging = opencl::DeviceStream::Config::Staging;
  const auto v = env::one_of("MLSTM_STREAM_STAGING", {"automatic", "page_locked", "pageable"});
  if (v == "automatic") return Staging::automatic;
  if (v == "pageable") return Staging::pageable;
  return Staging::page_locked;
}

std::int64_t stream_piece_tokens(const ProblemShape& p, const MlstmOptions& o) {
  const std::int64_t L = chunk_of(o);
  if (const auto t = env::positive_count("MLSTM_STREAM_PIECE", "tokens")) return std::max<std::int64_t>(L, *t / L * L);
  const std::int64_t per_token =
      p.B * p.NH * ((2 * p.DHQK + p.DHHV) * static_cast<std::int64_t>(dtype_size(p.dtype)) + 8);
  const std::int64_t t =
      std::clamp<std::int64_t>((std::int64_t{64} << 20) / std::max<std::int64_t>(1, per_token), L, 65536);
  return t / L * L;
}

// Device bytes of one resident tensor-core backward of this problem: q, k, v, dh in and dq, dk, dv out, the gates
// and their gradients, and the per-chunk states with their gradients (float32), rounded up.
std::uint64_t resident_backward_bytes(const ProblemShape& p, const MlstmOptions& o) {
  const auto rows = static_cast<double>(p.B * p.NH), S = static_cast<double>(p.S);
  const double element = static_cast<double>(dtype_size(p.dtype));
  const double sequences = rows * S * (element * (2.0 * (2 * p.DHQK + p.DHHV) + p.DHHV) + 4.0 * 4);
  const double chunks = rows * std::ceil(S / static_cast<double>(chunk_of(o))) + rows;
  const double states = 2.0 * chunks * 4.0 * static_cast<double>(p.DHQK * p.DHHV + p.DHQK + 1);
  return static_cast<std::uint64_t>(std::min(sequences + states, 1.8e19));
}

// A SequenceStream through opencl::DeviceStream: pinned staging, uploads, kernels and downloads of consecutive
// pieces overlapped, the state on the device. A submitted piece longer than the stream's pieces is cut into
// parts; DeviceStream keeps the h of a part whose staging slot is needed again before take() (finished_).
class PinnedStream final : public SequenceStream {
 public:
  PinnedStream(std::shared_ptr<opencl::Device> device, opencl::DeviceStream::Config config, const State& initial)
      : initial_(initial), stream_(std::move(device), config, initial.C.view(), initial.n.view(), initial.m.view()) {}

  std::uint64_t submit(const ForwardArgs& piece) override {
    if (piece.has_initial_state() || !piece.n0.empty() || !piece.m0.empty())
      throw InvalidArgument("c0", "a streamed piece carries no state (the stream does)");
    check_dims(piece.q, 4, "q", "(B,NH,S,DHQK)");
    const std::int64_t S = piece.q.dim(2), P = max_piece();
    const std::uint64_t ticket = next_++;
    Pending& pending = pending_[ticket];
    pending.len = S;
    for (std::int64_t t0 = 0; t0 < S; t0 += P) {
      const std::int64_t t1 = std::min(S, t0 + P);
      // The state asked for leaves the piece's last part.
      if (t1 == S && !state_out_[0].empty()) {
        stream_.state_after_next_piece_into(state_out_[0], state_out_[1], state_out_[2]);
        state_out_ = {};
      }
      pending.parts.push_back({stream_.push(sequence_slice(piece, t0, t1)), t0, t1 - t0});
    }
    submitted_ = true;
    return ticket;
  }

  void state_after_next_piece_into(TensorView C, TensorView n, TensorView m) override {
    const auto& c = stream_.config();
    check_state_views(C, n, m, c.B, c.NH, c.DHQK, c.DHHV);
    state_out_ = {C, n, m};
  }

  Tensor take(std::uint64_t ticket) override {
    const auto& c = stream_.config();
    Tensor h({c.B, c.NH, pending_of(ticket).len, c.DHHV}, c.dtype);
    take_into(ticket, h.view());
    return h;
  }

  void take_into(std::uint64_t ticket, TensorView out) override {
    const Pending& p = pending_of(ticket);
    const auto& c = stream_.config();
    if (out.shape() != Shape{c.B, c.NH, p.len, c.DHHV} || out.dtype() != c.dtype)
      throw InvalidArgument("out", "expected " + std::string(dtype_name(c.dtype)) + " of shape " +
                                       shape_to_string({c.B, c.NH, p.len, c.DHHV}) + ", got " +
                                       std::string(dtype_name(out.dtype())) + " of shape " +
                                       shape_to_string(out.shape()));
    // Each part from its staging slot, or from where the stream set it aside (the layout of `out` is checked
    // there).
    for (const Part& part : p.parts) stream_.take_into(part.inner, sequence_slice(out, part.t0, part.t0 + part.len));
    pending_.erase(ticket);
  }

  State state() override {
    if (!submitted_) return initial_;
    State s;
    stream_.read_state(s.C, s.n, s.m);
    return s;
  }
  void start_sequence(State initial) override {
    stream_.start_sequence(initial.C.view(), initial.n.view(), initial.m.view());
    initial_ = std::move(initial);
    submitted_ = false;
  }
  bool overlapped() const noexcept override { return true; }
  std::int64_t max_piece() const noexcept override { return stream_.config().max_piece; }

 private:
  struct Part {
    std::uint64_t inner;  // the DeviceStream's ticket
    std::int64_t t0, len;
  };
  struct Pending {
    std::int64_t len = 0;
    std::vector<Part> parts;
  };

  const Pending& pending_of(std::uint64_t ticket) const {
    const auto it = pending_.find(ticket);
    if (it == pending_.end())
      throw InvalidArgument("ticket",
                            "no piece " + std::to_string(ticket) + " waiting (already taken or never submitted)");
    return it->second;
  }

  State initial_;
  std::array<TensorView, 3> state_out_;  // state_after_next_piece_into(), until the next submit()
  opencl::DeviceStream stream_;
  std::map<std::uint64_t, Pending> pending_;
  std::uint64_t next_ = 0;
  bool submitted_ = false;
};

class OpenCLComputeDevice final : public ComputeDevice {
 public:
  OpenCLComputeDevice(std::shared_ptr<opencl::Device> device, OpenCLKernels kernels)
      : device_(device),
        portable_(device),
        tensor_cores_(device, {kernels == OpenCLKernels::emulated_tensor_cores}),
        kernels_(kernels),
        support_(opencl::tensor_core_support(device->info())) {
    if (kernels_ == OpenCLKernels::portable) support_ = {false, 0, 0, "the portable kernels were asked for"};
    if (kernels_ == OpenCLKernels::emulated_tensor_cores) {
      support_ = {true, 0, 0, ""};
      kernels_ = OpenCLKernels::tensor_cores;
      emulate_ = true;
    }
    if (kernels_ == OpenCLKernels::tensor_cores && !support_.available)
      throw DeviceError(DeviceError::Kind::other, device->name(), "no tensor cores here: " + support_.reason);
  }

  std::string name() const override {
    return "opencl:" + std::to_string(device_->info().index) + " " + device_->name();
  }

  DeviceSupport supports(DeviceStage, const ProblemShape& shape, const MlstmOptions& options) const override {
    if (kernels_ != OpenCLKernels::tensor_cores) return {};
    const MlstmOptions o = with_chunk(options, shape);
    if (const std::string misfit = opencl::tensor_core_fit(shape, o); !misfit.empty())
      return {"the tensor-core kernels cannot run this problem: " + misfit, "q"};
    return {};
  }

  // The tensor cores' table where they would run the problem (at the chunk sizes they take), else the portable
  // kernels'.
  ChunkChoice chunk_choice(const ProblemShape& shape, const MlstmOptions& options) const override {
    MlstmOptions at64 = options;
    at64.chunk_size = 64;
    return opencl::chunk_choice(device_->info(), shape,
                                support_.available && opencl::tensor_core_fit(shape, at64).empty() &&
                                    !device_->known_fact(kTensorCoreBuildFailed));
  }

  ForwardResult forward(const ForwardArgs& a, const MlstmOptions& options) override {
    const MlstmOptions o = with_chunk(options, shape_hint(a));
    const ScopedTrace trace([&] { return "forward of " + token_rows(a.q) + " token-rows on " + device_->name(); });
    const ProblemShape p = validate_forward(a, o);
    // Packed sequences within a call: every sequence in the same kernels (mlstm_chunkwise.cl and tc_states.cl
    // PACKED), unless a few long ones would leave the portable kernels' walks too few (portable_each).
    if (!uses_tensor_cores(p, o)) {
      if (portable_each(p))
        return packed::forward_each(a, p, o,
                                    [this](const ForwardArgs& s, const MlstmOptions& so) { return forward(s, so); });
      return portable_.forward(a, o);
    }
    if (streams(a, o, p)) return streamed_forward(a, o, p, {});
    return tensor_cores_.forward(a, o);
  }

  ForwardResult forward_into(const ForwardArgs& a, const MlstmOptions& options, TensorView h,
                             KeepStates keep) override {
    const MlstmOptions o = with_chunk(options, shape_hint(a));
    const ProblemShape p = validate_forward(a, o);
    if (!uses_tensor_cores(p, o) || !streams(a, o, p)) return ComputeDevice::forward_into(a, o, h, keep);
    const ScopedTrace trace([&] { return "forward of " + token_rows(a.q) + " token-rows on " + device_->name(); });
    check_output_rows(h, {p.B, p.NH, p.S, p.DHHV}, p.dtype, "h");
    check_outputs_apart({{h, "h"}}, named_inputs(a));
    return streamed_forward(a, o, p, h, keep);
  }

  std::unique_ptr<SequenceStream> open_stream(const ProblemShape& shape, const MlstmOptions& options,
                                              State initial) override {
    const MlstmOptions o = with_chunk(options, shape);
    check_not_packed(shape, "a stream");
    if (!uses_tensor_cores(shape, o)) return ComputeDevice::open_stream(shape, o, std::move(initial));
    ProblemShape piece = shape;
    piece.S = std::min(std::max<std::int64_t>(shape.S, o.chunk_size), stream_piece_tokens(shape, o));
    return std::make_unique<PinnedStream>(device_, stream_config(piece, o), initial);
  }

  ForwardResult last_state(const ForwardArgs& a, const MlstmOptions& options) override {
    const MlstmOptions o = with_chunk(options, shape_hint(a));
    const ScopedTrace trace([&] { return "last_state of " + token_rows(a.q) + " token-rows on " + device_->name(); });
    const ProblemShape p = validate_forward(a, o);
    if (p.packed()) {
      MlstmOptions with_states = o;
      with_states.return_last_states = true;
      ForwardResult r = forward(a, with_states);
      r.h = Tensor();
      return r;
    }
    if (uses_tensor_cores(p, o)) return tensor_cores_.last_state(a, o);
    return portable_.last_state(a, o);
  }

  BackwardResult backward(const BackwardArgs& a, const MlstmOptions& options) override {
    const MlstmOptions o = with_chunk(options, shape_hint(a.inputs));
    const ScopedTrace trace([&] { return "backward of " + token_rows(a.dh) + " token-rows on " + device_->name(); });
    const ProblemShape p = validate_backward(a, o);
    if (p.packed() && uses_tensor_cores(p, o)) {
      BackwardResult r = packed::allocate_gradients(p);
      BackwardResult states = packed_tensor_core_backward(a, o, p, packed::gradient_views(r));
      r.dc0 = std::move(states.dc0);
      r.dn0 = std::move(states.dn0);
      r.dm0 = std::move(states.dm0);
      return r;
    }
    if (uses_tensor_cores(p, o)) return tensor_core_backward(a, o, p, nullptr);
    if (portable_each(p))
      return packed::backward_each(a, p, o,
                                   [this](const BackwardArgs& s, const MlstmOptions& so) { return backward(s, so); });
    return portable_.backward(a, o);
  }

  BackwardResult backward_into(const BackwardArgs& a, const MlstmOptions& options, const GradientViews& out) override {
    const MlstmOptions o = with_chunk(options, shape_hint(a.inputs));
    const ProblemShape p = validate_backward(a, o);
    if (!uses_tensor_cores(p, o)) return ComputeDevice::backward_into(a, o, out);
    check_gradient_views(out, p);
    check_outputs_apart(named_outputs(out), named_inputs(a));
    if (p.packed()) return packed_tensor_core_backward(a, o, p, out);
    const ScopedTrace trace(
        [&] { return "backward_into of " + token_rows(a.dh) + " token-rows on " + device_->name(); });
    return tensor_core_backward(a, o, p, &out);
  }

  BackwardResult state_gradient(const BackwardArgs& a, const MlstmOptions& options) override {
    const MlstmOptions o = with_chunk(options, shape_hint(a.inputs));
    const ScopedTrace trace(
        [&] { return "state_gradient of " + token_rows(a.dh) + " token-rows on " + device_->name(); });
    const ProblemShape p = validate_backward(a, o);
    if (!uses_tensor_cores(p, o) && !portable_each(p)) return portable_.state_gradient(a, o);  // packed: one call
    if (p.packed())
      return packed::backward_each(
          a, p, o, [this](const BackwardArgs& s, const MlstmOptions& so) { return state_gradient(s, so); });
    return state_gradient_through_backward(
        [&](const BackwardArgs& with_state) { return tensor_core_backward(with_state, o, p, nullptr); }, a, p);
  }

  Tensor host_tensor(Shape shape, DType dtype) override { return device_->pinned_tensor(std::move(shape), dtype); }

  std::unique_ptr<InputResidency> keep_inputs_resident(const std::vector<ConstTensorView>& inputs) override {
    if (resident_inputs_off()) return nullptr;
    std::vector<opencl::Device::HostRange> ranges;
    for (const auto& t : inputs) {
      if (t.empty()) continue;
      std::int64_t last = 0;  // element offset of the view's last element (strides are non-negative)
      for (int d = 0; d < t.dims(); ++d)
        last += (t.shape()[static_cast<std::size_t>(d)] - 1) * t.strides()[static_cast<std::size_t>(d)];
      ranges.push_back({t.bytes(), static_cast<std::size_t>(last + 1) * dtype_size(t.dtype())});
    }
    return std::make_unique<Residency>(*device_, std::move(ranges));
  }

 private:
  struct Residency final : InputResidency {
    Residency(opencl::Device& d, std::vector<opencl::Device::HostRange> ranges) : scope(d, std::move(ranges)) {}
    opencl::Device::RetainedUploads scope;
  };
  opencl::DeviceStream::Config stream_config(const ProblemShape& piece, const MlstmOptions& o) const {
    opencl::DeviceStream::Config c;
    c.B = piece.B;
    c.NH = piece.NH;
    c.DHQK = piece.DHQK;
    c.DHHV = piece.DHHV;
    c.max_piece = piece.S;
    c.dtype = piece.dtype;
    c.options = o;
    c.emulate = emulate_;
    c.staging = stream_staging();
    return c;
  }

  // The forward of a long host-resident sequence as a stream of pieces (DeviceStream): this thread copies piece
  // p+1 into pinned staging and enqueues it while piece p computes, and a second thread waits for each piece's
  // h and copies it into the result, so the two host copies overlap each other as well as the transfers. Inputs
  // in this device's pinned memory (host_tensor()) are uploaded from where they lie, without the first copy.
  // From host memory, two pieces or more: through pinned staging with transfers and compute overlapped. Inputs
  // the graph keeps resident for a second pass (a segment's local state, then its outputs) go the resident way.
  // Packed sequences of two pieces or more stream one after the other through the same stream (each starts
  // afresh, its last state downloaded behind its last piece); fewer run in one call of the packed kernels.
  bool streams(const ForwardArgs& a, const MlstmOptions& o, const ProblemShape& p) const {
    if (device_->inside_retained_range(a.q.bytes())) return false;
    return p.S >= 2 * stream_piece_tokens(p, o);
  }

  // h goes into `out` when given (forward_into: downloaded straight there when it is this device's page-locked
  // memory), else into the result's own h.
  // With keep.to, the stream keeps the state leaving every piece (the state entering the next one, and at the end
  // the state leaving the segment) for a later backward, which then starts its pieces there.
  ForwardResult streamed_forward(const ForwardArgs& a, const MlstmOptions& o, const ProblemShape& p, TensorView out,
                                 KeepStates keep = {}) {
    ProblemShape piece = p;
    piece.N = 0;
    piece.S = stream_piece_tokens(p, o);
    // Packed sequences: pieces cut anywhere, each holding (parts of) up to max_segments sequences (the packed kernels).
    opencl::DeviceStream::Config config = stream_config(piece, o);
    if (p.packed()) config.max_segments = packed_piece_sequences(p);
    const std::vector<packed::Piece> plan =
        p.packed() ? packed::spanning_pieces(a, piece.S, config.max_segments) : packed::pieces(a, p, piece.S);
    std::unique_ptr<opencl::DeviceStream> held =
        p.packed() ? reuse_stream(config, {}, {}, {}) : reuse_stream(config, a.c0, a.n0, a.m0);
    opencl::DeviceStream& stream = *held;
    // The kept states stay on the device (a backward there copies them where it starts its pieces) when they fit an
    // eighth of its memory; beyond that none are kept, and a backward recomputes them.
    const auto pieces = static_cast<std::int64_t>(plan.size());
    const bool keeping = keep.to != nullptr && !p.packed() &&
                         static_cast<std::uint64_t>(pieces) * state_bytes(p) <= device_->info().global_memory / 8;
    stream.keep_states(keeping);
    ForwardResult r;
    if (out.empty()) {
      r.h = Tensor({p.B, p.NH, p.S, p.DHHV}, p.dtype);
      out = r.h.view();
    }
    if (p.packed() && o.return_last_states) {
      r.c = Tensor({p.N, p.NH, p.DHQK, p.DHHV}, DType::f32);
      r.n = Tensor({p.N, p.NH, p.DHQK}, DType::f32);
      r.m = Tensor({p.N, p.NH}, DType::f32);
    }
    std::mutex mutex;
    std::condition_variable changed;
    std::int64_t submitted = 0;
    bool stop = false;
    std::exception_ptr consumer_error;
    std::thread consumer([&] {
      try {
        for (std::int64_t j = 0; j < pieces; ++j) {
          {
            std::unique_lock lock(mutex);
            changed.wait(lock, [&] { return submitted > j || stop; });
            if (submitted <= j) return;  // the producer failed
          }
          const packed::Piece& sp = plan[static_cast<std::size_t>(j)];
          const ScopedTrace take([&] { return "streamed forward: piece " + std::to_string(j) + " taken"; });
          stream.take_into(static_cast<std::uint64_t>(j), sequence_slice(out, sp.t0, sp.t1));
        }
      } catch (...) {
        consumer_error = std::current_exception();
      }
    });
    ForwardArgs rows = a;  // the row's token views (sequence_slice refuses packed args: each piece is one sequence's)
    rows.cu_seqlens = {};
    std::exception_ptr producer_error;
    try {
      for (std::int64_t j = 0; j < pieces; ++j) {
        const packed::Piece& sp = plan[static_cast<std::size_t>(j)];
        const ScopedTrace push([&] { return "streamed forward: piece " + std::to_string(j) + " pushed"; });
        // A packed sequence starts afresh (from its own initial state or zero) and its last state comes down behind
        // the piece it ends in; an unpacked row's stream started from c0 (reuse_stream) and its last state is read
        // below.
        if (p.packed()) {
          stream.set_segments(o.return_last_states
                                  ? opencl::DeviceStream::segments_of(a, sp, r.c.view(), r.n.view(), r.m.view())
                                  : opencl::DeviceStream::segments_of(a, sp));
        }
        (void)stream.push(sequence_slice(rows, sp.t0, sp.t1), /*inputs_outlive_piece=*/true,
                          sequence_slice(out, sp.t0, sp.t1));
        std::lock_guard lock(mutex);
        submitted = j + 1;
        changed.notify_all();
      }
    } catch (...) {
      producer_error = std::current_exception();
    }
    {
      std::lock_guard lock(mutex);
      stop = true;
      changed.notify_all();
    }
    consumer.join();
    if (producer_error || consumer_error || p.packed()) {
      // Uploads straight from the caller's pinned inputs may still be reading them, and packed last states still
      // coming down: they end before we return.
      try {
        stream.finish();
      } catch (const std::exception&) {  // the error already caught is the one to report
        if (!producer_error && !consumer_error) throw;
      }
    }
    if (producer_error) std::rethrow_exception(producer_error);
    if (consumer_error) std::rethrow_exception(consumer_error);
    if (p.packed()) {
      if (o.return_last_states && o.gate == GateVariant::sigmoid) std::memset(r.m.bytes(), 0, r.m.nbytes());
    } else if (o.return_last_states) {
      stream.read_state(r.c, r.n, r.m);
    }
    if (keeping) {
      std::vector<DeviceState> states = stream.take_kept_states();
      for (std::size_t k = 0; k < states.size(); ++k)
        keep.to->put(keep.from + std::min(p.S, static_cast<std::int64_t>(k + 1) * piece.S), std::move(states[k]));
      stream.keep_states(false);
    } else {
      keep.leaving(p.S, r);
    }
    park_stream(std::move(held));
    return r;
  }

  // The tensor-core backward: one resident call (upload everything, compute, download everything), or a long
  // host-resident sequence (two stream pieces or more, inputs not kept resident by the graph) through a
  // BackwardStream, with uploads, kernels and downloads of consecutive pieces overlapped. It streams
  //  - when one resident call would take more than half the device's memory: the stream is what lets the
  //    sequence through at all;
  //  - when the inputs, dh or the caller's gradient views (backward_into) lie in this device's page-locked memory:
  //    the stream moves them straight between there and the device, where one call copies them through its
  //    staging;
  //  - when MLSTM_STREAM_PIECE asks for it.
  // From ordinary memory, measured on an H200 (1M tokens, docs/PERFORMANCE.md), the two take the same time (medians
  // of five paired runs 408 and 412 ms): host copies, not the link, set the pace, and the stream's states pass reads
  // k, v and the gates a second time. There one call is the simpler path.
  // A packed sequence (`any_length`) streams on the same grounds whatever its length: one stream, set up once,
  // serves every sequence, where each resident call would copy its gradients through the host.
  bool streams_backward(const BackwardArgs& a, const MlstmOptions& o, const ProblemShape& p, const GradientViews* out,
                        bool any_length = false) const {
    if ((!any_length && p.S < 2 * stream_piece_tokens(p, o)) || device_->inside_retained_range(a.inputs.q.bytes()))
      return false;
    if (env::get("MLSTM_STREAM_PIECE").has_value() || resident_backward_bytes(p, o) > device_->info().global_memory / 2)
      return true;
    return device_->pinned(a.inputs.q.bytes(), 1) || device_->pinned(a.dh.bytes(), 1) ||
           (out && device_->pinned(out->dq.bytes(), 1));
  }

  // The piece length P of a stream whose every piece boundary (and the end of this call) has a state a forward kept
  // (a.checkpoints), P the first kept token after this call's start; 0 when they do not cover such pieces, when P is
  // not a multiple of the chunk size, or when a piece would need more than four times the stream's own piece of
  // buffers.
  std::int64_t kept_piece(const BackwardArgs& a, const MlstmOptions& o, const ProblemShape& p) const {
    if (!a.checkpoints || device_->inside_retained_range(a.inputs.q.bytes())) return 0;
    const std::int64_t from = a.checkpoints_from;
    const std::vector<std::int64_t> tokens = a.checkpoints->tokens();
    std::int64_t P = 0;
    for (const std::int64_t t : tokens)
      if (t > from) {
        P = t - from;
        break;
      }
    if (P <= 0 || P >= p.S || P % o.chunk_size != 0 || P > 4 * stream_piece_tokens(p, o)) return 0;
    for (std::int64_t j = 1, n = (p.S + P - 1) / P; j <= n; ++j)
      if (!std::binary_search(tokens.begin(), tokens.end(), from + std::min(p.S, j * P))) return 0;
    return P;
  }

  // `max_segments` > 0: packed args stream in pieces holding several sequences (BackwardStream::Config).
  BackwardResult tensor_core_backward(const BackwardArgs& a, const MlstmOptions& o, const ProblemShape& p,
                                      const GradientViews* out, bool packed_sequence = false,
                                      std::int64_t max_segments = 0) {
    const std::int64_t kept = kept_piece(a, o, p);
    if (kept == 0 && !streams_backward(a, o, p, out, packed_sequence)) {
      BackwardResult r = tensor_cores_.backward(a, o);
      if (out) write_gradients(r, *out);
      return r;
    }
    // With a forward's states at its piece boundaries the stream skips its states pass: it moves every byte once,
    // as one call does, with the transfers overlapped, from any memory.
    const std::int64_t piece = kept == 0 ? stream_piece_tokens(p, o) : kept;
    opencl::BackwardStream::Config config;
    config.B = p.B;
    config.NH = p.NH;
    config.DHQK = p.DHQK;
    config.DHHV = p.DHHV;
    config.max_piece = piece;
    config.dtype = p.dtype;
    config.options = o;
    config.emulate = emulate_;
    config.max_segments = max_segments;
    std::unique_ptr<opencl::BackwardStream> stream;
    {
      std::lock_guard lock(parked_mutex_);
      stream = std::move(parked_backward_);
    }
    if (!stream || !same_backward_config(stream->config(), config)) {
      stream.reset();  // its pinned staging goes before the new one's is taken
      stream = std::make_unique<opencl::BackwardStream>(device_, config);
      device_->note_stream_opened(true);
    } else {
      device_->note_stream_opened(false);
    }
    BackwardResult r =
        kept == 0 ? stream->run_into(a, out) : stream->run_into(a, out, *a.checkpoints, a.checkpoints_from);
    std::lock_guard lock(parked_mutex_);
    parked_backward_ = std::move(stream);
    return r;
  }
  // Packed sequences on the tensor cores: where the stream takes them (streams_backward), every sequence in one run
  // of the parked BackwardStream (its pieces pipelined across the sequences, the state and its gradient reset at
  // their boundaries), the gradients written into `out` (downloaded straight there when `out` is this device's
  // page-locked memory); else one call of the packed kernels (with a forward's checkpoints: each sequence in turn).
  // A run keeps every piece's entering state on the device: the sequences go in groups whose pieces' states fit an
  // eighth of its memory (all of them at once unless the documents are many and the states large).
  BackwardResult packed_tensor_core_backward(const BackwardArgs& a, const MlstmOptions& o, const ProblemShape& p,
                                             const GradientViews& out) {
    if (!a.checkpoints && streams_backward(a, o, p, &out, /*any_length=*/true)) {
      // Whole sequences per run, as many as their pieces' entering states fit (a run cuts them into pieces of
      // several sequences each: about tokens / piece of them, plus one).
      const std::int64_t piece = stream_piece_tokens(p, o);
      const std::int64_t most = backward_run_pieces(p, device_->info().global_memory);
      BackwardResult states;
      for (std::int64_t j0 = 0; j0 < p.N;) {
        std::int64_t j1 = j0 + 1;  // past the group's last sequence (at least one)
        while (j1 < p.N &&
               (packed::range(a.inputs, j1).second - packed::range(a.inputs, j0).first) <= (most - 1) * piece)
          ++j1;
        std::vector<std::int64_t> offsets;
        const BackwardArgs group = packed::sequences(a, j0, j1, offsets);
        const GradientViews into = out.slice(packed::range(a.inputs, j0).first, packed::range(a.inputs, j1 - 1).second);
        BackwardResult r = tensor_core_backward(group, o, validate_backward(group, o), &into, /*packed_sequence=*/true,
                                                packed_piece_sequences(p));
        packed::put_rows({{&r.dc0, &states.dc0}, {&r.dn0, &states.dn0}, {&r.dm0, &states.dm0}}, j0, p.N);
        j0 = j1;
      }
      return states;
    }
    if (!a.checkpoints) {
      // One call of the packed kernels (tc_states.cl PACKED) for every sequence.
      BackwardResult r = tensor_cores_.backward(a, o);
      write_gradients(r, out);
      BackwardResult states;
      states.dc0 = std::move(r.dc0);
      states.dn0 = std::move(r.dn0);
      states.dm0 = std::move(r.dm0);
      return states;
    }
    return packed::backward_each_into(
        a, p, o, out, [this](const BackwardArgs& s, const MlstmOptions& so, const GradientViews& into) {
          return tensor_core_backward(s, so, validate_backward(s, so), &into, /*packed_sequence=*/true);
        });
  }
  static bool same_backward_config(const opencl::BackwardStream::Config& x, const opencl::BackwardStream::Config& y) {
    return x.B == y.B && x.NH == y.NH && x.DHQK == y.DHQK && x.DHHV == y.DHHV && x.max_piece == y.max_piece &&
           x.dtype == y.dtype && same_options(x.options, y.options) && x.emulate == y.emulate &&
           x.max_segments == y.max_segments;
  }
  static bool same_options(const MlstmOptions& x, const MlstmOptions& y) {
    return x.gate == y.gate && x.normalize == y.normalize && x.eps == y.eps && x.chunk_size == y.chunk_size;
  }

  // A stream for a streamed forward: the one parked by an earlier call when it has this configuration
  // (restarted at c0/n0/m0), else a new one. Setting a stream up (pinned staging, device buffers) costs tens of
  // milliseconds, about what a million tokens take to stream, so consecutive calls share one. A call that
  // failed parks nothing; concurrent calls each get their own.
  std::unique_ptr<opencl::DeviceStream> reuse_stream(const opencl::DeviceStream::Config& config, ConstTensorView c0,
                                                     ConstTensorView n0, ConstTensorView m0) {
    std::unique_ptr<opencl::DeviceStream> parked;
    {
      std::lock_guard lock(parked_mutex_);
      parked = std::move(parked_);
    }
    if (parked && same_stream_config(parked->config(), config)) {
      parked->restart(c0, n0, m0);
      return parked;
    }
    parked.reset();  // its pinned staging goes before the new one's is taken
    return std::make_unique<opencl::DeviceStream>(device_, config, c0, n0, m0);
  }
  // Keeps `stream` for the next streamed forward (the device keeps one: the latest).
  void park_stream(std::unique_ptr<opencl::DeviceStream> stream) {
    std::lock_guard lock(parked_mutex_);
    parked_ = std::move(stream);
  }
  static bool same_stream_config(const opencl::DeviceStream::Config& x, const opencl::DeviceStream::Config& y) {
    return x.B == y.B && x.NH == y.NH && x.DHQK == y.DHQK && x.DHHV == y.DHHV && x.max_piece == y.max_piece &&
           x.dtype == y.dtype && same_options(x.options, y.options) && x.emulate == y.emulate &&
           x.compute == y.compute && x.max_segments == y.max_segments && x.staging == y.staging;
  }
  // The sequences a piece of a packed stream holds at most: their initial and last states (one buffer of each, and
  // one per stream slot) within 64 MiB each, 64 at most.
  static std::int64_t packed_piece_sequences(const ProblemShape& p) {
    const std::size_t per = std::max<std::size_t>(1, state_bytes(p));
    return std::clamp<std::int64_t>(static_cast<std::int64_t>((std::size_t{64} << 20) / per), 1, 64);
  }

  // MLSTM_RESIDENT_INPUTS=off: every call uploads its inputs (for measuring what residency saves).
  static bool resident_inputs_off() {
    static const bool off = env::one_of("MLSTM_RESIDENT_INPUTS", {"on", "off"}) == "off";
    return off;
  }

  // Whether this problem runs on the tensor cores: the device has them, the problem fits them (supports() has
  // refused misfits when only they may run) and their programs build. Builds them on first use.
  // A packed row on the portable kernels runs one call per sequence where the packed kernels' walks (one per row,
  // sequence and 64 x 64 tile of the state) would be too few to fill the device (fewer than 4 a compute unit, the
  // bound under which ChunkwiseRunner splits one sequence: shards.cpp): a handful of long sequences, each of which
  // alone may then split inside the device. Otherwise (and for unpacked rows) false.
  bool portable_each(const ProblemShape& p) const {
    if (!p.packed()) return false;
    const std::int64_t tiles = ((p.DHQK + 63) / 64) * ((p.DHHV + 63) / 64);
    return 4 * p.N * p.NH * tiles <= static_cast<std::int64_t>(device_->info().compute_units);
  }
  bool uses_tensor_cores(const ProblemShape& p, const MlstmOptions& o) const {
    if (!support_.available) return false;
    const bool required = kernels_ == OpenCLKernels::tensor_cores;
    if (const std::string misfit = opencl::tensor_core_fit(p, o); !misfit.empty()) {
      if (required) throw InvalidArgument("q", "the tensor-core kernels cannot run this problem: " + misfit);
      spdlog::debug("mlstm-flow: {}: portable kernels: {}", device_->name(), misfit);
      return false;
    }
    if (!required && device_->known_fact(kTensorCoreBuildFailed)) return false;
    // Building (or finding) the programs is needed once per configuration; the resident problem fetches the
    // ones it uses itself.
    std::ostringstream key;
    key << dtype_name(p.dtype) << '/' << p.DHQK << '/' << p.DHHV << '/' << o.chunk_size << '/' << gate_name(o.gate)
        << '/' << o.normalize << '/' << o.eps;
    {
      std::lock_guard lock(prepared_mutex_);
      if (prepared_.count(key.str())) return true;
    }
    try {
      tensor_cores_.prepare(p, o);
      std::lock_guard lock(prepared_mutex_);
      prepared_.insert(key.str());
    } catch (const DeviceError& e) {
      if (e.kind() != DeviceError::Kind::build || required) throw;
      device_->set_fact(kTensorCoreBuildFailed, 1);
      spdlog::warn("mlstm-flow: {}: the tensor-core kernels did not build; using the portable kernels. {}",
                   device_->name(), e.what());
      return false;
    }
    return true;
  }

  std::shared_ptr<opencl::Device> device_;
  opencl::ChunkwiseRunner portable_;
  opencl::TensorCoreRunner tensor_cores_;
  OpenCLKernels kernels_;
  opencl::TensorCoreSupport support_;
  bool emulate_ = false;  // OpenCLKernels::emulated_tensor_cores
  mutable std::mutex prepared_mutex_;
  mutable std::set<std::string> prepared_;  // configurations whose tensor-core programs are built
  std::mutex parked_mutex_;
  std::unique_ptr<opencl::DeviceStream> parked_;             // the last streamed forward's stream (reuse_stream)
  std::unique_ptr<opencl::BackwardStream> parked_backward_;  // the last streamed backward's stream
};

}  // namespace

std::shared_ptr<ComputeDevice> opencl_device(const opencl::DeviceInfo& info, OpenCLKernels kernels) {
  return std::make_shared<OpenCLComputeDevice>(opencl::open_device(info), kernels);
}

std::vector<std::shared_ptr<ComputeDevice>> opencl_devices(const std::string& spec, OpenCLKernels kernels) {
  std::vector<std::shared_ptr<ComputeDevice>> out;
  for (const auto& info : opencl::select_devices(spec)) out.push_back(opencl_device(info, kernels));
  return out;
}

}  // namespace mlstm
