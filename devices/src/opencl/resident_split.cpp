#include "mlstm/devices/opencl/resident_split.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <numeric>
#include <sstream>
#include <thread>

#include "mlstm/core/error.hpp"
#include "mlstm/devices/opencl/chunkwise_routine.hpp"
#include "mlstm/devices/opencl/tc_routine.hpp"

namespace mlstm::opencl {

namespace {

// `count` elements of dimension `dim` of `view` from `first` on (a view into the same memory).
ConstTensorView narrow(ConstTensorView view, int dim, std::int64_t first, std::int64_t count) {
  if (view.empty()) return view;
  Shape shape = view.shape();
  shape[static_cast<std::size_t>(dim)] = count;
  const std::int64_t offset = first * view.strides()[static_cast<std::size_t>(dim)];
  return ConstTensorView(view.bytes() + offset * static_cast<std::int64_t>(dtype_size(view.dtype())), view.dtype(),
                         std::move(shape), view.strides());
}

// (B, NH, ...) as (1, B*NH, ...) when the two dimensions merge (B's stride is NH times NH's), else a contiguous copy
// held in `keep`.
ConstTensorView rows_view(ConstTensorView view, std::vector<Tensor>& keep) {
  if (view.empty()) return view;
  if (view.strides()[0] != view.shape()[1] * view.strides()[1]) {
    keep.push_back(Tensor::copy_of(view));
    view = keep.back().view();
  }
  Shape shape = view.shape(), strides = view.strides();
  shape[1] *= shape[0];
  shape[0] = 1;
  strides[0] = shape[1] * strides[1];
  return ConstTensorView(view.bytes(), view.dtype(), std::move(shape), std::move(strides));
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

float safe_exp(float x) { return std::isnan(x) ? 0.0f : std::exp(x); }

// The device's resident problem for one part, on the tensor cores where they take it.
std::unique_ptr<ResidentChunkwise> make_part(const std::shared_ptr<Device>& dev, const ForwardArgs& a,
                                             const MlstmOptions& o, const BackwardArgs* grads,
                                             const ResidentSplit::Options& so, bool segment, std::string& kernels) {
  const ProblemShape shape = grads ? validate_backward(*grads, o) : validate_forward(a, o);
  const bool tc = so.kernels == ResidentSplit::Kernels::emulated_tensor_cores ||
                  (so.kernels == ResidentSplit::Kernels::automatic && tensor_core_support(dev->info()).available &&
                   tensor_core_fit(shape, o).empty());
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
  has_init_ = args.has_initial_state();
  has_grads_ = grads != nullptr;
  const bool by_sequence = split_options_.split == Split::sequence;

  // The parts: whole chunks of the sequence (the last takes the rest), or rows.
  const std::int64_t L = options.chunk_size;
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

  // Every part's arguments: views into the caller's memory (rows merged into one dimension for the head split).
  std::vector<Tensor> keep;
  std::vector<ForwardArgs> fa(parts_.size());
  std::vector<BackwardArgs> ba(parts_.size());
  const ConstTensorView dh = grads ? grads->dh : ConstTensorView{};
  for (std::size_t j = 0; j < parts_.size(); ++j) {
    const Part& p = parts_[j];
    ForwardArgs& f = fa[j];
    BackwardArgs& b = ba[j];
    if (by_sequence) {
      f.q = narrow(args.q, 2, p.first, p.count);
      f.k = narrow(args.k, 2, p.first, p.count);
      f.v = narrow(args.v, 2, p.first, p.count);
      f.i = narrow(args.i, 2, p.first, p.count);
      f.f = narrow(args.f, 2, p.first, p.count);
      if (j == 0) {
        f.c0 = args.c0;
        f.n0 = args.n0;
        f.m0 = args.m0;
      }
      if (grads) {
        b.dh = narrow(dh, 2, p.first, p.count);
        if (j + 1 == parts_.size()) {
          b.dc_last = grads->dc_last;
          b.dn_last = grads->dn_last;
        }
      }
    } else {
      auto rows = [&](ConstTensorView v) { return narrow(rows_view(v, keep), 1, p.first, p.count); };
      f.q = rows(args.q);
      f.k = rows(args.k);
      f.v = rows(args.v);
      f.i = rows(args.i);
      f.f = rows(args.f);
      f.c0 = rows(args.c0);
      f.n0 = rows(args.n0);
      f.m0 = rows(args.m0);
      if (grads) {
        b.dh = rows(dh);
        b.dc_last = rows(grads->dc_last);
        b.dn_last = rows(grads->dn_last);
      }
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
        resident_[j] = make_part(devices_[parts_[j].device], fa[j], o, grads ? &ba[j] : nullptr, split_options_,
                                 by_sequence && parts_.size() > 1, parts_[j].kernels);
      } catch (...) {
        failed[j] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& e : failed)
    if (e) std::rethrow_exception(e);
  enter_c_.resize(parts_.size());
  enter_n_.resize(parts_.size());
  enter_m_.resize(parts_.size());
  leave_dc_.resize(parts_.size());
  leave_dn_.resize(parts_.size());
  if (by_sequence && parts_.size() > 1) {
    // The ends of the chains, as float32 (the kernels' precision): the state entering part 0, the gradient leaving
    // the last part.
    const std::size_t rows = static_cast<std::size_t>(shape_.rows()), K = static_cast<std::size_t>(shape_.DHQK);
    const std::size_t KV = K * static_cast<std::size_t>(shape_.DHHV);
    auto f32 = [](ConstTensorView v, std::size_t count) {
      std::vector<float> out(count, 0.0f);
      if (!v.empty()) copy_elements(v, 0, v.numel(), DType::f32, reinterpret_cast<std::byte*>(out.data()));
      return out;
    };
    enter_c_[0] = f32(args.c0, rows * KV);
    enter_n_[0] = f32(args.n0, rows * K);
    enter_m_[0] = f32(args.m0, rows);
    if (grads) {
      leave_dc_.back() = f32(grads->dc_last, rows * KV);
      leave_dn_.back() = f32(grads->dn_last, rows * K);
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

void ResidentSplit::flush(std::size_t part) const {
  const Device& dev = resident_[part]->device();
  check(clFlush(dev.profiling_queue()), "clFlush", dev.name());
}

void ResidentSplit::wait_all() const {
  for (const auto& r : resident_) check(clFinish(r->device().profiling_queue()), "clFinish", r->device().name());
}

void ResidentSplit::forward() {
  const std::size_t P = parts_.size();
  if (split_options_.split == Split::heads || P == 1) {
    for (std::size_t j = 0; j < P; ++j) {
      resident_[j]->enqueue_forward();
      flush(j);
    }
    wait_all();
    forward_done_ = true;
    return;
  }
  // Every summary the chain needs (and the last part's where its own forward reuses it); part 0's forward at once.
  for (std::size_t j = 0; j < P; ++j)
    if (j + 1 < P || resident_[j]->shards() > 1) resident_[j]->enqueue_summary();
  resident_[0]->enqueue_forward();
  for (std::size_t j = 0; j < P; ++j) flush(j);

  // The chain (stages.hpp "Combine", as shard_fw_combine does it): the state entering part j + 1 is
  // combine(the state entering part j, part j's summary), written to its device, whose forward then starts.
  const std::size_t rows = static_cast<std::size_t>(shape_.rows()), K = static_cast<std::size_t>(shape_.DHQK);
  const std::size_t KV = K * static_cast<std::size_t>(shape_.DHHV);
  const bool exp_gate = options_.gate == GateVariant::exp;
  for (std::size_t j = 0; j + 1 < P; ++j) {
    const SegmentSummary& s = resident_[j]->read_summary();
    std::vector<float>&c = enter_c_[j + 1], &n = enter_n_[j + 1], &m = enter_m_[j + 1];
    c.resize(rows * KV);
    n.resize(rows * K);
    m.resize(rows);
    for (std::size_t r = 0; r < rows; ++r) {
      float a = std::exp(s.G[r]), b = 1.0f, m_out = 0.0f;
      if (exp_gate) {
        const float m_in = enter_m_[j][r];
        m_out = std::max(s.G[r] + m_in, s.m[r]);
        a = m_out == -INFINITY ? 0.0f : safe_exp(s.G[r] + m_in - m_out);
        b = m_out == -INFINITY ? 0.0f : safe_exp(s.m[r] - m_out);
      }
      for (std::size_t e = 0; e < KV; ++e) c[r * KV + e] = a * enter_c_[j][r * KV + e] + b * s.c[r * KV + e];
      for (std::size_t e = 0; e < K; ++e) n[r * K + e] = a * enter_n_[j][r * K + e] + b * s.n[r * K + e];
      m[r] = m_out;
    }
    resident_[j + 1]->set_entering_state(c.data(), n.data(), m.data());
    resident_[j + 1]->enqueue_forward();
    flush(j + 1);
  }
  wait_all();
  forward_done_ = true;
}

void ResidentSplit::backward() {
  if (!has_grads_) throw Error("ResidentSplit: made without gradients (dh): no backward");
  if (!forward_done_) throw Error("ResidentSplit: run forward() before backward()");
  const std::size_t P = parts_.size();
  if (split_options_.split == Split::heads || P == 1) {
    for (std::size_t j = 0; j < P; ++j) {
      resident_[j]->enqueue_backward();
      flush(j);
    }
    wait_all();
    return;
  }
  // The mirror image: every gradient summary the reverse chain needs, the last part's backward at once.
  for (std::size_t j = 0; j < P; ++j)
    if (j > 0 || resident_[j]->shards() > 1) resident_[j]->enqueue_gradient_summary();
  resident_[P - 1]->enqueue_backward();
  for (std::size_t j = 0; j < P; ++j) flush(j);

  // The gradient leaving part j - 1 is the one entering part j: its local gradient summary plus the gradient leaving
  // it times its decay exp(G + m_entering - m_leaving) (the backward holds the stabilisers constant; shard_bw_combine).
  const std::size_t rows = static_cast<std::size_t>(shape_.rows()), K = static_cast<std::size_t>(shape_.DHQK);
  const std::size_t KV = K * static_cast<std::size_t>(shape_.DHHV);
  const bool exp_gate = options_.gate == GateVariant::exp;
  for (std::size_t j = P - 1; j > 0; --j) {
    const GradientSummary& g = resident_[j]->read_gradient_summary();
    std::vector<float>&dc = leave_dc_[j - 1], &dn = leave_dn_[j - 1];
    dc.resize(rows * KV);
    dn.resize(rows * K);
    for (std::size_t r = 0; r < rows; ++r) {
      float a = std::exp(g.G[r]);
      if (exp_gate) {
        const float m_in = enter_m_[j][r];
        a = m_in == -INFINITY ? 0.0f : safe_exp(g.G[r] + m_in - g.m_last[r]);
      }
      for (std::size_t e = 0; e < KV; ++e) dc[r * KV + e] = g.dc[r * KV + e] + a * leave_dc_[j][r * KV + e];
      for (std::size_t e = 0; e < K; ++e) dn[r * K + e] = g.dn[r * K + e] + a * leave_dn_[j][r * K + e];
    }
    resident_[j - 1]->set_leaving_gradient(dc.data(), dn.data());
    resident_[j - 1]->enqueue_backward();
    flush(j - 1);
  }
  wait_all();
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
  for (auto& x : resident_) r.push_back(x->read_forward());
  const ProblemShape& p = shape_;
  ForwardResult out;
  auto all = [&](Tensor ForwardResult::*field) {
    std::vector<Tensor*> v;
    for (auto& x : r) v.push_back(&(x.*field));
    return v;
  };
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
  const bool by_sequence = split_options_.split == Split::sequence;
  std::vector<BackwardResult> r;
  for (auto& x : resident_) r.push_back(x->read_backward());
  const ProblemShape& p = shape_;
  BackwardResult out;
  auto all = [&](Tensor BackwardResult::*field) {
    std::vector<Tensor*> v;
    for (auto& x : r) v.push_back(&(x.*field));
    return v;
  };
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
