#include "mlstm/devices/opencl/chunkwise_routine.hpp"
#include "mlstm/devices/opencl/launch_params.hpp"

#include <algorithm>
#include <bit>
#include <cstdlib>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "internal.hpp"
#include "mlstm/core/env.hpp"
#include "packed_tables.hpp"
#include "shards.hpp"

namespace mlstm::opencl {

using detail::KernelObject;
using detail::set_args;
using detail::set_args_from;

namespace {

int dtype_code(DType d) {
  switch (d) {
    case DType::f32:
      return 0;
    case DType::f16:
      return 1;
    case DType::bf16:
      return 2;
    case DType::f64:
      return 0;  // converted to float32 on upload
  }
  return 0;
}

// common.cl followed by mlstm_chunkwise.cl: the text of the portable program. Assembled once (the program cache
// hashes it on every lookup).
const std::string& portable_source_text() {
  // shard_combine.cl: the sequence split's combine kernels.
  static const std::string text = detail::joined_kernel_sources({"common", "mlstm_chunkwise", "shard_combine"});
  return text;
}

}  // namespace

namespace {

// One problem on one device, every buffer of the forward (and of the backward when made with gradients).
class ResidentPortable final : public ResidentChunkwise {
 public:
  // state_only (with grads): only the gradient of the state entering the sequence is wanted
  // (enqueue_state_gradient / read_state_gradient); the token-gradient buffers and kernels are not made.
  ResidentPortable(std::shared_ptr<Device> device, const ChunkwiseRunner::Config& config, const ForwardArgs& a,
                   const MlstmOptions& o, const BackwardArgs* grads, bool outputs, bool state_only = false)
      : device_(std::move(device)), options_(o), outputs_(outputs), state_only_(state_only) {
    p_ = grads ? validate_backward(*grads, o) : validate_forward(a, o);
    if (config.segment) check_not_packed(p_, "a segment of a split sequence");
    packed_ = p_.packed();
    Device& dev = *device_;
    const std::string& dn = dev.name();
    S_ = static_cast<int>(p_.S);
    rows_ = static_cast<int>(p_.rows());
    // The chunk: the chunk size, or for a sequence shorter than that the sequence rounded up to a power of two (one
    // chunk either way, partial; never past twice the sequence, and 32-bit safe). The programs are specialised by
    // the chunk, so a mix of short sequences builds at most log2(chunk) + 1 of them, not one per length. Packed
    // sequences run in one call (-DPACKED=1): their chunks restart at every sequence start (packed_call_tables).
    L_ = static_cast<int>(
        std::min<std::int64_t>(resolved_chunk(dev.info(), p_, o, false),
                               static_cast<std::int64_t>(std::bit_ceil(static_cast<std::uint64_t>(p_.S)))));
    if (packed_)
      tables_ = detail::packed_call_tables(a.cu_seqlens, L_, a.has_initial_state(), grads && !grads->dc_last.empty());
    nchunks_ = packed_ ? tables_.chunks : (S_ + L_ - 1) / L_;
    // The sequence split (shards.hpp) where the state kernels' work-groups (rows x 64 x 64 tiles) leave the device
    // idle: row r, shard p is row r * P + p of Ss_ tokens and NCs_ chunks in the same arrays. Packed rows walk
    // each (row, sequence) apart instead.
    // With shards, the states leave the summary pass fixed up (mlstm_chunkwise.cl "The sequence split's fix-up")
    // rather than computed a second time; MLSTM_OPENCL_SHARD_FIXUP=0 runs the second pass (for comparisons).
    const bool fixup = env::one_of("MLSTM_OPENCL_SHARD_FIXUP", {"0", "1"}).value_or("1") == "1";
    P_ = packed_ ? 1
                 : detail::sequence_shards(dev.info(), S_, L_, nchunks_,
                                           p_.rows() * ((p_.DHQK + 63) / 64) * ((p_.DHHV + 63) / 64), config.shards,
                                           fixup ? detail::SplitCost::fixup : detail::SplitCost::second_pass);
    // A segment of a split sequence runs a summary pass for the exchange anyway: in two shards or more its own
    // forward reuses that pass (unless the caller or MLSTM_OPENCL_SHARDS chose the shards).
    if (config.segment && P_ == 1 && config.shards == 0 && !env::get("MLSTM_OPENCL_SHARDS"))
      P_ = detail::sequence_shards(dev.info(), S_, L_, nchunks_, 1, 2);
    R_ = rows_ * P_;
    Ss_ = S_ / P_;
    NCs_ = nchunks_ / P_;
    // q, k, v keep their 16-bit dtype on the device; float64 inputs go up as float32.
    dev_dtype_ = p_.dtype == DType::f64 ? DType::f32 : p_.dtype;
    std::ostringstream opts;
    opts << "-DDHQK=" << p_.DHQK << " -DDHHV=" << p_.DHHV << " -DCHUNK=" << L_
         << " -DKEY_TILE=" << ChunkwiseRunner::kKeyTile << " -DGATE_EXP=" << (o.gate == GateVariant::exp ? 1 : 0)
         << " -DNORMALIZE=" << (o.normalize ? 1 : 0) << " -DIN_DTYPE=" << dtype_code(dev_dtype_)
         << " -DEPS=" << std::hexfloat << static_cast<float>(o.eps) << "f";
    if (packed_) opts << " -DPACKED=1";
    const PortableLaunchParams launch = portable_launch_params(dev.info());
    const bool untiled = launch.untiled;
    // The register-tiled output kernel (blocks of 64 queries x 64*OVW columns) for chunks of 32 tokens or more
    // when its stages fit in local memory; else (shorter chunks: a block would be mostly empty; chunk 1 is the
    // recurrent form and the step kernel) the per-token one.
    ovw_ = static_cast<int>(
        std::min<std::int64_t>(launch.output_col_blocks > 0 ? launch.output_col_blocks : 4, (p_.DHHV + 63) / 64));
    {
      // The stages: Q'^T and K^T (16 x 68 each), C or V (16 x 64 OVW), the scores (64 x 68), n (16); the per-token
      // rows: 4 of one float, 2 of the float4 decays (stages.hpp Decays); the reduction (256).
      const std::uint64_t stage = 16ull * 64ull * static_cast<std::uint64_t>(ovw_);
      const std::uint64_t bytes = 4ull * (2 * 16 * 68 + stage + 64 * 68 + 16 + 12 * 64 + 256);
      regtiled_outputs_ =
          !untiled && L_ >= 32 && bytes + 1024 <= dev.info().local_memory && dev.info().max_work_group >= 256;
    }
    if (regtiled_outputs_) opts << " -DOVW=" << ovw_;
    // The state kernels: tiles of 64 x 64*SVW of C per work group (the n column rides with the first). Each
    // work group walks the whole sequence, so with few rows (B*NH) wider tiles leave compute units idle: two
    // column blocks only where that still gives two work groups per compute unit.
    {
      const std::int64_t wide_groups = R_ * ((p_.DHQK + 63) / 64) * ((p_.DHHV + 127) / 128);
      const bool wide = p_.DHHV > 64 && wide_groups >= 2 * static_cast<std::int64_t>(dev.info().compute_units);
      svw_ = launch.state_col_blocks > 0 ? launch.state_col_blocks : wide ? 2 : 1;
      svw_bw_ = launch.state_grad_col_blocks > 0 ? launch.state_grad_col_blocks : svw_;
    }
    // -DSVW and -DSTT: last, per program (the state-gradient kernel's may differ).
    const int stt = launch.state_subtile, stt_bw = launch.state_grad_subtile > 0 ? launch.state_grad_subtile : stt;
    // The register-tiled gradient kernels (dq, dk, dv; blocks of 64 tokens x 64*GVW columns) for chunks of 32
    // tokens or more when one column tile covers DHQK (they reduce q.dq and k.dk inside the work group); else the
    // per-token one.
    gvw_ = static_cast<int>((p_.DHQK + 63) / 64);
    {
      const std::uint64_t stage = 16ull * std::max<std::uint64_t>(64ull * static_cast<std::uint64_t>(gvw_) + 4, 68);
      // The per-token rows: 7 of one float, 2 of the float4 decays.
      const std::uint64_t bytes = 4ull * (16 * 68 + stage + 64 * 68 + 15 * 64 + 64 * 16);
      regtiled_backward_ = !untiled && L_ >= 32 && gvw_ <= 4 && bytes + 1024 <= dev.info().local_memory &&
                           dev.info().max_work_group >= 256;
    }
    if (regtiled_backward_) opts << " -DGVW=" << gvw_;
    auto program = [&](int svw, int sub) {
      return dev.program_from_text("mlstm_chunkwise", portable_source_text(),
                                   opts.str() + " -DSTT=" + std::to_string(sub) + " -DSVW=" + std::to_string(svw));
    };
    cl_program prog = program(svw_, stt);
    k_gates_ = KernelObject{dev.kernel(prog, "fw_gates")};
    k_weights_ = KernelObject{dev.kernel(prog, "fw_state_weights")};
    k_states_ = KernelObject{dev.kernel(prog, "fw_states")};
    k_outputs_ = KernelObject{dev.kernel(prog, outputs_kernel_name())};

    const std::size_t fs = sizeof(float), tok = static_cast<std::size_t>(rows_) * static_cast<std::size_t>(S_);
    const std::size_t K = static_cast<std::size_t>(p_.DHQK), V = static_cast<std::size_t>(p_.DHHV);
    const std::size_t nb = static_cast<std::size_t>(rows_) * static_cast<std::size_t>(nchunks_);
    // The states entering and leaving the row: (B, NH, ...), packed one per sequence (N, NH, ...).
    const std::size_t last_rows = static_cast<std::size_t>(p_.state_batch() * p_.NH);
    auto up_dtype = [&](ConstTensorView t) { return detail::upload_as(dev, t, dev_dtype_); };
    auto up_f32 = [&](ConstTensorView t) { return detail::upload_as(dev, t, DType::f32); };
    auto zeros = [&](std::size_t n) {
      const std::vector<float> z(std::max<std::size_t>(n, 1), 0.f);
      return dev.acquire_upload(z.data(), z.size() * fs);
    };
    q_ = up_dtype(a.q);
    k_ = up_dtype(a.k);
    v_ = up_dtype(a.v);
    i_ = up_f32(a.i);
    f_ = up_f32(a.f);
    // A segment of a split sequence always holds a state entering it (the zero state until set_entering_state) and a
    // gradient leaving it (resident.hpp).
    segment_ = config.segment;
    has_init_ = a.has_initial_state() || segment_ ? 1 : 0;
    if (a.has_initial_state()) {
      C0_ = up_f32(a.c0);
      n0_ = up_f32(a.n0);
      m0_ = up_f32(a.m0);
    } else {
      C0_ = zeros(last_rows * K * V);
      n0_ = zeros(last_rows * K);
      m0_ = zeros(last_rows);
    }
    if (packed_) {
      ctab_ = dev.acquire_upload(tables_.ctab.data(), tables_.ctab.size() * sizeof(int));
      stab_ = dev.acquire_upload(tables_.stab.data(), tables_.stab.size() * sizeof(int));
      stab_bw_ = dev.acquire_upload(tables_.stab_bw.data(), tables_.stab_bw.size() * sizeof(int));
    }
    b_ = dev.acquire(4 * tok * fs);  // the log decays in three channels (float4 per token: stages.hpp Decays)
    ig_ = dev.acquire(tok * fs);
    G_ = dev.acquire(nb * fs);
    Cb_ = dev.acquire(nb * K * V * fs);
    nb_ = dev.acquire(nb * K * fs);
    mb_ = dev.acquire(nb * fs);
    Co_ = dev.acquire(last_rows * K * V * fs);
    no_ = dev.acquire(last_rows * K * fs);
    mo_ = dev.acquire(last_rows * fs);
    carry_ = dev.acquire(nb * fs);
    wtok_ = dev.acquire(tok * fs);
    if (outputs_) {
      h_ = dev.acquire(tok * V * dtype_size(dev_dtype_));
      mt_ = dev.acquire(tok * fs);
      Nt_ = dev.acquire(tok * fs);
      dent_ = dev.acquire(tok * fs);
      qw_ = dev.acquire(tok * fs);
    }
    const int S = Ss_, nc = NCs_;
    with_tables(k_gates_, set_args(k_gates_.k, dn, i_, f_, b_, ig_, G_, S, nc));
    if (P_ > 1 || segment_) {
      // The summary pass (and with shards the states pass) reads the shards' entering states from sh_.*_in (the
      // EMPTY state, then the combined ones) and writes the states leaving them to sh_.*_last.
      sh_.allocate_forward(dev, rows_, P_, p_.DHQK, p_.DHHV);
      k_combine_ = KernelObject{dev.kernel(prog, "shard_fw_combine")};
    }
    fixup_ = P_ > 1 && fixup;
    if (fixup_) {
      k_fix_weights_ = KernelObject{dev.kernel(prog, "fw_fixup_weights")};
      k_fix_states_ = KernelObject{dev.kernel(prog, "fw_fixup_states")};
      mloc_ = dev.acquire(nb * fs);
      fa_ = dev.acquire(nb * fs);
      fb_ = dev.acquire(nb * fs);
      set_args(k_fix_weights_.k, dn, b_, ig_, G_, mloc_, sh_.m_in, sh_.m_end, mb_, carry_, wtok_, fa_, fb_, S, nc, P_);
      set_args(k_fix_states_.k, dn, Cb_, nb_, fa_, fb_, sh_.c_in, sh_.n_in, sh_.m_in, sh_.c_end, sh_.n_end, sh_.m_end,
               sh_.c_last, sh_.n_last, sh_.m_last, nc, P_);
    }
    bind_states(P_ > 1);
    if (outputs_)
      with_tables(k_outputs_,
                  set_args(k_outputs_.k, dn, q_, k_, v_, b_, ig_, Cb_, nb_, mb_, h_, mt_, Nt_, dent_, qw_, S, nc));

    if (grads) {
      if (!outputs_) throw Error("portable backward needs the forward outputs");
      has_grads_ = true;
      k_prep_ = KernelObject{dev.kernel(prog, "bw_prep")};
      // The state-gradient kernel at its own column blocks: the same text built with them where they differ.
      cl_program bw_prog = svw_bw_ == svw_ && stt_bw == stt ? prog : program(svw_bw_, stt_bw);
      k_bw_states_ = KernelObject{dev.kernel(bw_prog, "bw_state_grads")};
      if (state_only_) {
        // no token gradients
      } else if (regtiled_backward_) {
        k_bw_grads_ = KernelObject{dev.kernel(prog, "bw_grads_dq_regtiled")};
        k_bw_dk_ = KernelObject{dev.kernel(prog, "bw_grads_dk_regtiled")};
        k_bw_dv_ = KernelObject{dev.kernel(prog, "bw_grads_dv_regtiled")};
      } else {
        k_bw_grads_ = KernelObject{dev.kernel(prog, "bw_grads")};
      }
      if (!state_only_) k_gate_grads_ = KernelObject{dev.kernel(prog, "bw_gate_grads")};
      dh_ = up_dtype(grads->dh);
      has_dlast_ = grads->dc_last.empty() && !segment_ ? 0 : 1;
      if (!grads->dc_last.empty()) {
        dCl_ = up_f32(grads->dc_last);
        dnl_ = up_f32(grads->dn_last);
      } else if (segment_) {  // zero until set_leaving_gradient
        dCl_ = zeros(static_cast<std::size_t>(rows_) * K * V);
        dnl_ = zeros(static_cast<std::size_t>(rows_) * K);
      } else {
        dCl_ = zeros(1);
        dnl_ = zeros(1);
      }
      dden_ = dev.acquire(tok * fs);
      dCn_ = dev.acquire(nb * K * V * fs);
      dnn_ = dev.acquire(nb * K * fs);
      dC0_ = dev.acquire(last_rows * K * V * fs);
      dn0_ = dev.acquire(last_rows * K * fs);
      set_args(k_prep_.k, dn, dh_, h_, mt_, Nt_, dent_, dden_, S);
      if (P_ > 1 || segment_) {
        // The summary pass (and with shards the gradient pass) reads the gradient leaving each shard from
        // sh_.dc_last (zero, then the combined ones) and writes the gradient entering it to sh_.dc0.
        sh_.allocate_backward();
        k_bw_combine_ = KernelObject{dev.kernel(prog, "shard_bw_combine")};
      }
      if (fixup_) {
        k_bw_fix_weights_ = KernelObject{dev.kernel(prog, "bw_fixup_weights")};
        k_bw_fix_states_ = KernelObject{dev.kernel(prog, "bw_fixup_states")};
        gin_ = dev.acquire(static_cast<std::size_t>(R_) * fs);
        set_args(k_bw_fix_weights_.k, dn, G_, mb_, sh_.m_last, fa_, gin_, nc);
        set_args(k_bw_fix_states_.k, dn, dCn_, dnn_, sh_.dc0, sh_.dn0, fa_, gin_, sh_.dc_last, sh_.dn_last, nc);
      }
      bind_gradient_states(P_ > 1);
      if (state_only_) return;
      dm0_ = dev.acquire(last_rows * fs);
      dq_ = dev.acquire(tok * K * dtype_size(dev_dtype_));
      dk_ = dev.acquire(tok * K * dtype_size(dev_dtype_));
      dv_ = dev.acquire(tok * V * dtype_size(dev_dtype_));
      qdq_ = dev.acquire(tok * fs);
      kdk_ = dev.acquire(tok * fs);
      di_ = dev.acquire(tok * fs);
      df_ = dev.acquire(tok * fs);
      if (regtiled_backward_) {
        with_tables(k_bw_grads_, set_args(k_bw_grads_.k, dn, q_, k_, v_, dh_, dden_, b_, ig_, mb_, wtok_, Cb_, nb_,
                                          dCn_, dnn_, mt_, Nt_, dq_, qdq_, S, nc));
        with_tables(k_bw_dk_, set_args(k_bw_dk_.k, dn, q_, k_, v_, dh_, dden_, b_, ig_, mb_, wtok_, Cb_, nb_, dCn_,
                                       dnn_, mt_, Nt_, dk_, kdk_, S, nc));
        with_tables(k_bw_dv_, set_args(k_bw_dv_.k, dn, q_, k_, v_, dh_, dden_, b_, ig_, mb_, wtok_, Cb_, nb_, dCn_,
                                       dnn_, mt_, Nt_, dv_, kdk_, S, nc));
      } else {
        with_tables(k_bw_grads_, set_args(k_bw_grads_.k, dn, q_, k_, v_, dh_, dden_, b_, ig_, mb_, wtok_, Cb_, nb_,
                                          dCn_, dnn_, mt_, Nt_, dq_, dk_, dv_, qdq_, kdk_, S, nc));
      }
      if (P_ == 1) {
        // Packed: each sequence's last state, its gradient, initial state and its gradient at the forward table's
        // rows.
        with_tables(k_gate_grads_,
                    set_args(k_gate_grads_.k, dn, i_, f_, qdq_, kdk_, dCl_, dnl_, Co_, no_, has_dlast_, dC0_, dn0_, C0_,
                             n0_, has_init_, di_, df_, dm0_, S),
                    &stab_);
      } else {
        // Shard by shard: the tokens after a shard add <dC, C> + <dn, n> of the state leaving it (tc_routine.cpp).
        set_args(k_gate_grads_.k, dn, i_, f_, qdq_, kdk_, sh_.dc_last, sh_.dn_last, sh_.c_last, sh_.n_last, 1, sh_.dc0,
                 sh_.dn0, sh_.c_in, sh_.n_in, has_init_, di_, df_, sh_.dm0, S);
      }
    }
  }

  Device& device() const noexcept override { return *device_; }
  int shards() const noexcept override { return P_; }

  void enqueue_forward(std::vector<KernelEvent>* events) override {
    const std::size_t rows = static_cast<std::size_t>(R_), wg = ChunkwiseRunner::kWorkGroup;
    // After enqueue_summary with shards, the gates and the summary pass have run (and nothing changed since).
    const bool reuse = exchange_.take_summary_reuse();
    if (!reuse) launch(k_gates_, "fw_gates", 2, {static_cast<std::size_t>(NCs_), rows}, {}, events);
    if (P_ > 1) {
      // Every shard from the EMPTY state, the summaries chained, then every shard's states fixed up from its true
      // entering state (fixup_), or computed again from it.
      if (!reuse) launch_fw_summaries(events);
      launch_fw_combine(has_init_, events);
    } else if (segment_) {
      bind_states(false);  // a segment's summary pass used the shard buffers
    }
    if (fixup_)
      launch_fw_fixup(events);
    else
      launch_fw_states("fw_state_weights", "fw_states", events);
    if (P_ > 1) sh_.last_state_into(Co_, no_, mo_);
    if (outputs_) {
      if (regtiled_outputs_) {
        const std::size_t col_tiles = (static_cast<std::size_t>(p_.DHHV) + 64 * ovw_ - 1) / (64 * ovw_);
        const std::size_t groups =
            static_cast<std::size_t>(NCs_) * ((static_cast<std::size_t>(L_) + 63) / 64) * col_tiles;
        launch(k_outputs_, outputs_kernel_name(), 2, {groups * 256, rows}, {256, 1}, events);
      } else {
        launch(k_outputs_, outputs_kernel_name(), 2, {token_groups() * wg, rows}, {wg, 1}, events);
      }
    }
    forward_done_ = true;
  }

  // bw_prep and the reverse state-gradient recurrence (the first two backward kernels).
  void enqueue_state_gradient(std::vector<KernelEvent>* events) {
    if (!has_grads_) throw Error("portable resident problem was made without dh: no backward");
    if (!forward_done_) throw Error("portable backward: enqueue the forward first");
    const std::size_t rows = static_cast<std::size_t>(R_);
    const bool reuse = exchange_.take_gradient_summary_reuse();
    if (!reuse) launch_prep(events);
    if (P_ > 1) {
      // Every shard with a zero gradient leaving it, the reverse chain, then every shard's gradients fixed up with
      // its true one (fixup_), or computed again with it.
      if (!reuse) launch_bw_summaries(events);
      launch_bw_combine(has_dlast_, events);
    } else if (segment_) {
      bind_gradient_states(false);  // a segment's summary pass used the shard buffers
    }
    if (fixup_) {
      launch(k_bw_fix_weights_, "bw_fixup_weights", 2, {64 * rows, 1}, {64, 1}, events);
      launch(k_bw_fix_states_, "bw_fixup_states", 3, {256 * fixup_groups(), static_cast<std::size_t>(NCs_) + 1, rows},
             {256, 1, 1}, events);
    } else {
      launch(k_bw_states_, "bw_state_grads", 3, {256 * state_tiles(svw_bw_), rows, sequences()}, {256, 1, 1}, events);
    }
    if (P_ > 1) sh_.initial_gradient_into(dC0_, dn0_);
  }

  // The gradient of the state entering the sequence (dc0, dn0; dm0 is left to the caller).
  BackwardResult read_state_gradient() {
    finish();
    BackwardResult out;
    out.dc0 = Tensor({p_.state_batch(), p_.NH, p_.DHQK, p_.DHHV}, DType::f32);
    out.dn0 = Tensor({p_.state_batch(), p_.NH, p_.DHQK}, DType::f32);
    device_->download(dC0_, out.dc0.bytes(), out.dc0.nbytes());
    device_->download(dn0_, out.dn0.bytes(), out.dn0.nbytes());
    return out;
  }

  void enqueue_backward(std::vector<KernelEvent>* events) override {
    if (state_only_) throw Error("portable resident problem was made for the state gradient only");
    enqueue_state_gradient(events);
    const std::size_t rows = static_cast<std::size_t>(R_);
    if (regtiled_backward_) {
      const std::size_t blocks = static_cast<std::size_t>(NCs_) * ((static_cast<std::size_t>(L_) + 63) / 64);
      const std::size_t cols = 64 * static_cast<std::size_t>(gvw_);
      const std::size_t qk_tiles = (static_cast<std::size_t>(p_.DHQK) + cols - 1) / cols;
      const std::size_t v_tiles = (static_cast<std::size_t>(p_.DHHV) + cols - 1) / cols;
      launch(k_bw_grads_, "bw_grads_dq_regtiled", 2, {blocks * qk_tiles * 256, rows}, {256, 1}, events);
      launch(k_bw_dk_, "bw_grads_dk_regtiled", 2, {blocks * qk_tiles * 256, rows}, {256, 1}, events);
      launch(k_bw_dv_, "bw_grads_dv_regtiled", 2, {blocks * v_tiles * 256, rows}, {256, 1}, events);
    } else {
      launch(k_bw_grads_, "bw_grads", 2, {token_groups() * 64, rows}, {64, 1}, events);
    }
    launch(k_gate_grads_, "bw_gate_grads", 2, {256 * rows, sequences()}, {256, 1}, events);
    if (P_ > 1 && has_init_) sh_.dm0_into(dm0_);
  }

  void enqueue_summary() override {
    if (!segment_) ResidentChunkwise::enqueue_summary();
    launch(k_gates_, "fw_gates", 2, {static_cast<std::size_t>(NCs_), static_cast<std::size_t>(R_)}, {}, nullptr);
    if (P_ == 1) bind_states(true);
    launch_fw_summaries(nullptr);
    launch_fw_combine(detail::kEnterEmpty, nullptr);
    exchange_.summary_enqueued(sh_, P_ > 1);
  }

  const SegmentSummary& read_summary() override { return exchange_.summary(*device_); }

  void set_entering_state(const float* c, const float* n, const float* m) override {
    if (!segment_) ResidentChunkwise::set_entering_state(c, n, m);
    detail::SegmentExchange::write_state(*device_, C0_, n0_, m0_, rows_, p_.DHQK, p_.DHHV, c, n, m);
  }

  void enqueue_gradient_summary() override {
    if (!segment_) ResidentChunkwise::enqueue_gradient_summary();
    if (!has_grads_) throw Error("portable resident problem was made without dh: no backward");
    if (!forward_done_) throw Error("portable backward: enqueue the forward first");
    launch_prep(nullptr);
    if (P_ == 1) bind_gradient_states(true);
    launch_bw_summaries(nullptr);
    launch_bw_combine(0, nullptr);
    exchange_.gradient_summary_enqueued(sh_, mo_, P_ > 1);
  }

  const GradientSummary& read_gradient_summary() override { return exchange_.gradient_summary(*device_); }

  void set_leaving_gradient(const float* dc, const float* dn) override {
    if (!segment_ || !has_grads_) ResidentChunkwise::set_leaving_gradient(dc, dn);
    detail::SegmentExchange::write_gradient(*device_, dCl_, dnl_, rows_, p_.DHQK, p_.DHHV, dc, dn);
  }

  ForwardResult read_forward() override {
    finish();
    ForwardResult out;
    if (outputs_) {
      Tensor h({p_.B, p_.NH, p_.S, p_.DHHV}, dev_dtype_);
      device_->download(h_, h.bytes(), h.nbytes());
      out.h = dev_dtype_ == p_.dtype ? std::move(h) : h.to(p_.dtype);
    }
    if (options_.return_last_states) detail::read_last_state(*device_, Co_, no_, mo_, p_, options_.gate, out);
    return out;
  }

  BackwardResult read_backward() override {
    if (!has_grads_) throw Error("portable resident problem was made without dh: no gradients");
    finish();
    BackwardResult out;
    auto read = [&](const PooledBuffer& b, Shape shape, DType stored, DType wanted) {
      Tensor t(std::move(shape), stored);
      device_->download(b, t.bytes(), t.nbytes());
      return stored == wanted ? t : t.to(wanted);
    };
    out.dq = read(dq_, {p_.B, p_.NH, p_.S, p_.DHQK}, dev_dtype_, p_.dtype);
    out.dk = read(dk_, {p_.B, p_.NH, p_.S, p_.DHQK}, dev_dtype_, p_.dtype);
    out.dv = read(dv_, {p_.B, p_.NH, p_.S, p_.DHHV}, dev_dtype_, p_.dtype);
    out.di = read(di_, {p_.B, p_.NH, p_.S}, DType::f32, p_.gate_dtype);
    out.df = read(df_, {p_.B, p_.NH, p_.S}, DType::f32, p_.gate_dtype);
    if (has_init_) {
      const std::int64_t batch = p_.state_batch();  // (N, NH, ...) packed
      out.dc0 = read(dC0_, {batch, p_.NH, p_.DHQK, p_.DHHV}, DType::f32, DType::f32);
      out.dn0 = read(dn0_, {batch, p_.NH, p_.DHQK}, DType::f32, DType::f32);
      out.dm0 = read(dm0_, {batch, p_.NH}, DType::f32, DType::f32);
    }
    return out;
  }

 private:
  static std::size_t round_up(std::size_t x, std::size_t m) { return (x + m - 1) / m * m; }
  // The forward's state kernels (weights and states) on the shards' buffers (sh_: the EMPTY state or the combined
  // ones in, the states leaving every shard out), or on the row's (the initial state in, the last state out).
  void bind_states(bool shard_io) {
    const std::string& dn = device_->name();
    if (shard_io) {
      // The fix-up reads the summary pass's stabilisers (mloc_) and writes the true ones to mb_.
      set_args(k_weights_.k, dn, b_, ig_, G_, sh_.m_in, fixup_ ? mloc_ : mb_, carry_, wtok_, sh_.m_last, Ss_, NCs_);
      set_args(k_states_.k, dn, k_, v_, carry_, wtok_, sh_.c_in, sh_.n_in, Cb_, nb_, sh_.c_last, sh_.n_last, Ss_, NCs_);
    } else {
      with_tables(k_weights_, set_args(k_weights_.k, dn, b_, ig_, G_, m0_, mb_, carry_, wtok_, mo_, Ss_, NCs_), &stab_);
      with_tables(k_states_, set_args(k_states_.k, dn, k_, v_, carry_, wtok_, C0_, n0_, Cb_, nb_, Co_, no_, Ss_, NCs_),
                  &stab_);
    }
  }
  // The backward's state-gradient kernel likewise (sh_.dc_last in, sh_.dc0 out; or the row's dc_last, dc0).
  void bind_gradient_states(bool shard_io) {
    const std::string& dn = device_->name();
    if (shard_io)
      set_args(k_bw_states_.k, dn, q_, dh_, dden_, carry_, qw_, Nt_, sh_.dc_last, sh_.dn_last, 1, dCn_, dnn_, sh_.dc0,
               sh_.dn0, Ss_, NCs_);
    else
      with_tables(k_bw_states_,
                  set_args(k_bw_states_.k, dn, q_, dh_, dden_, carry_, qw_, Nt_, dCl_, dnl_, has_dlast_, dCn_, dnn_,
                           dC0_, dn0_, Ss_, NCs_),
                  &stab_bw_);
  }
  void launch_prep(std::vector<KernelEvent>* events) {
    launch(k_prep_, "bw_prep", 2, {round_up(static_cast<std::size_t>(Ss_), 64), static_cast<std::size_t>(R_)}, {64, 1},
           events);
  }
  // Every shard (or the whole segment) from the EMPTY state: the local summaries in sh_.*_last.
  void launch_fw_summaries(std::vector<KernelEvent>* events) {
    sh_.enter_empty(options_.gate);
    launch_fw_states("fw_state_weights (summaries)", "fw_states (summaries)", events);
  }
  // The forward's state kernels (stabilisers and weights, then the states), each walk a (row, sequence).
  void launch_fw_states(const char* weights, const char* states, std::vector<KernelEvent>* events) {
    const std::size_t rows = static_cast<std::size_t>(R_);
    launch(k_weights_, weights, 2, {64 * rows, sequences()}, {64, 1}, events);
    launch(k_states_, states, 3, {256 * state_tiles(svw_), rows, sequences()}, {256, 1, 1}, events);
  }
  // After the combine: the true stabilisers, carries and weights, then the states from the summary pass's.
  void launch_fw_fixup(std::vector<KernelEvent>* events) {
    launch(k_fix_weights_, "fw_fixup_weights", 2, {64 * static_cast<std::size_t>(R_), 1}, {64, 1}, events);
    launch(k_fix_states_, "fw_fixup_states", 3,
           {256 * fixup_groups(), static_cast<std::size_t>(NCs_) + 1, static_cast<std::size_t>(R_)}, {256, 1, 1},
           events);
  }
  // Work-groups of the fix-up's states kernels per (chunk, shard row): each item strides over a state's values.
  std::size_t fixup_groups() const {
    const std::size_t kv = static_cast<std::size_t>(p_.DHQK) * static_cast<std::size_t>(p_.DHHV);
    return std::min<std::size_t>((kv + 255) / 256, 16);
  }
  // The summaries chained from the row's initial state (`init`: has_init_, or detail::kEnterEmpty for a summary).
  void launch_fw_combine(int init, std::vector<KernelEvent>* events) {
    set_args(k_combine_.k, device_->name(), G_, sh_.c_last, sh_.n_last, sh_.m_last, C0_, n0_, m0_, init, sh_.c_in,
             sh_.n_in, sh_.m_in, sh_.c_end, sh_.n_end, sh_.m_end, sh_.G_end, P_, NCs_);
    launch(k_combine_, "shard_fw_combine", 2, {sh_.combine_global(), static_cast<std::size_t>(rows_)},
           {detail::kShardGroup, 1}, events);
  }
  // Every shard (or the whole segment) with a zero gradient leaving it: the local gradients in sh_.dc0.
  void launch_bw_summaries(std::vector<KernelEvent>* events) {
    sh_.zero_leaving_gradients();
    launch(k_bw_states_, "bw_state_grads (summaries)", 3, {256 * state_tiles(svw_bw_), static_cast<std::size_t>(R_), 1},
           {256, 1, 1}, events);
  }
  // The reverse chain from the gradient leaving the row (`has_dlast`: has_dlast_, or 0 for a summary). A shard's
  // stabilisers: mb_ at its first chunk, and leaving it sh_.m_last (shards) or the row's mo_ (a whole segment).
  void launch_bw_combine(int has_dlast, std::vector<KernelEvent>* events) {
    set_args(k_bw_combine_.k, device_->name(), G_, mb_, NCs_, P_ > 1 ? sh_.m_last : mo_, 0, 1, sh_.dc0, sh_.dn0, dCl_,
             dnl_, has_dlast, sh_.dc_last, sh_.dn_last, sh_.dc_end, sh_.dn_end, sh_.G_end, P_, NCs_);
    launch(k_bw_combine_, "shard_bw_combine", 2, {sh_.combine_global(), static_cast<std::size_t>(rows_)},
           {detail::kShardGroup, 1}, events);
  }
  // Work groups per row of the state kernels: 64 x (64 * SVW) tiles of C (DHQK x DHHV).
  std::size_t state_tiles(int svw) const {
    const std::size_t cols = 64 * static_cast<std::size_t>(svw);
    return round_up(static_cast<std::size_t>(p_.DHQK), 64) / 64 *
           (round_up(static_cast<std::size_t>(p_.DHHV), cols) / cols);
  }
  // The walks of the state kernels per row: one per packed sequence (1 unpacked).
  std::size_t sequences() const { return packed_ ? static_cast<std::size_t>(p_.N) : 1; }
  // Work-groups of the per-token kernels (fw_outputs, bw_grads) per (shard) row: CHUNK a chunk (mlstm_chunkwise.cl
  // "Chunks of a row").
  std::size_t token_groups() const { return static_cast<std::size_t>(NCs_) * static_cast<std::size_t>(L_); }
  // Packed: the chunk table (and the segment table `seg`) after a kernel's own arguments (from index `next`).
  void with_tables(const KernelObject& k, cl_uint next, const PooledBuffer* seg = nullptr) const {
    if (!packed_) return;
    const cl_uint after = set_args_from(k.k, device_->name(), next, ctab_);
    if (seg) set_args_from(k.k, device_->name(), after, *seg);
  }
  const char* outputs_kernel_name() const { return regtiled_outputs_ ? "fw_outputs_regtiled" : "fw_outputs"; }
  void launch(const KernelObject& k, const char* name, cl_uint dims, std::initializer_list<std::size_t> global,
              std::initializer_list<std::size_t> local, std::vector<KernelEvent>* events) {
    std::size_t g[3] = {1, 1, 1}, l[3] = {1, 1, 1};
    std::copy(global.begin(), global.end(), g);
    std::copy(local.begin(), local.end(), l);
    cl_event e = nullptr;
    check(clEnqueueNDRangeKernel(device_->profiling_queue(), k.k, dims, nullptr, g, local.size() ? l : nullptr, 0,
                                 nullptr, events ? &e : nullptr),
          name, device_->name());
    if (events) events->emplace_back(name, e);
  }
  void finish() { check(clFinish(device_->profiling_queue()), "clFinish", device_->name()); }

  std::shared_ptr<Device> device_;
  MlstmOptions options_;
  ProblemShape p_;
  DType dev_dtype_ = DType::f32;
  bool outputs_ = true, state_only_ = false, has_grads_ = false, forward_done_ = false, regtiled_outputs_ = false,
       regtiled_backward_ = false, segment_ = false, packed_ = false, fixup_ = false;
  detail::SegmentExchange exchange_;  // as a segment of a split sequence
  int ovw_ = 1, svw_ = 1, svw_bw_ = 1, gvw_ = 1;
  int S_ = 0, rows_ = 0, L_ = 0, nchunks_ = 0, has_init_ = 0, has_dlast_ = 0;
  int P_ = 1, R_ = 0, Ss_ = 0, NCs_ = 0;  // shards per row, shard rows, tokens and chunks per shard
  KernelObject k_gates_, k_weights_, k_states_, k_outputs_, k_prep_, k_bw_states_, k_bw_grads_, k_bw_dk_, k_bw_dv_,
      k_gate_grads_, k_combine_, k_bw_combine_, k_fix_weights_, k_fix_states_, k_bw_fix_weights_, k_bw_fix_states_;
  PooledBuffer q_, k_, v_, i_, f_, C0_, n0_, m0_, b_, ig_, G_, Cb_, nb_, mb_, Co_, no_, mo_, carry_, wtok_, h_, mt_,
      Nt_, dent_, qw_, dh_, dCl_, dnl_, dden_, dCn_, dnn_, dC0_, dn0_, dm0_, dq_, dk_, dv_, qdq_, kdk_, di_, df_;
  detail::ShardBuffers sh_;  // the sequence split's states (P_ > 1)
  // The fix-up's (fixup_): the summary pass's stabilisers, the factors per chunk (fa_ also the backward's), the
  // backward's factor of the gradient entering each shard.
  PooledBuffer mloc_, fa_, fb_, gin_;
  detail::PackedCallTables tables_;  // packed: the chunk and segment tables (kept while the uploads read them)
  PooledBuffer ctab_, stab_, stab_bw_;
};

}  // namespace

ChunkwiseRunner::ChunkwiseRunner(std::shared_ptr<Device> device, Config config)
    : device_(std::move(device)), config_(config) {}

ForwardResult ChunkwiseRunner::forward(const ForwardArgs& a, const MlstmOptions& o) const {
  ResidentPortable r(device_, config_, a, o, nullptr, true);
  r.enqueue_forward(nullptr);
  return r.read_forward();
}

ForwardResult ChunkwiseRunner::last_state(const ForwardArgs& a, const MlstmOptions& o) const {
  MlstmOptions with_states = o;
  with_states.return_last_states = true;
  ResidentPortable r(device_, config_, a, with_states, nullptr, false);
  r.enqueue_forward(nullptr);
  return r.read_forward();
}

BackwardResult ChunkwiseRunner::backward(const BackwardArgs& a, const MlstmOptions& o) const {
  ResidentPortable r(device_, config_, a.inputs, o, &a, true);
  r.enqueue_forward(nullptr);
  r.enqueue_backward(nullptr);
  return r.read_backward();
}

BackwardResult ChunkwiseRunner::state_gradient(const BackwardArgs& a, const MlstmOptions& o) const {
  ResidentPortable r(device_, config_, a.inputs, o, &a, true, /*state_only=*/true);
  r.enqueue_forward(nullptr);
  r.enqueue_state_gradient(nullptr);
  BackwardResult out = r.read_state_gradient();
  detail::set_initial_state_dm(a.inputs, o, out);
  return out;
}

std::unique_ptr<ResidentChunkwise> ChunkwiseRunner::resident(const ForwardArgs& a, const MlstmOptions& o,
                                                             const BackwardArgs* grads) const {
  return std::make_unique<ResidentPortable>(device_, config_, a, o, grads, true);
}

}  // namespace mlstm::opencl
