#include "mlstm/devices/opencl/tc_routine.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "internal.hpp"
#include "mlstm/core/env.hpp"
#include "shards.hpp"
#include "tc_program.hpp"

#ifndef MLSTM_OPENCL_TENSOR_CORES
#define MLSTM_OPENCL_TENSOR_CORES 1
#endif

namespace mlstm::opencl {

using detail::KernelObject;
using detail::set_args;
using detail::set_args_from;

using detail::make_config;
using detail::tc_source_text;
using detail::TcConfig;

namespace {

constexpr cl_device_info kComputeCapabilityMajorNV = 0x4000;  // cl_nv_device_attribute_query
constexpr cl_device_info kComputeCapabilityMinorNV = 0x4001;

bool switched_off_by_environment() {
  const auto v = env::one_of("MLSTM_TENSOR_CORES", {"on", "off", "1", "0", "true", "false", "yes", "no"});
  return v && (*v == "off" || *v == "0" || *v == "false" || *v == "no");
}

// One problem on one device with every buffer of the forward and the backward.
class ResidentTensorCore final : public ResidentChunkwise {
 public:
  ResidentTensorCore(std::shared_ptr<Device> device, const TensorCoreRunner::Config& config, const ForwardArgs& a,
                     const MlstmOptions& o, const BackwardArgs* grads)
      : device_(std::move(device)), options_(o) {
    const bool emulate = config.emulate;
    shape_ = grads ? validate_backward(*grads, o) : validate_forward(a, o);
    if (config.segment) check_not_packed(shape_, "a segment of a split sequence");
    Device& dev = *device_;
    const std::string& dn = dev.name();
    cfg_ = make_config(dev, emulate, shape_, o, !shape_.packed());
    rows_ = static_cast<int>(shape_.rows());
    S_ = static_cast<int>(shape_.S);
    // The fused forward (tc_fused.cl) where no backward needs the states entering the chunks.
    fused_ = grads == nullptr && cfg_.use_fused(shape_.rows(), shape_.DHHV, dev.info().compute_units);
    if (shape_.packed()) {
      // Chunks restart at every sequence start, and every sequence's states pass is a work-group of its own
      // (tc_common.cl CHUNK_START, tc_states.cl PACKED): no sequence split, the sequences are the parallel work.
      cfg_.base += " -DPACKED=1";
      tables_ =
          detail::packed_call_tables(a.cu_seqlens, cfg_.L, a.has_initial_state(), grads && !grads->dc_last.empty());
      NC_ = tables_.chunks;
      P_ = 1;
    } else {
      NC_ = (S_ + cfg_.L - 1) / cfg_.L;
      // The sequence split (shards.hpp) where the state kernels' rows x tiles work-groups leave the device idle.
      P_ = fused_ ? detail::sequence_shards(dev.info(), S_, cfg_.L, NC_, shape_.rows() * (shape_.DHHV / cfg_.VTf),
                                            config.shards, detail::SplitCost::fused)
                  : detail::sequence_shards(dev.info(), S_, cfg_.L, NC_,
                                            shape_.rows() * (shape_.DHQK / cfg_.KT) * (shape_.DHHV / cfg_.VT),
                                            config.shards);
      // A segment of a split sequence runs a summary pass for the exchange anyway: in two shards or more its own
      // forward reuses that pass (unless the caller or MLSTM_OPENCL_SHARDS chose the shards).
      if (config.segment && P_ == 1 && config.shards == 0 && !env::get("MLSTM_OPENCL_SHARDS"))
        P_ = detail::sequence_shards(dev.info(), S_, cfg_.L, NC_, 1, 2);
    }
    R_ = rows_ * P_;
    Ss_ = S_ / P_;
    NCs_ = NC_ / P_;
    // A segment of a split sequence always holds a state entering it and a gradient leaving it (resident.hpp).
    segment_ = config.segment;
    has_init_ = a.has_initial_state() || segment_ ? 1 : 0;
    has_grads_ = grads != nullptr;
    has_dlast_ = grads && (!grads->dc_last.empty() || segment_) ? 1 : 0;
    // The summary pass and the combines: for the split inside the device, and for a segment's summary.
    const bool summaries = P_ > 1 || segment_;

    cl_program gates = dev.program_from_text("tc_gates", tc_source_text("tc_gates"), cfg_.gates());
    // With the fused forward the states pass runs only for last_state() (skip_outputs), and keeps no states.
    cl_program fw_states = dev.program_from_text("tc_states", tc_source_text("tc_states"), cfg_.states(0, !fused_));
    const std::int64_t K = shape_.DHQK, V = shape_.DHHV;
    k_gates_ = KernelObject{dev.kernel(gates, "tc_fw_gates")};
    k_fw_states_ = KernelObject{dev.kernel(fw_states, "tc_fw_states")};
    if (fused_)
      k_fw_fused_ = KernelObject{
          dev.kernel(dev.program_from_text("tc_fused", tc_source_text("tc_fused"), cfg_.fused()), "tc_fw_fused")};
    else
      k_fw_outputs_ = KernelObject{dev.kernel(
          dev.program_from_text("tc_chunk", tc_source_text("tc_chunk"), cfg_.chunk(0, K, V, cfg_.OTf, cfg_.DSf)),
          "tc_fw_outputs")};
    if (summaries) {
      k_fw_combine_ = KernelObject{dev.kernel(gates, "shard_fw_combine")};
      k_fw_summary_ = KernelObject{dev.kernel(
          dev.program_from_text("tc_states", tc_source_text("tc_states"), cfg_.states(0, false)), "tc_fw_states")};
      if (has_grads_) {
        k_bw_combine_ = KernelObject{dev.kernel(gates, "shard_bw_combine")};
        k_bw_summary_ = KernelObject{
            dev.kernel(dev.program_from_text("tc_states", tc_source_text("tc_states"), cfg_.states(1, false)),
                       "tc_bw_state_grads")};
      }
    }
    if (has_grads_) {
      cl_program bw_states = dev.program_from_text("tc_states", tc_source_text("tc_states"), cfg_.states(1));
      k_bw_prep_ = KernelObject{dev.kernel(gates, "tc_bw_prep")};
      k_bw_gate_grads_ = KernelObject{dev.kernel(gates, "tc_bw_gate_grads")};
      k_bw_states_ = KernelObject{dev.kernel(bw_states, "tc_bw_state_grads")};
      k_bw_dq_ = KernelObject{dev.kernel(
          dev.program_from_text("tc_chunk", tc_source_text("tc_chunk"), cfg_.chunk(1, V, K, cfg_.OTq, cfg_.DSq)),
          "tc_bw_grads_dq")};
      k_bw_dk_ = KernelObject{dev.kernel(
          dev.program_from_text("tc_chunk", tc_source_text("tc_chunk"), cfg_.chunk(2, V, K, cfg_.OTq, cfg_.DSq)),
          "tc_bw_grads_dk")};
      k_bw_dv_ = KernelObject{dev.kernel(
          dev.program_from_text("tc_chunk", tc_source_text("tc_chunk"), cfg_.chunk(3, K, V, cfg_.OTf, cfg_.DSf)),
          "tc_bw_grads_dv")};
    }

    // Inputs: q, k, v in their 16-bit type, gates and states as float32.
    const std::size_t tok = static_cast<std::size_t>(rows_) * static_cast<std::size_t>(S_);
    const std::size_t kv = static_cast<std::size_t>(K) * static_cast<std::size_t>(V);
    auto up16 = [&](ConstTensorView t) { return detail::upload_as(dev, t, shape_.dtype); };
    auto up32 = [&](ConstTensorView t) { return detail::upload_as(dev, t, DType::f32); };
    auto f32buf = [&](std::size_t n) { return dev.acquire(std::max<std::size_t>(n, 4) * sizeof(float)); };
    auto zeros = [&](std::size_t n) {
      const std::vector<float> z(std::max<std::size_t>(n, 4), 0.f);
      return dev.acquire_upload(z.data(), z.size() * sizeof(float));
    };
    q_ = up16(a.q);
    k_ = up16(a.k);
    v_ = up16(a.v);
    i_ = up32(a.i);
    f_ = up32(a.f);
    if (a.has_initial_state()) {
      c0_ = up32(a.c0);
      n0_ = up32(a.n0);
      m0_ = up32(a.m0);
    } else if (segment_) {  // the zero state until set_entering_state
      c0_ = zeros(rows_ * kv);
      n0_ = zeros(static_cast<std::size_t>(rows_) * K);
      m0_ = zeros(static_cast<std::size_t>(rows_));
    } else {
      c0_ = f32buf(1);
      n0_ = f32buf(1);
      m0_ = f32buf(1);
    }
    gb_ = f32buf(tok);
    gbi_ = f32buf(tok);
    gpm_ = f32buf(tok);
    gcut_ = f32buf(tok);
    gG_ = f32buf(static_cast<std::size_t>(rows_) * NC_);
    gA_ = f32buf(static_cast<std::size_t>(rows_) * NC_);
    gK_ = f32buf(tok);
    gaw_ = f32buf(tok);
    gub_ = f32buf(tok);
    // Per-token and per-chunk arrays keep their layout with shards (row r, shard p is row r * P + p of S/P tokens);
    // mst has NC/P + 1 entries per shard, and packed NC + N per row (a slot leaving every sequence).
    mst_ = f32buf(static_cast<std::size_t>(R_) * static_cast<std::size_t>(m_slots()));
    Cst_ = dev.acquire(fused_ ? 4 : static_cast<std::size_t>(rows_) * NC_ * kv * 2);
    nst_ = f32buf(fused_ ? 1 : static_cast<std::size_t>(rows_) * NC_ * K);
    const std::size_t last_rows = static_cast<std::size_t>(shape_.state_batch() * shape_.NH);  // (N, NH) packed
    c_last_ = f32buf(last_rows * kv);
    n_last_ = f32buf(last_rows * static_cast<std::size_t>(K));
    m_last_ = f32buf(last_rows);
    if (shape_.packed()) {
      ctab_ = dev.acquire_upload(tables_.ctab.data(), tables_.ctab.size() * sizeof(int));
      stab_ = dev.acquire_upload(tables_.stab.data(), tables_.stab.size() * sizeof(int));
      stab_bw_ = dev.acquire_upload(tables_.stab_bw.data(), tables_.stab_bw.size() * sizeof(int));
    }
    h_ = dev.acquire(tok * V * 2);
    Nt_ = f32buf(tok);
    sgt_ = f32buf(tok);
    if (env::flag("MLSTM_TC_POISON")) {
      // Debugging aid: every intermediate and output buffer starts as NaN (0xFF bytes), so a read of a value
      // no kernel wrote shows up as NaN in the results.
      const std::uint8_t pattern = 0xff;
      for (const PooledBuffer* b : {&gb_, &gbi_, &gpm_, &gcut_, &gG_, &gA_, &gK_, &gaw_, &gub_, &mst_, &Cst_, &nst_,
                                    &c_last_, &n_last_, &m_last_, &h_, &Nt_, &sgt_})
        check(clEnqueueFillBuffer(dev.queue(), b->get(), &pattern, 1, 0, b->bytes(), 0, nullptr, nullptr),
              "clEnqueueFillBuffer", dn);
      check(clFinish(dev.queue()), "clFinish", dn);
    }
    with_tables(k_gates_,
                set_args(k_gates_.k, dn, i_, f_, gb_, gbi_, gpm_, gcut_, gK_, gaw_, gub_, gG_, gA_, Ss_, NCs_));
    if (summaries) {
      // The summary pass (and with shards the states pass) reads the shards' entering states from sh_.c_in (the
      // EMPTY state, then the combined ones) and writes the states leaving them to sh_.c_last.
      sh_.allocate_forward(dev, rows_, P_, K, V);
      for (const KernelObject* k : {&k_fw_summary_, &k_fw_states_}) {
        if (k == &k_fw_states_ && P_ == 1) continue;
        set_args(k->k, dn, k_, v_, gaw_, gK_, gG_, gA_, sh_.c_in, sh_.n_in, sh_.m_in, 1, Cst_, nst_, mst_, sh_.c_last,
                 sh_.n_last, sh_.m_last, Ss_, NCs_);
      }
    }
    if (P_ == 1) {
      const cl_uint next = set_args(k_fw_states_.k, dn, k_, v_, gaw_, gK_, gG_, gA_, c0_, n0_, m0_, has_init_, Cst_,
                                    nst_, mst_, c_last_, n_last_, m_last_, S_, NC_);
      if (shape_.packed()) set_args_from(k_fw_states_.k, dn, next, ctab_, stab_);
    }
    if (fused_ && P_ > 1)
      set_args(k_fw_fused_.k, dn, q_, k_, v_, gb_, gbi_, gpm_, gcut_, gK_, gaw_, gG_, gA_, sh_.c_in, sh_.n_in, sh_.m_in,
               1, h_, sh_.c_last, sh_.n_last, sh_.m_last, Ss_, NCs_);
    else if (fused_)
      set_args(k_fw_fused_.k, dn, q_, k_, v_, gb_, gbi_, gpm_, gcut_, gK_, gaw_, gG_, gA_, c0_, n0_, m0_, has_init_, h_,
               c_last_, n_last_, m_last_, S_, NC_);
    else
      with_tables(k_fw_outputs_, set_args(k_fw_outputs_.k, dn, q_, k_, v_, Cst_, nst_, mst_, gb_, gbi_, gpm_, gcut_,
                                          gK_, h_, Nt_, sgt_, Ss_, NCs_));
    if (has_grads_) {
      dh_ = up16(grads->dh);
      if (!grads->dc_last.empty()) {
        dc_last_ = up32(grads->dc_last);
        dn_last_ = up32(grads->dn_last);
      } else if (segment_) {  // zero until set_leaving_gradient
        dc_last_ = zeros(rows_ * kv);
        dn_last_ = zeros(static_cast<std::size_t>(rows_) * K);
      } else {
        dc_last_ = f32buf(1);
        dn_last_ = f32buf(1);
      }
      dden_ = f32buf(tok);
      dCst_ = dev.acquire(static_cast<std::size_t>(rows_) * NC_ * kv * 2);
      dnst_ = f32buf(static_cast<std::size_t>(rows_) * NC_ * K);
      dc0_ = f32buf(last_rows * kv);  // (N, NH, ...) packed
      dn0_ = f32buf(last_rows * static_cast<std::size_t>(K));
      dm0_ = f32buf(last_rows);
      dq_ = dev.acquire(tok * K * 2);
      dk_ = dev.acquire(tok * K * 2);
      dv_ = dev.acquire(tok * V * 2);
      const int nparts = static_cast<int>(K / cfg_.OTq);
      qdq_ = f32buf(static_cast<std::size_t>(nparts) * tok);
      kdk_ = f32buf(static_cast<std::size_t>(nparts) * tok);
      di_ = f32buf(tok);
      df_ = f32buf(tok);
      set_args(k_bw_prep_.k, dn, dh_, h_, Nt_, sgt_, dden_, Ss_);
      if (summaries) {
        // The summary pass (and with shards the gradient pass) reads the gradient leaving each shard from
        // sh_.dc_last (zero, then the combined ones) and writes the gradient entering it to sh_.dc0.
        sh_.allocate_backward();
        for (const KernelObject* k : {&k_bw_summary_, &k_bw_states_}) {
          if (k == &k_bw_states_ && P_ == 1) continue;
          set_args(k->k, dn, q_, dh_, gub_, gK_, gG_, mst_, Nt_, dden_, sh_.dc_last, sh_.dn_last, 1, dCst_, dnst_,
                   sh_.dc0, sh_.dn0, Ss_, NCs_);
        }
      }
      if (P_ == 1) {
        const cl_uint next = set_args(k_bw_states_.k, dn, q_, dh_, gub_, gK_, gG_, mst_, Nt_, dden_, dc_last_, dn_last_,
                                      has_dlast_, dCst_, dnst_, dc0_, dn0_, S_, NC_);
        if (shape_.packed()) set_args_from(k_bw_states_.k, dn, next, ctab_, stab_bw_);
      }
      with_tables(k_bw_dq_, set_args(k_bw_dq_.k, dn, dh_, v_, k_, Cst_, nst_, mst_, gb_, gbi_, gpm_, gcut_, gK_, Nt_,
                                     dden_, q_, dq_, qdq_, Ss_, NCs_));
      with_tables(k_bw_dk_, set_args(k_bw_dk_.k, dn, v_, dh_, q_, dCst_, dnst_, mst_, gb_, gbi_, gpm_, gcut_, gK_, Nt_,
                                     dden_, k_, dk_, kdk_, Ss_, NCs_));
      with_tables(k_bw_dv_,
                  set_args(k_bw_dv_.k, dn, k_, q_, dh_, dCst_, mst_, gb_, gbi_, gpm_, gcut_, gK_, Nt_, dv_, Ss_, NCs_));
      if (P_ == 1) {
        // Packed: per (row, sequence), its tokens and its rows of the states (the segment table's columns x, y, w).
        const cl_uint next = set_args(k_bw_gate_grads_.k, dn, i_, f_, qdq_, kdk_, nparts, dc_last_, dn_last_, c_last_,
                                      n_last_, has_dlast_, dc0_, dn0_, c0_, n0_, has_init_, di_, df_, dm0_, S_);
        if (shape_.packed()) set_args_from(k_bw_gate_grads_.k, dn, next, ctab_, stab_);
      } else {
        // Shard by shard, as a streamed backward does piece by piece: the reverse cumsum of the tokens after a shard
        // is <dC, C> + <dn, n> of the state leaving it (its gradient: the combined sh_.dc_last). The row's dm0 is its
        // first shard's (<dc0, c0> + <dn0, n0> against the row's initial state, which enters shard 0).
        set_args(k_bw_gate_grads_.k, dn, i_, f_, qdq_, kdk_, nparts, sh_.dc_last, sh_.dn_last, sh_.c_last, sh_.n_last,
                 1, sh_.dc0, sh_.dn0, sh_.c_in, sh_.n_in, has_init_, di_, df_, sh_.dm0, Ss_);
      }
    }
  }

  Device& device() const noexcept override { return *device_; }
  int shards() const noexcept override { return P_; }

  void enqueue_forward(std::vector<KernelEvent>* events) override {
    const std::int64_t V = shape_.DHHV;
    const std::size_t states_group = static_cast<std::size_t>(2 * cfg_.KT), states = states_global();
    // After enqueue_summary with shards, the gates and the summary pass have run (and nothing changed since).
    const bool reuse = exchange_.take_summary_reuse();
    if (!reuse) launch_gates(events);
    if (P_ > 1) {
      // Every shard from the EMPTY state (a finite m far below any weight, so that a shard opening with input gates
      // of -inf forms no inf - inf), the summaries chained, then every shard from its true entering state.
      if (!reuse) launch_fw_summaries(events);
      launch_fw_combine(has_init_, events);
      if (fused_ && !skip_outputs_)
        launch(k_fw_fused_, "tc_fw_fused", cfg_.fused_global(V), cfg_.fused_group(), events);
      else
        launch(k_fw_states_, "tc_fw_states", states, states_group, events);
      sh_.last_state_into(c_last_, n_last_, m_last_);
    } else if (fused_ && !skip_outputs_) {
      launch(k_fw_fused_, "tc_fw_fused", cfg_.fused_global(V), cfg_.fused_group(), events);
    } else {
      launch(k_fw_states_, "tc_fw_states", states, states_group, events, 0, sequences());
    }
    if (!skip_outputs_ && !fused_)
      launch(k_fw_outputs_, "tc_fw_outputs", cfg_.chunk_global(NCs_, V, cfg_.OTf), cfg_.chunk_group(), events);
    forward_done_ = true;
  }

  void enqueue_backward(std::vector<KernelEvent>* events) override {
    if (!has_grads_) throw Error("tensor-core resident problem was made without dh: no backward");
    if (!forward_done_ || skip_outputs_) throw Error("tensor-core backward: enqueue the forward (with outputs) first");
    const std::int64_t K = shape_.DHQK, V = shape_.DHHV;
    const std::size_t states_group = static_cast<std::size_t>(2 * cfg_.KT), states = states_global();
    const std::size_t group = cfg_.chunk_group(), NCs = static_cast<std::size_t>(NCs_);
    const bool reuse = exchange_.take_gradient_summary_reuse();
    if (!reuse) launch(k_bw_prep_, "tc_bw_prep", static_cast<std::size_t>((Ss_ + 7) / 8) * 256, 256, events);
    if (P_ > 1) {
      // Every shard with a zero gradient leaving it, the reverse chain, then every shard with its true one.
      if (!reuse) launch_bw_summaries(events);
      launch_bw_combine(has_dlast_, events);
      launch(k_bw_states_, "tc_bw_state_grads", states, states_group, events);
      sh_.initial_gradient_into(dc0_, dn0_);
    } else {
      launch(k_bw_states_, "tc_bw_state_grads", states, states_group, events, 0, sequences());
    }
    launch(k_bw_dq_, "tc_bw_grads_dq", cfg_.chunk_global(NCs, K, cfg_.OTq), group, events);
    launch(k_bw_dk_, "tc_bw_grads_dk", cfg_.chunk_global(NCs, K, cfg_.OTq), group, events);
    launch(k_bw_dv_, "tc_bw_grads_dv", cfg_.chunk_global(NCs, V, cfg_.OTf), group, events);
    launch(k_bw_gate_grads_, "tc_bw_gate_grads", static_cast<std::size_t>(cfg_.gate_group),
           static_cast<std::size_t>(cfg_.gate_group), events, 0, sequences());
    if (P_ > 1 && has_init_) sh_.dm0_into(dm0_);
  }

  void enqueue_summary() override {
    if (!segment_) ResidentChunkwise::enqueue_summary();
    launch_gates(nullptr);
    launch_fw_summaries(nullptr);
    launch_fw_combine(detail::kEnterEmpty, nullptr);
    exchange_.summary_enqueued(sh_, P_ > 1);
  }

  const SegmentSummary& read_summary() override { return exchange_.summary(*device_); }

  void set_entering_state(const float* c, const float* n, const float* m) override {
    if (!segment_) ResidentChunkwise::set_entering_state(c, n, m);
    detail::SegmentExchange::write_state(*device_, c0_, n0_, m0_, rows_, shape_.DHQK, shape_.DHHV, c, n, m);
  }

  void enqueue_gradient_summary() override {
    if (!segment_) ResidentChunkwise::enqueue_gradient_summary();
    if (!has_grads_) throw Error("tensor-core resident problem was made without dh: no backward");
    if (!forward_done_ || skip_outputs_) throw Error("tensor-core backward: enqueue the forward (with outputs) first");
    launch(k_bw_prep_, "tc_bw_prep", static_cast<std::size_t>((Ss_ + 7) / 8) * 256, 256, nullptr);
    launch_bw_summaries(nullptr);
    launch_bw_combine(0, nullptr);
    exchange_.gradient_summary_enqueued(sh_, m_last_, P_ > 1);
  }

  const GradientSummary& read_gradient_summary() override { return exchange_.gradient_summary(*device_); }

  void set_leaving_gradient(const float* dc, const float* dn) override {
    if (!segment_ || !has_grads_) ResidentChunkwise::set_leaving_gradient(dc, dn);
    detail::SegmentExchange::write_gradient(*device_, dc_last_, dn_last_, rows_, shape_.DHQK, shape_.DHHV, dc, dn);
  }

  ForwardResult read_forward() override {
    finish();
    const ProblemShape& p = shape_;
    ForwardResult out;
    if (!skip_outputs_) {
      out.h = Tensor({p.B, p.NH, p.S, p.DHHV}, p.dtype);
      device_->download(h_, out.h.bytes(), out.h.nbytes());
    }
    if (options_.return_last_states)
      detail::read_last_state(*device_, c_last_, n_last_, m_last_, p, options_.gate, out);
    return out;
  }

  BackwardResult read_backward() override {
    if (!has_grads_) throw Error("tensor-core resident problem was made without dh: no gradients");
    finish();
    const ProblemShape& p = shape_;
    BackwardResult out;
    auto read16 = [&](const PooledBuffer& b, Shape shape) {
      Tensor t(std::move(shape), p.dtype);
      device_->download(b, t.bytes(), t.nbytes());
      return t;
    };
    auto read32 = [&](const PooledBuffer& b, Shape shape) {
      Tensor t(std::move(shape), DType::f32);
      device_->download(b, t.bytes(), t.nbytes());
      return t;
    };
    out.dq = read16(dq_, {p.B, p.NH, p.S, p.DHQK});
    out.dk = read16(dk_, {p.B, p.NH, p.S, p.DHQK});
    out.dv = read16(dv_, {p.B, p.NH, p.S, p.DHHV});
    out.di = read32(di_, {p.B, p.NH, p.S});
    out.df = read32(df_, {p.B, p.NH, p.S});
    if (p.gate_dtype != DType::f32) {
      out.di = out.di.to(p.gate_dtype);
      out.df = out.df.to(p.gate_dtype);
    }
    if (has_init_) {
      const std::int64_t batch = p.state_batch();  // (N, NH, ...) packed
      out.dc0 = read32(dc0_, {batch, p.NH, p.DHQK, p.DHHV});
      out.dn0 = read32(dn0_, {batch, p.NH, p.DHQK});
      if (options_.gate == GateVariant::exp)
        out.dm0 = read32(dm0_, {batch, p.NH});
      else
        out.dm0 = Tensor::zeros({batch, p.NH}, DType::f32);
    }
    return out;
  }

  // last_state(): the forward without the output kernel.
  void skip_outputs() noexcept { skip_outputs_ = true; }

 private:
  std::size_t states_global() const {
    return static_cast<std::size_t>(2 * cfg_.KT) *
           static_cast<std::size_t>((shape_.DHQK / cfg_.KT) * (shape_.DHHV / cfg_.VT));
  }
  void launch_gates(std::vector<KernelEvent>* events) {
    launch(k_gates_, "tc_fw_gates", static_cast<std::size_t>(NCs_) * cfg_.L, static_cast<std::size_t>(cfg_.L), events);
  }
  // Every shard (or the whole segment) from the EMPTY state: the local summaries in sh_.c_last.
  void launch_fw_summaries(std::vector<KernelEvent>* events) {
    sh_.enter_empty(options_.gate);
    launch(k_fw_summary_, "tc_fw_states (summaries)", states_global(), static_cast<std::size_t>(2 * cfg_.KT), events);
  }
  // The summaries chained from the row's initial state (`init`: has_init_, or detail::kEnterEmpty for a summary).
  void launch_fw_combine(int init, std::vector<KernelEvent>* events) {
    set_args(k_fw_combine_.k, device_->name(), gG_, sh_.c_last, sh_.n_last, sh_.m_last, c0_, n0_, m0_, init, sh_.c_in,
             sh_.n_in, sh_.m_in, sh_.c_end, sh_.n_end, sh_.m_end, sh_.G_end, P_, NCs_);
    launch(k_fw_combine_, "shard_fw_combine", sh_.combine_global(), detail::kShardGroup, events, rows_);
  }
  // Every shard (or the whole segment) with a zero gradient leaving it: the local gradients in sh_.dc0.
  void launch_bw_summaries(std::vector<KernelEvent>* events) {
    sh_.zero_leaving_gradients();
    launch(k_bw_summary_, "tc_bw_state_grads (summaries)", states_global(), static_cast<std::size_t>(2 * cfg_.KT),
           events);
  }
  // The reverse chain from the gradient leaving the row (`has_dlast`: has_dlast_, or 0 for a summary).
  void launch_bw_combine(int has_dlast, std::vector<KernelEvent>* events) {
    set_args(k_bw_combine_.k, device_->name(), gG_, mst_, NCs_ + 1, mst_, NCs_, NCs_ + 1, sh_.dc0, sh_.dn0, dc_last_,
             dn_last_, has_dlast, sh_.dc_last, sh_.dn_last, sh_.dc_end, sh_.dn_end, sh_.G_end, P_, NCs_);
    launch(k_bw_combine_, "shard_bw_combine", sh_.combine_global(), detail::kShardGroup, events, rows_);
  }
  // A launch over the shard rows (rows x shards), or over `rows` when given; `segments` > 1: a third dimension
  // (the packed states pass: one work-group per sequence).
  void launch(const KernelObject& k, const char* name, std::size_t global0, std::size_t local0,
              std::vector<KernelEvent>* events, int rows = 0, std::size_t segments = 1) {
    const std::size_t global[3] = {global0, static_cast<std::size_t>(rows > 0 ? rows : R_), segments};
    const std::size_t local[3] = {local0, 1, 1};
    cl_event e = nullptr;
    check(clEnqueueNDRangeKernel(device_->profiling_queue(), k.k, segments > 1 ? 3 : 2, nullptr, global, local, 0,
                                 nullptr, events ? &e : nullptr),
          name, device_->name());
    if (events) events->emplace_back(name, e);
  }
  void finish() { check(clFinish(device_->profiling_queue()), "clFinish", device_->name()); }

  // The third dimension of the state and gate-gradient launches: the packed sequences (1 unpacked).
  std::size_t sequences() const { return shape_.packed() ? static_cast<std::size_t>(shape_.N) : 1; }
  // The stabiliser slots per shard row (mst): a slot entering every chunk and one leaving every sequence.
  int m_slots() const { return shape_.packed() ? NC_ + static_cast<int>(shape_.N) : NCs_ + 1; }
  // Packed: the chunk table after a kernel's own arguments (from index `next`).
  void with_tables(const KernelObject& k, cl_uint next) const {
    if (shape_.packed()) set_args_from(k.k, device_->name(), next, ctab_);
  }

  std::shared_ptr<Device> device_;
  MlstmOptions options_;
  ProblemShape shape_;
  TcConfig cfg_;
  int rows_ = 0, S_ = 0, NC_ = 0, has_init_ = 0, has_dlast_ = 0;
  detail::PackedCallTables tables_;  // packed: the chunk and segment tables (kept while the uploads read them)
  PooledBuffer ctab_, stab_, stab_bw_;
  int P_ = 1, R_ = 0, Ss_ = 0, NCs_ = 0;  // shards per row, shard rows, tokens and chunks per shard
  bool has_grads_ = false, forward_done_ = false, skip_outputs_ = false, segment_ = false, fused_ = false;
  detail::SegmentExchange exchange_;  // as a segment of a split sequence
  KernelObject k_gates_, k_fw_states_, k_fw_outputs_, k_fw_fused_, k_bw_prep_, k_bw_states_, k_bw_dq_, k_bw_dk_,
      k_bw_dv_, k_bw_gate_grads_, k_fw_combine_, k_bw_combine_, k_fw_summary_, k_bw_summary_;
  PooledBuffer q_, k_, v_, i_, f_, c0_, n0_, m0_, gb_, gbi_, gpm_, gcut_, gG_, gA_, gK_, gaw_, gub_, mst_, Cst_, nst_,
      c_last_, n_last_, m_last_, h_, Nt_, sgt_, dh_, dc_last_, dn_last_, dden_, dCst_, dnst_, dc0_, dn0_, dm0_, dq_,
      dk_, dv_, qdq_, kdk_, di_, df_;
  detail::ShardBuffers sh_;  // the sequence split's states (P_ > 1)
};

}  // namespace

TensorCoreSupport tensor_core_support(const DeviceInfo& device) {
  TensorCoreSupport s;
  if (device.vendor.find("NVIDIA") != std::string::npos) {
    cl_uint major = 0, minor = 0;
    if (clGetDeviceInfo(device.id, kComputeCapabilityMajorNV, sizeof major, &major, nullptr) == CL_SUCCESS &&
        clGetDeviceInfo(device.id, kComputeCapabilityMinorNV, sizeof minor, &minor, nullptr) == CL_SUCCESS) {
      s.compute_major = static_cast<int>(major);
      s.compute_minor = static_cast<int>(minor);
    }
  }
  if (!MLSTM_OPENCL_TENSOR_CORES) {
    s.reason = "built without the tensor-core path (MLSTM_OPENCL_NVIDIA_TC=OFF)";
  } else if (switched_off_by_environment()) {
    s.reason = "switched off by MLSTM_TENSOR_CORES";
  } else if (device.vendor.find("NVIDIA") == std::string::npos) {
    s.reason = "not an NVIDIA device (" + device.vendor + ")";
  } else if (s.compute_major < 8) {
    s.reason =
        "compute capability " + std::to_string(s.compute_major) + "." + std::to_string(s.compute_minor) + " < 8.0";
  } else {
    s.available = true;
  }
  return s;
}

std::string tensor_core_fit(const ProblemShape& p, const MlstmOptions& o) {
  if (p.dtype != DType::bf16 && p.dtype != DType::f16)
    return std::string("q/k/v are ") + std::string(dtype_name(p.dtype)) +
           ", the tensor-core kernels take bfloat16 or float16";
  if (p.DHQK % 16 != 0 || p.DHHV % 16 != 0)
    return "head dims " + std::to_string(p.DHQK) + "x" + std::to_string(p.DHHV) + " are not multiples of 16";
  if (o.chunk_size != kAutoChunk && o.chunk_size != 64 && o.chunk_size != 128)
    return "chunk size " + std::to_string(o.chunk_size) + " (the tensor-core kernels take 64 or 128)";
  return {};
}

TensorCoreRunner::TensorCoreRunner(std::shared_ptr<Device> device, Config config)
    : device_(std::move(device)), config_(config) {}

void TensorCoreRunner::prepare(const ProblemShape& p, const MlstmOptions& o) const {
  Device& dev = *device_;
  const TcConfig c = make_config(dev, config_.emulate, p, o, !p.packed());
  dev.program_from_text("tc_gates", tc_source_text("tc_gates"), c.gates());
  dev.program_from_text("tc_states", tc_source_text("tc_states"), c.states(0));
  dev.program_from_text("tc_states", tc_source_text("tc_states"), c.states(1));
  dev.program_from_text("tc_chunk", tc_source_text("tc_chunk"), c.chunk(0, p.DHQK, p.DHHV, c.OTf, c.DSf));
  dev.program_from_text("tc_chunk", tc_source_text("tc_chunk"), c.chunk(1, p.DHHV, p.DHQK, c.OTq, c.DSq));
  dev.program_from_text("tc_chunk", tc_source_text("tc_chunk"), c.chunk(2, p.DHHV, p.DHQK, c.OTq, c.DSq));
  dev.program_from_text("tc_chunk", tc_source_text("tc_chunk"), c.chunk(3, p.DHQK, p.DHHV, c.OTf, c.DSf));
}

std::unique_ptr<ResidentChunkwise> TensorCoreRunner::resident(const ForwardArgs& args, const MlstmOptions& options,
                                                              const BackwardArgs* grads) const {
  return std::make_unique<ResidentTensorCore>(device_, config_, args, options, grads);
}

ForwardResult TensorCoreRunner::forward(const ForwardArgs& args, const MlstmOptions& options) const {
  ResidentTensorCore r(device_, config_, args, options, nullptr);
  r.enqueue_forward(nullptr);
  return r.read_forward();
}

ForwardResult TensorCoreRunner::last_state(const ForwardArgs& args, const MlstmOptions& options) const {
  MlstmOptions with_states = options;
  with_states.return_last_states = true;
  ResidentTensorCore r(device_, config_, args, with_states, nullptr);
  r.skip_outputs();
  r.enqueue_forward(nullptr);
  return r.read_forward();
}

BackwardResult TensorCoreRunner::backward(const BackwardArgs& args, const MlstmOptions& options) const {
  ResidentTensorCore r(device_, config_, args.inputs, options, &args);
  r.enqueue_forward(nullptr);
  r.enqueue_backward(nullptr);
  return r.read_backward();
}

}  // namespace mlstm::opencl
