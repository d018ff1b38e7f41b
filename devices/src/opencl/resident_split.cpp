#include "mlstm/devices/opencl/resident_split.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <functional>
#include <numeric>
#include <sstream>
#include <thread>

#include <spdlog/spdlog.h>

#include "mlstm/core/env.hpp"
#include "mlstm/core/error.hpp"
#include "mlstm/devices/opencl/chunkwise_routine.hpp"
#include "mlstm/devices/opencl/launch_params.hpp"
#include "mlstm/devices/opencl/tc_routine.hpp"
#include "mlstm/gates.hpp"
#include "mlstm/stages.hpp"

namespace mlstm::opencl {

namespace {

// `view`, or a contiguous copy held in `keep` when its (B, NH) rows do not merge into one dimension (head_rows).
ConstTensorView mergeable(ConstTensorView view, std::vector<Tensor>& keep) {
  if (heads_merge(view)) return view;
  keep.push_back(Tensor::copy_of(view));
  return keep.back().view();
}

// `total` units (chunks or rows) in shares by `weights` (largest remainders; ties to the first device). Returns the
// count per device; 0: no part.
std::vector<std::int64_t> shares(std::int64_t total, const std::vector<double>& weights) {
  const double sum = std::accumulate(weights.begin(), weights.end(), 0.0);
  std::vector<std::int64_t> n(weights.size(), 0);
  std::vector<std::pair<double, std::size_t>> rest;
  std::int64_t given = 0;
  for (std::size_t d = 0; d < weights.size(); ++d) {
    const double exact = static_cast<double>(total) * weights[d] / sum;
    n[d] = static_cast<std::int64_t>(std::floor(exact));
    given += n[d];
    rest.emplace_back(-(exact - static_cast<double>(n[d])), d);
  }
  std::sort(rest.begin(), rest.end());
  for (std::size_t j = 0; given < total && j < rest.size(); ++j, ++given) ++n[rest[j].second];
  return n;
}

// Whether a part on `dev` runs on the tensor cores (`shape`: the whole problem's; an automatic chunk size fits them).
bool part_uses_tensor_cores(const Device& dev, const ProblemShape& shape, const MlstmOptions& o,
                            ResidentSplit::Kernels kernels) {
  return kernels == ResidentSplit::Kernels::emulated_tensor_cores ||
         (kernels == ResidentSplit::Kernels::automatic && tensor_core_support(dev.info()).available &&
          tensor_core_fit(shape, o).empty());
}

// The device's resident problem for one part, on the tensor cores where they take it.
// `shape`: the whole problem's (what tensor_core_fit reads, dtype and head dims, is every part's).
std::unique_ptr<ResidentChunkwise> make_part(const std::shared_ptr<Device>& dev, const ProblemShape& shape,
                                             const ForwardArgs& a, const MlstmOptions& o, const BackwardArgs* grads,
                                             const ResidentSplit::Options& so, bool segment, std::string& kernels) {
  const bool tc = part_uses_tensor_cores(*dev, shape, o, so.kernels);
  std::unique_ptr<ResidentChunkwise> r;
  if (tc) {
    TensorCoreRunner::Config c;
    c.emulate = so.kernels == ResidentSplit::Kernels::emulated_tensor_cores;
    c.shards = so.shards;
    c.segment = segment;
    r = TensorCoreRunner(dev, c).resident(a, o, grads);
    kernels = c.emulate ? "tensor cores (emulated)" : "tensor cores";
  } else {
    ChunkwiseRunner::Config c;
    c.shards = so.shards;
    c.segment = segment;
    r = ChunkwiseRunner(dev, c).resident(a, o, grads);
    kernels = "portable";
  }
  if (r->shards() > 1) kernels += ", " + std::to_string(r->shards()) + " shards";
  return r;
}

}  // namespace

ResidentSplit::ResidentSplit(std::vector<std::shared_ptr<Device>> devices, const ForwardArgs& args,
                             const MlstmOptions& options, const BackwardArgs* grads, Options split_options)
    : devices_(std::move(devices)), options_(options), split_options_(std::move(split_options)) {
  shape_ = grads ? validate_backward(*grads, options) : validate_forward(args, options);
  // An automatic chunk size: one for all parts, the run's choice over the devices (run_choice, as mlstm::with_chunk).
  if (options_.chunk_size == kAutoChunk && !devices_.empty()) {
    std::vector<ChunkChoice> choices;
    for (const auto& d : devices_)
      choices.push_back(
          chunk_choice(d->info(), shape_, part_uses_tensor_cores(*d, shape_, options_, split_options_.kernels)));
    options_.chunk_size = run_choice(choices).chunk;
  }
  if (shape_.packed()) throw InvalidArgument("cu_seqlens", "a split across devices takes one sequence per row");
  if (devices_.empty()) throw InvalidArgument("devices", "a split across devices needs at least one device");
  std::vector<double> weights = split_options_.weights;
  if (weights.empty()) weights.assign(devices_.size(), 1.0);
  if (weights.size() != devices_.size())
    throw InvalidArgument("weights", "one weight per device (" + std::to_string(devices_.size()) + "), got " +
                                         std::to_string(weights.size()));
  for (double w : weights)
    if (!(w >= 0.0) || !std::isfinite(w)) throw InvalidArgument("weights", "must be finite and >= 0");
  if (std::accumulate(weights.begin(), weights.end(), 0.0) <= 0.0)
    throw InvalidArgument("weights", "at least one must be positive");
  weights_ = std::move(weights);
  alive_.assign(devices_.size(), true);
  args_ = args;
  has_init_ = args.has_initial_state();
  has_grads_ = grads != nullptr;
  if (grads) grads_ = *grads;
  const bool by_sequence = split_options_.split == Split::sequence;
  // The head split's parts are rows of the merged (B, NH) dimensions (head_rows): a contiguous copy of an input
  // whose strides do not allow that, made once.
  if (!by_sequence) {
    for (ConstTensorView* v : {&args_.q, &args_.k, &args_.v, &args_.i, &args_.f, &args_.c0, &args_.n0, &args_.m0})
      *v = mergeable(*v, keep_);
    if (grads) {
      grads_.inputs = args_;
      for (ConstTensorView* v : {&grads_.dh, &grads_.dc_last, &grads_.dn_last}) *v = mergeable(*v, keep_);
    }
  }
  // The ends of the chains, as float32 (the kernels' precision): the state entering the first part, the gradient
  // leaving the last one.
  const std::size_t rows = static_cast<std::size_t>(shape_.rows()), K = static_cast<std::size_t>(shape_.DHQK);
  const std::size_t KV = K * static_cast<std::size_t>(shape_.DHHV);
  auto f32 = [](ConstTensorView v, std::size_t count) {
    std::vector<float> out(count, 0.0f);
    if (!v.empty()) copy_elements(v, 0, v.numel(), DType::f32, reinterpret_cast<std::byte*>(out.data()));
    return out;
  };
  if (by_sequence) {
    initial_c_ = f32(args.c0, rows * KV);
    initial_n_ = f32(args.n0, rows * K);
    initial_m_ = f32(args.m0, rows);
    if (grads) {
      final_dc_ = f32(grads->dc_last, rows * KV);
      final_dn_ = f32(grads->dn_last, rows * K);
    }
  }
  build();
}

void ResidentSplit::build() {
  const bool by_sequence = split_options_.split == Split::sequence;
  for (const auto& r : resident_)  // a failed attempt's survivors: let their queues drain before their buffers go
    if (r) clFinish(r->device().profiling_queue());
  resident_.clear();
  parts_.clear();
  // The parts over the devices still in: whole chunks of the sequence (the last takes the rest), or rows.
  std::vector<double> weights = weights_;
  for (std::size_t d = 0; d < weights.size(); ++d)
    if (!alive_[d]) weights[d] = 0.0;
  if (std::accumulate(weights.begin(), weights.end(), 0.0) <= 0.0)
    throw DeviceError(DeviceError::Kind::lost, "split", "no device of the split is left (lost: " + lost_text() + ")");
  const std::int64_t L = chunk_of(options_);
  const std::int64_t units = by_sequence ? (shape_.S + L - 1) / L : shape_.rows();
  const std::vector<std::int64_t> n = shares(units, weights);
  std::int64_t at = 0;
  for (std::size_t d = 0; d < n.size(); ++d) {
    if (n[d] <= 0) continue;
    Part p;
    p.device = d;
    p.first = by_sequence ? at * L : at;
    at += n[d];
    p.count = by_sequence ? std::min(at * L, shape_.S) - p.first : n[d];
    parts_.push_back(p);
  }

  // Every part's arguments: views into the caller's memory.
  std::vector<ForwardArgs> fa(parts_.size());
  std::vector<BackwardArgs> ba(parts_.size());
  for (std::size_t j = 0; j < parts_.size(); ++j) {
    const Part& p = parts_[j];
    const std::int64_t end = p.first + p.count;
    ForwardArgs& f = fa[j];
    BackwardArgs& b = ba[j];
    if (by_sequence) {
      // Tokens of every row; the initial state enters the first part (the others' are set by the chain), the
      // last-state gradients leave the last one.
      f = sequence_slice(args_, p.first, end);
      if (j == 0) {
        f.c0 = args_.c0;
        f.n0 = args_.n0;
        f.m0 = args_.m0;
      }
      if (has_grads_) {
        b.dh = sequence_slice(grads_.dh, p.first, end);
        if (j + 1 == parts_.size()) {
          b.dc_last = grads_.dc_last;
          b.dn_last = grads_.dn_last;
        }
      }
    } else {
      for (const auto& [to, from] : {std::pair{&f.q, args_.q},
                                     {&f.k, args_.k},
                                     {&f.v, args_.v},
                                     {&f.i, args_.i},
                                     {&f.f, args_.f},
                                     {&f.c0, args_.c0},
                                     {&f.n0, args_.n0},
                                     {&f.m0, args_.m0},
                                     {&b.dh, grads_.dh},
                                     {&b.dc_last, grads_.dc_last},
                                     {&b.dn_last, grads_.dn_last}})
        *to = head_rows(from, p.first, end);
    }
    b.inputs = f;
  }

  // Upload every part, the devices in parallel (each its own link and program builds).
  resident_.resize(parts_.size());
  std::vector<std::exception_ptr> failed(parts_.size());
  std::vector<std::thread> threads;
  for (std::size_t j = 0; j < parts_.size(); ++j) {
    threads.emplace_back([&, j] {
      try {
        MlstmOptions o = options_;
        // Only the last part's last state is the sequence's.
        o.return_last_states = options_.return_last_states && (!by_sequence || j + 1 == parts_.size());
        resident_[j] = make_part(devices_[parts_[j].device], shape_, fa[j], o, has_grads_ ? &ba[j] : nullptr,
                                 split_options_, by_sequence && parts_.size() > 1, parts_[j].kernels);
      } catch (...) {
        failed[j] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& e : failed)
    if (e) std::rethrow_exception(e);
  const std::size_t P = parts_.size();
  enter_c_.assign(P, {});
  enter_n_.assign(P, {});
  enter_m_.assign(P, {});
  leave_dc_.assign(P, {});
  leave_dn_.assign(P, {});
  enter_c_[0] = initial_c_;
  enter_n_[0] = initial_n_;
  enter_m_[0] = initial_m_;
  leave_dc_.back() = final_dc_;
  leave_dn_.back() = final_dn_;
  forward_done_ = backward_done_ = false;
}

std::string ResidentSplit::lost_text() const {
  std::string out;
  for (std::size_t d = 0; d < devices_.size(); ++d)
    if (!alive_[d]) out += (out.empty() ? "" : ", ") + devices_[d]->name() + " [" + std::to_string(d) + "]";
  return out.empty() ? "none" : out;
}

std::vector<std::size_t> ResidentSplit::lost() const {
  std::vector<std::size_t> out;
  for (std::size_t d = 0; d < devices_.size(); ++d)
    if (!alive_[d]) out.push_back(d);
  return out;
}

void ResidentSplit::on_part(std::size_t j, const std::function<void()>& fn) {
  try {
    if (const auto v = env::index("MLSTM_SPLIT_FAULT", "a device index");
        v && *v == static_cast<std::int64_t>(parts_[j].device))
      throw DeviceError(DeviceError::Kind::lost, devices_[parts_[j].device]->name(),
                        "injected fault (MLSTM_SPLIT_FAULT=" + std::to_string(*v) + ")");
    fn();
  } catch (const DeviceError&) {
    failed_part_ = static_cast<int>(j);
    throw;
  }
}

void ResidentSplit::recovering(const std::function<void()>& replay, const std::function<void()>& attempt) {
  bool rebuilt = false;
  for (;;) {
    failed_part_ = -1;
    try {
      if (rebuilt) replay();
      attempt();
      return;
    } catch (const DeviceError& e) {
      if (failed_part_ < 0 || e.kind() == DeviceError::Kind::build) throw;  // not a device of a part: the caller's
      const std::size_t d = parts_[static_cast<std::size_t>(failed_part_)].device;
      alive_[d] = false;
      spdlog::warn("mlstm-flow: resident split: {} [{}] failed ({}); its part goes to the other devices",
                   devices_[d]->name(), d, e.what());
      build();  // throws when no device is left
      rebuilt = true;
    }
  }
}

ResidentSplit::~ResidentSplit() {
  // The parts' queues may still read enter_*/leave_* (non-blocking writes) after an exception: let them finish.
  for (const auto& r : resident_)
    if (r) clFinish(r->device().profiling_queue());
}

std::string ResidentSplit::describe() const {
  std::ostringstream out;
  const bool by_sequence = split_options_.split == Split::sequence;
  for (const Part& p : parts_)
    out << devices_[p.device]->name() << ": " << (by_sequence ? "tokens " : "rows ") << p.first << "-"
        << p.first + p.count << " (" << p.kernels << ")\n";
  return out.str();
}

void ResidentSplit::flush(std::size_t part) {
  on_part(part, [&] {
    const Device& dev = resident_[part]->device();
    check(clFlush(dev.profiling_queue()), "clFlush", dev.name());
  });
}

void ResidentSplit::wait_all() {
  for (std::size_t j = 0; j < resident_.size(); ++j)
    on_part(j, [&] {
      const Device& dev = resident_[j]->device();
      check(clFinish(dev.profiling_queue()), "clFinish", dev.name());
    });
}

void ResidentSplit::forward() {
  recovering([] {}, [&] { run_forward(); });
}

void ResidentSplit::backward() {
  if (!has_grads_) throw Error("ResidentSplit: made without gradients (dh): no backward");
  if (!forward_done_) throw Error("ResidentSplit: run forward() before backward()");
  // After a device failed, the parts rebuilt on the others run the forward again first.
  recovering([&] { run_forward(); }, [&] { run_backward(); });
}

void ResidentSplit::run_apart(void (ResidentChunkwise::*pass)(std::vector<KernelEvent>*)) {
  for (std::size_t j = 0; j < parts_.size(); ++j) {
    on_part(j, [&] { (resident_[j].get()->*pass)(nullptr); });
    flush(j);
  }
  wait_all();
}

void ResidentSplit::run_forward() {
  const std::size_t P = parts_.size();
  forward_done_ = backward_done_ = false;
  if (split_options_.split == Split::heads || P == 1) {
    run_apart(&ResidentChunkwise::enqueue_forward);
    forward_done_ = true;
    return;
  }
  // Every summary the chain needs (and the last part's where its own forward reuses it); part 0's forward at once.
  for (std::size_t j = 0; j < P; ++j)
    on_part(j, [&] {
      if (j + 1 < P || resident_[j]->shards() > 1) resident_[j]->enqueue_summary();
      if (j == 0) resident_[j]->enqueue_forward();
    });
  for (std::size_t j = 0; j < P; ++j) flush(j);

  // The chain (stages::combine, as shard_fw_combine does it): the state entering part j + 1 is
  // combine(the state entering part j, part j's summary), written to its device, whose forward then starts.
  const std::size_t rows = static_cast<std::size_t>(shape_.rows()), K = static_cast<std::size_t>(shape_.DHQK);
  const std::size_t KV = K * static_cast<std::size_t>(shape_.DHHV);
  for (std::size_t j = 0; j + 1 < P; ++j) {
    const SegmentSummary* summary = nullptr;
    on_part(j, [&] { summary = &resident_[j]->read_summary(); });
    const SegmentSummary& s = *summary;
    std::vector<float>&c = enter_c_[j + 1], &n = enter_n_[j + 1], &m = enter_m_[j + 1];
    c.resize(rows * KV);
    n.resize(rows * K);
    m.resize(rows);
    for (std::size_t r = 0; r < rows; ++r)
      stages::combine(stages::ConstStateRef(&enter_c_[j][r * KV], &enter_n_[j][r * K], &enter_m_[j][r]), s.G[r],
                      stages::ConstStateRef(&s.c[r * KV], &s.n[r * K], &s.m[r]), options_.gate, shape_.DHQK,
                      shape_.DHHV, stages::StateRef{&c[r * KV], &n[r * K], &m[r]});
    on_part(j + 1, [&] {
      resident_[j + 1]->set_entering_state(c.data(), n.data(), m.data());
      resident_[j + 1]->enqueue_forward();
    });
    flush(j + 1);
  }
  wait_all();
  forward_done_ = true;
}

void ResidentSplit::run_backward() {
  const std::size_t P = parts_.size();
  backward_done_ = false;
  if (split_options_.split == Split::heads || P == 1) {
    run_apart(&ResidentChunkwise::enqueue_backward);
    backward_done_ = true;
    return;
  }
  // The mirror image: every gradient summary the reverse chain needs, the last part's backward at once.
  for (std::size_t j = 0; j < P; ++j)
    on_part(j, [&] {
      if (j > 0 || resident_[j]->shards() > 1) resident_[j]->enqueue_gradient_summary();
      if (j + 1 == P) resident_[j]->enqueue_backward();
    });
  for (std::size_t j = 0; j < P; ++j) flush(j);

  // The gradient leaving part j - 1 is the one entering part j: its local gradient summary plus the gradient leaving
  // it times its decay exp(G + m_entering - m_leaving) (the backward holds the stabilisers constant; shard_bw_combine).
  const std::size_t rows = static_cast<std::size_t>(shape_.rows()), K = static_cast<std::size_t>(shape_.DHQK);
  const std::size_t KV = K * static_cast<std::size_t>(shape_.DHHV);
  const bool exp_gate = options_.gate == GateVariant::exp;
  for (std::size_t j = P - 1; j > 0; --j) {
    const GradientSummary* summary = nullptr;
    on_part(j, [&] { summary = &resident_[j]->read_gradient_summary(); });
    const GradientSummary& g = *summary;
    std::vector<float>&dc = leave_dc_[j - 1], &dn = leave_dn_[j - 1];
    dc.resize(rows * KV);
    dn.resize(rows * K);
    for (std::size_t r = 0; r < rows; ++r) {
      float a = std::exp(g.G[r]);
      if (exp_gate) {
        const float m_in = enter_m_[j][r];
        a = m_in == -INFINITY ? 0.0f : gates::safe_exp((m_in - g.m_last[r]) + g.G[r]);
      }
      for (std::size_t e = 0; e < KV; ++e) dc[r * KV + e] = g.dc[r * KV + e] + a * leave_dc_[j][r * KV + e];
      for (std::size_t e = 0; e < K; ++e) dn[r * K + e] = g.dn[r * K + e] + a * leave_dn_[j][r * K + e];
    }
    on_part(j - 1, [&] {
      resident_[j - 1]->set_leaving_gradient(dc.data(), dn.data());
      resident_[j - 1]->enqueue_backward();
    });
    flush(j - 1);
  }
  wait_all();
  backward_done_ = true;
}

namespace {

// Puts a part's result (the part's shape: its tokens of every row, or its rows) into `out` (the whole problem's).
void place(Tensor& out, const Tensor& part, std::int64_t rows, std::int64_t S, bool by_sequence,
           const ResidentSplit::Part& p) {
  const std::size_t es = dtype_size(out.dtype());
  if (by_sequence) {
    const std::size_t per_token = static_cast<std::size_t>(out.numel() / (rows * S)) * es;
    const std::size_t part_row = static_cast<std::size_t>(p.count) * per_token;
    copy_rows(out.bytes() + static_cast<std::size_t>(p.first) * per_token, static_cast<std::size_t>(S) * per_token,
              part.bytes(), part_row, static_cast<std::size_t>(rows), part_row);
  } else {
    const std::size_t per_row = static_cast<std::size_t>(out.numel() / rows) * es;
    copy_rows(out.bytes() + static_cast<std::size_t>(p.first) * per_row, 0, part.bytes(), 0, 1,
              static_cast<std::size_t>(p.count) * per_row);
  }
}

// The member `field` of every part's result.
template <class Result>
std::vector<Tensor*> fields(std::vector<Result>& results, Tensor Result::*field) {
  std::vector<Tensor*> out;
  for (auto& r : results) out.push_back(&(r.*field));
  return out;
}

// `out` = the parts' tensors placed (allocated on the first part's dtype with `shape`); stays empty when they are.
void gather(Tensor& out, std::vector<Tensor*> parts, const Shape& shape, std::int64_t rows, std::int64_t S,
            bool by_sequence, const std::vector<ResidentSplit::Part>& p) {
  if (parts.empty() || parts[0]->empty()) return;
  out = Tensor(shape, parts[0]->dtype());
  for (std::size_t j = 0; j < parts.size(); ++j) place(out, *parts[j], rows, S, by_sequence, p[j]);
}

}  // namespace

ForwardResult ResidentSplit::read_forward() {
  if (!forward_done_) throw Error("ResidentSplit: run forward() before read_forward()");
  const bool by_sequence = split_options_.split == Split::sequence;
  std::vector<ForwardResult> r;
  recovering([&] { run_forward(); },
             [&] {
               r.clear();
               for (std::size_t j = 0; j < resident_.size(); ++j)
                 on_part(j, [&] { r.push_back(resident_[j]->read_forward()); });
             });
  const ProblemShape& p = shape_;
  ForwardResult out;
  auto all = [&](auto field) { return fields(r, field); };
  gather(out.h, all(&ForwardResult::h), {p.B, p.NH, p.S, p.DHHV}, p.rows(), p.S, by_sequence, parts_);
  if (by_sequence) {  // the last part's last state is the sequence's
    out.c = std::move(r.back().c);
    out.n = std::move(r.back().n);
    out.m = std::move(r.back().m);
  } else {
    gather(out.c, all(&ForwardResult::c), {p.B, p.NH, p.DHQK, p.DHHV}, p.rows(), 1, false, parts_);
    gather(out.n, all(&ForwardResult::n), {p.B, p.NH, p.DHQK}, p.rows(), 1, false, parts_);
    gather(out.m, all(&ForwardResult::m), {p.B, p.NH}, p.rows(), 1, false, parts_);
  }
  return out;
}

BackwardResult ResidentSplit::read_backward() {
  if (!has_grads_) throw Error("ResidentSplit: made without gradients (dh): no backward");
  if (!backward_done_) throw Error("ResidentSplit: run backward() before read_backward()");
  const bool by_sequence = split_options_.split == Split::sequence;
  std::vector<BackwardResult> r;
  recovering(
      [&] {
        run_forward();
        run_backward();
      },
      [&] {
        r.clear();
        for (std::size_t j = 0; j < resident_.size(); ++j)
          on_part(j, [&] { r.push_back(resident_[j]->read_backward()); });
      });
  const ProblemShape& p = shape_;
  BackwardResult out;
  auto all = [&](auto field) { return fields(r, field); };
  gather(out.dq, all(&BackwardResult::dq), {p.B, p.NH, p.S, p.DHQK}, p.rows(), p.S, by_sequence, parts_);
  gather(out.dk, all(&BackwardResult::dk), {p.B, p.NH, p.S, p.DHQK}, p.rows(), p.S, by_sequence, parts_);
  gather(out.dv, all(&BackwardResult::dv), {p.B, p.NH, p.S, p.DHHV}, p.rows(), p.S, by_sequence, parts_);
  gather(out.di, all(&BackwardResult::di), {p.B, p.NH, p.S}, p.rows(), p.S, by_sequence, parts_);
  gather(out.df, all(&BackwardResult::df), {p.B, p.NH, p.S}, p.rows(), p.S, by_sequence, parts_);
  if (!has_init_) return out;
  if (by_sequence) {  // the first part's gradient of its entering state is the initial state's
    out.dc0 = std::move(r.front().dc0);
    out.dn0 = std::move(r.front().dn0);
    out.dm0 = std::move(r.front().dm0);
  } else {
    gather(out.dc0, all(&BackwardResult::dc0), {p.B, p.NH, p.DHQK, p.DHHV}, p.rows(), 1, false, parts_);
    gather(out.dn0, all(&BackwardResult::dn0), {p.B, p.NH, p.DHQK}, p.rows(), 1, false, parts_);
    gather(out.dm0, all(&BackwardResult::dm0), {p.B, p.NH}, p.rows(), 1, false, parts_);
  }
  return out;
}

}  // namespace mlstm::opencl
