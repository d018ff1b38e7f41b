#include "mlstm/devices/opencl_tensor_cores.hpp"
#include "mlstm/core/trace.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>

#include "mlstm/devices/opencl_kernels.hpp"
#include "mlstm/devices/opencl_stream.hpp"
#include "mlstm/core/env.hpp"
#include "opencl_internal.hpp"

#ifndef MLSTM_OPENCL_TENSOR_CORES
#define MLSTM_OPENCL_TENSOR_CORES 1
#endif

namespace mlstm::opencl {

using detail::KernelObject;
using detail::set_args;

namespace {

constexpr cl_device_info kComputeCapabilityMajorNV = 0x4000;  // cl_nv_device_attribute_query
constexpr cl_device_info kComputeCapabilityMinorNV = 0x4001;

bool switched_off_by_environment() {
  const auto v = env::get("MLSTM_TENSOR_CORES");
  if (!v) return false;
  const std::string& s = *v;
  return s == "off" || s == "0" || s == "false" || s == "no";
}

// Largest of max, max/2, ..., 16 dividing n (0 if none).
int pick_tile(std::int64_t n, int max) {
  for (int t = max; t >= 16; t /= 2)
    if (n % t == 0) return t;
  return 0;
}

// Tiles and program options of one problem configuration (see kernels/opencl/tc/README.md).
struct TcConfig {
  int L = 64, KT = 0, VT = 0, OTf = 0, DSf = 0, OTq = 0, DSq = 0, gate_group = 512;
  std::string base;  // options shared by every program

  std::string states(int mode) const {
    return base + " -DKT=" + std::to_string(KT) + " -DVT=" + std::to_string(VT) + " -DMODE=" + std::to_string(mode);
  }
  std::string chunk(int mode, std::int64_t DA, std::int64_t DOUT, int OT, int DS) const {
    std::ostringstream o;
    o << base << " -DMODE=" << mode << " -DDA=" << DA << " -DDOUT=" << DOUT << " -DOT=" << OT << " -DDS=" << DS;
    return o.str();
  }
  std::string gates() const { return base + " -DGG_WG=" + std::to_string(gate_group); }
};

// tc_common.cl followed by one kernel file: the text every tensor-core program is built from. Assembled once
// per file (the program cache hashes it on every lookup, so it must not be rebuilt per call either).
const std::string& source_text(const std::string& body) {
  static std::mutex mutex;
  static std::map<std::string, std::string> texts;  // node-based: references stay valid
  std::lock_guard lock(mutex);
  auto it = texts.find(body);
  if (it == texts.end()) it = texts.emplace(body, kernel_source("tc_common") + "\n" + kernel_source(body)).first;
  return it->second;
}

// ldmatrix address mode per device (the probe result), keyed by cl_device_id.
std::mutex g_probe_mutex;
std::map<cl_device_id, int> g_ldsm;

std::string base_options(const Device& dev, bool emulate, int ldsm) {
  const bool nvidia = dev.info().vendor.find("NVIDIA") != std::string::npos;
  // PoCL miscompiles the barrier-heavy emulation when optimising; at -O0 it is exact.
  std::string o = nvidia && !emulate ? "-cl-std=CL3.0 -cl-mad-enable" : "-cl-std=CL1.2";
  if (emulate) o += " -cl-opt-disable";
  o += " -DTC_EMU=" + std::to_string(emulate ? 1 : 0) + " -DLDSM=" + std::to_string(ldsm);
  return o;
}

// Runs tc_probe_frag with the given LDSM mode and compares the fragments with those that the
// mma.m16n8k16 layout prescribes. True when all four loaders agree.
bool probe_fragments(Device& dev, int ldsm) {
  std::vector<std::uint16_t> src(32 * 32);
  for (int e = 0; e < 32 * 32; ++e) src[static_cast<std::size_t>(e)] = static_cast<std::uint16_t>(e * 7 + 3);
  auto S = [&](int r, int c) { return static_cast<std::uint32_t>(src[static_cast<std::size_t>(r * 32 + c)]); };
  auto pk = [](std::uint32_t lo, std::uint32_t hi) { return lo | (hi << 16); };
  std::vector<std::uint32_t> want(4 * 32 * 4);
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    std::uint32_t* w = &want[static_cast<std::size_t>((0 * 32 + lane) * 4)];  // A[m][k] = S[m][k] at (16, 8)
    w[0] = pk(S(16 + g, 8 + 2 * t), S(16 + g, 9 + 2 * t));
    w[1] = pk(S(24 + g, 8 + 2 * t), S(24 + g, 9 + 2 * t));
    w[2] = pk(S(16 + g, 16 + 2 * t), S(16 + g, 17 + 2 * t));
    w[3] = pk(S(24 + g, 16 + 2 * t), S(24 + g, 17 + 2 * t));
    w = &want[static_cast<std::size_t>((1 * 32 + lane) * 4)];  // A[m][k] = S[k][m] at (8, 16)
    w[0] = pk(S(16 + 2 * t, 8 + g), S(17 + 2 * t, 8 + g));
    w[1] = pk(S(16 + 2 * t, 16 + g), S(17 + 2 * t, 16 + g));
    w[2] = pk(S(24 + 2 * t, 8 + g), S(25 + 2 * t, 8 + g));
    w[3] = pk(S(24 + 2 * t, 16 + g), S(25 + 2 * t, 16 + g));
    w = &want[static_cast<std::size_t>((2 * 32 + lane) * 4)];  // B[k][n] = S[n][k] at (8, 16)
    w[0] = pk(S(8 + g, 16 + 2 * t), S(8 + g, 17 + 2 * t));
    w[1] = pk(S(8 + g, 24 + 2 * t), S(8 + g, 25 + 2 * t));
    w[2] = pk(S(16 + g, 16 + 2 * t), S(16 + g, 17 + 2 * t));
    w[3] = pk(S(16 + g, 24 + 2 * t), S(16 + g, 25 + 2 * t));
    w = &want[static_cast<std::size_t>((3 * 32 + lane) * 4)];  // B[k][n] = S[k][n] at (16, 8)
    w[0] = pk(S(8 + 2 * t, 16 + g), S(9 + 2 * t, 16 + g));
    w[1] = pk(S(16 + 2 * t, 16 + g), S(17 + 2 * t, 16 + g));
    w[2] = pk(S(8 + 2 * t, 24 + g), S(9 + 2 * t, 24 + g));
    w[3] = pk(S(16 + 2 * t, 24 + g), S(17 + 2 * t, 24 + g));
  }
  cl_program prog = dev.program_from_text("tc_gates (fragment probe)", source_text("tc_gates"),
                                          base_options(dev, false, ldsm) + " -DL=64 -DDHQK=64 -DDHHV=64");
  KernelObject k{dev.kernel(prog, "tc_probe_frag")};
  Buffer in = dev.upload(src.data(), src.size() * 2);
  Buffer out = dev.alloc(want.size() * 4);
  set_args(k.k, dev.name(), in, out);
  const std::size_t g = 32, l = 32;
  check(clEnqueueNDRangeKernel(dev.queue(), k.k, 1, nullptr, &g, &l, 0, nullptr, nullptr), "tc_probe_frag",
        dev.name());
  std::vector<std::uint32_t> got(want.size());
  dev.download(out, got.data(), got.size() * 4);
  return got == want;
}

// The ldmatrix mode that the probe accepts on this device (1, 2, then plain loads 0), found once.
int fragment_mode(Device& dev, bool emulate) {
  if (emulate) return 0;
  std::lock_guard lock(g_probe_mutex);
  auto it = g_ldsm.find(dev.info().id);
  if (it != g_ldsm.end()) return it->second;
  int chosen = -1;
  for (int mode : {1, 2, 0}) {
    if (probe_fragments(dev, mode)) {
      chosen = mode;
      break;
    }
    spdlog::warn("mlstm-flow: {}: tensor-core fragment loads with LDSM={} disagree with the mma layout", dev.name(),
                 mode);
  }
  if (chosen < 0)
    throw DeviceError(DeviceError::Kind::build, dev.name(),
                      "tensor-core kernels: no fragment-load mode matches the mma.m16n8k16 layout");
  spdlog::info("mlstm-flow: {}: tensor-core fragment loads use LDSM={}", dev.name(), chosen);
  g_ldsm.emplace(dev.info().id, chosen);
  return chosen;
}

TcConfig make_config(Device& dev, bool emulate, const ProblemShape& p, const MlstmOptions& o) {
  const std::string why = tensor_core_fit(p, o);
  if (!why.empty()) throw InvalidArgument("q", "the tensor-core kernels cannot run this problem: " + why);
  TcConfig c;
  c.L = static_cast<int>(o.chunk_size);
  c.KT = pick_tile(p.DHQK, 64);
  c.VT = pick_tile(p.DHHV, 64);
  // 64 x 64 state tiles. Measured on the H100 at B=1, S=65536 (16 rows, 128 work-groups for 132 SMs):
  // smaller tiles (more work-groups) were not faster (fw 3.08-3.29 ms vs 3.09 ms at 64x64), the per-chunk
  // step is latency-bound. MLSTM_TC_STATE_TILE=KTxVT overrides the choice (tuning).
  if (const auto tile = env::get("MLSTM_TC_STATE_TILE")) {
    int kt = 0, vt = 0;
    if (std::sscanf(tile->c_str(), "%dx%d", &kt, &vt) == 2 && kt >= 16 && vt >= 16 && kt % 16 == 0 && vt % 16 == 0 &&
        p.DHQK % kt == 0 && p.DHHV % vt == 0) {
      c.KT = kt;
      c.VT = vt;
    }
  }
  c.OTf = pick_tile(p.DHHV, c.L >= 128 ? 64 : 128);
  c.DSf = pick_tile(p.DHQK, c.L >= 128 ? 32 : 64);
  c.OTq = pick_tile(p.DHQK, c.L >= 128 ? 64 : 128);
  c.DSq = pick_tile(p.DHHV, c.L >= 128 ? 32 : 64);
  int group = 512;
  while (group > 32 && static_cast<std::size_t>(group) > dev.info().max_work_group) group /= 2;
  c.gate_group = group;
  const int ldsm = fragment_mode(dev, emulate);
  std::ostringstream b;
  b << base_options(dev, emulate, ldsm) << " -DDT_F16=" << (p.dtype == DType::f16 ? 1 : 0) << " -DL=" << c.L
    << " -DDHQK=" << p.DHQK << " -DDHHV=" << p.DHHV << " -DGATE_EXP=" << (o.gate == GateVariant::exp ? 1 : 0)
    << " -DNORMALIZE=" << (o.normalize || o.gate == GateVariant::exp ? 1 : 0) << " -DEPS=" << std::hexfloat
    << static_cast<float>(o.eps) << "f";
  c.base = b.str();
  return c;
}


// One problem on one device with every buffer of the forward and the backward.
class ResidentTensorCore final : public ResidentChunkwise {
 public:
  ResidentTensorCore(std::shared_ptr<Device> device, bool emulate, const ForwardArgs& a, const MlstmOptions& o,
                     const BackwardArgs* grads)
      : device_(std::move(device)), options_(o) {
    shape_ = grads ? validate_backward(*grads, o) : validate_forward(a, o);
    Device& dev = *device_;
    const std::string& dn = dev.name();
    cfg_ = make_config(dev, emulate, shape_, o);
    rows_ = static_cast<int>(shape_.rows());
    S_ = static_cast<int>(shape_.S);
    NC_ = (S_ + cfg_.L - 1) / cfg_.L;
    has_init_ = a.has_initial_state() ? 1 : 0;
    has_grads_ = grads != nullptr;
    has_dlast_ = grads && !grads->dc_last.empty() ? 1 : 0;

    cl_program gates = dev.program_from_text("tc_gates", source_text("tc_gates"), cfg_.gates());
    cl_program fw_states = dev.program_from_text("tc_states", source_text("tc_states"), cfg_.states(0));
    const std::int64_t K = shape_.DHQK, V = shape_.DHHV;
    cl_program fw_out =
        dev.program_from_text("tc_chunk", source_text("tc_chunk"), cfg_.chunk(0, K, V, cfg_.OTf, cfg_.DSf));
    k_gates_ = KernelObject{dev.kernel(gates, "tc_fw_gates")};
    k_fw_states_ = KernelObject{dev.kernel(fw_states, "tc_fw_states")};
    k_fw_outputs_ = KernelObject{dev.kernel(fw_out, "tc_fw_outputs")};
    if (has_grads_) {
      cl_program bw_states = dev.program_from_text("tc_states", source_text("tc_states"), cfg_.states(1));
      k_bw_prep_ = KernelObject{dev.kernel(gates, "tc_bw_prep")};
      k_bw_gate_grads_ = KernelObject{dev.kernel(gates, "tc_bw_gate_grads")};
      k_bw_states_ = KernelObject{dev.kernel(bw_states, "tc_bw_states")};
      k_bw_dq_ = KernelObject{dev.kernel(
          dev.program_from_text("tc_chunk", source_text("tc_chunk"), cfg_.chunk(1, V, K, cfg_.OTq, cfg_.DSq)),
          "tc_bw_dq")};
      k_bw_dk_ = KernelObject{dev.kernel(
          dev.program_from_text("tc_chunk", source_text("tc_chunk"), cfg_.chunk(2, V, K, cfg_.OTq, cfg_.DSq)),
          "tc_bw_dk")};
      k_bw_dv_ = KernelObject{dev.kernel(
          dev.program_from_text("tc_chunk", source_text("tc_chunk"), cfg_.chunk(3, K, V, cfg_.OTf, cfg_.DSf)),
          "tc_bw_dv")};
    }

    // Inputs: q, k, v in their 16-bit type, gates and states as float32.
    const std::size_t tok = static_cast<std::size_t>(rows_) * static_cast<std::size_t>(S_);
    const std::size_t kv = static_cast<std::size_t>(K) * static_cast<std::size_t>(V);
    auto up16 = [&](ConstTensorView t) { return detail::upload_as(dev, t, shape_.dtype); };
    auto up32 = [&](ConstTensorView t) { return detail::upload_as(dev, t, DType::f32); };
    auto f32buf = [&](std::size_t n) { return dev.acquire(std::max<std::size_t>(n, 4) * sizeof(float)); };
    q_ = up16(a.q);
    k_ = up16(a.k);
    v_ = up16(a.v);
    i_ = up32(a.i);
    f_ = up32(a.f);
    if (has_init_) {
      c0_ = up32(a.c0);
      n0_ = up32(a.n0);
      m0_ = up32(a.m0);
    } else {
      c0_ = f32buf(1);
      n0_ = f32buf(1);
      m0_ = f32buf(1);
    }
    gb_ = f32buf(tok);
    gbi_ = f32buf(tok);
    gpm_ = f32buf(tok);
    gG_ = f32buf(static_cast<std::size_t>(rows_) * NC_);
    gA_ = f32buf(static_cast<std::size_t>(rows_) * NC_);
    mst_ = f32buf(static_cast<std::size_t>(rows_) * (NC_ + 1));
    Cst_ = dev.acquire(static_cast<std::size_t>(rows_) * NC_ * kv * 2);
    nst_ = f32buf(static_cast<std::size_t>(rows_) * NC_ * K);
    c_last_ = f32buf(rows_ * kv);
    n_last_ = f32buf(static_cast<std::size_t>(rows_) * K);
    m_last_ = f32buf(static_cast<std::size_t>(rows_));
    h_ = dev.acquire(tok * V * 2);
    Nt_ = f32buf(tok);
    sgt_ = f32buf(tok);
    if (env::is("MLSTM_TC_POISON", "1")) {
      // Debugging aid: every intermediate and output buffer starts as NaN (0xFF bytes), so a read of a value
      // no kernel wrote shows up as NaN in the results.
      const std::uint8_t pattern = 0xff;
      for (const PooledBuffer* b : {&gb_, &gbi_, &gpm_, &gG_, &gA_, &mst_, &Cst_, &nst_, &c_last_, &n_last_, &m_last_, &h_,
                                    &Nt_, &sgt_})
        check(clEnqueueFillBuffer(dev.queue(), b->get(), &pattern, 1, 0, b->bytes(), 0, nullptr, nullptr),
              "clEnqueueFillBuffer", dn);
      check(clFinish(dev.queue()), "clFinish", dn);
    }
    set_args(k_gates_.k, dn, i_, f_, gb_, gbi_, gpm_, gG_, gA_, S_, NC_);
    set_args(k_fw_states_.k, dn, k_, v_, gbi_, gG_, gA_, c0_, n0_, m0_, has_init_, Cst_, nst_, mst_, c_last_, n_last_,
             m_last_, S_, NC_);
    set_args(k_fw_outputs_.k, dn, q_, k_, v_, Cst_, nst_, mst_, gb_, gbi_, gpm_, h_, Nt_, sgt_, S_, NC_);
    if (has_grads_) {
      dh_ = up16(grads->dh);
      if (has_dlast_) {
        dc_last_ = up32(grads->dc_last);
        dn_last_ = up32(grads->dn_last);
      } else {
        dc_last_ = f32buf(1);
        dn_last_ = f32buf(1);
      }
      dden_ = f32buf(tok);
      dCst_ = dev.acquire(static_cast<std::size_t>(rows_) * NC_ * kv * 2);
      dnst_ = f32buf(static_cast<std::size_t>(rows_) * NC_ * K);
      dc0_ = f32buf(rows_ * kv);
      dn0_ = f32buf(static_cast<std::size_t>(rows_) * K);
      dm0_ = f32buf(static_cast<std::size_t>(rows_));
      dq_ = dev.acquire(tok * K * 2);
      dk_ = dev.acquire(tok * K * 2);
      dv_ = dev.acquire(tok * V * 2);
      const int nparts = static_cast<int>(K / cfg_.OTq);
      qdq_ = f32buf(static_cast<std::size_t>(nparts) * tok);
      kdk_ = f32buf(static_cast<std::size_t>(nparts) * tok);
      di_ = f32buf(tok);
      df_ = f32buf(tok);
      set_args(k_bw_prep_.k, dn, dh_, h_, Nt_, sgt_, dden_, S_);
      set_args(k_bw_states_.k, dn, q_, dh_, gb_, gpm_, gG_, mst_, Nt_, dden_, dc_last_, dn_last_, has_dlast_, dCst_,
               dnst_, dc0_, dn0_, S_, NC_);
      set_args(k_bw_dq_.k, dn, dh_, v_, k_, Cst_, nst_, mst_, gb_, gbi_, gpm_, Nt_, dden_, q_, dq_, qdq_, S_, NC_);
      set_args(k_bw_dk_.k, dn, v_, dh_, q_, dCst_, dnst_, mst_, gb_, gbi_, gpm_, gG_, Nt_, dden_, k_, dk_, kdk_, S_,
               NC_);
      set_args(k_bw_dv_.k, dn, k_, q_, dh_, dCst_, mst_, gb_, gbi_, gpm_, gG_, Nt_, dv_, S_, NC_);
      set_args(k_bw_gate_grads_.k, dn, i_, f_, qdq_, kdk_, nparts, dc_last_, dn_last_, c_last_, n_last_, has_dlast_,
               dc0_, dn0_, c0_, n0_, has_init_, di_, df_, dm0_, S_);
    }
  }

  Device& device() const noexcept override { return *device_; }

  void enqueue_forward(std::vector<KernelEvent>* events) override {
    const std::int64_t K = shape_.DHQK, V = shape_.DHHV;
    const std::size_t states_group = static_cast<std::size_t>(2 * cfg_.KT);
    const std::size_t states_global = states_group * static_cast<std::size_t>((K / cfg_.KT) * (V / cfg_.VT));
    launch(k_gates_, "tc_fw_gates", static_cast<std::size_t>(NC_) * cfg_.L, static_cast<std::size_t>(cfg_.L), events);
    launch(k_fw_states_, "tc_fw_states", states_global, states_group, events);
    if (!skip_outputs_)
      launch(k_fw_outputs_, "tc_fw_outputs", static_cast<std::size_t>(2 * cfg_.L) * NC_ * (V / cfg_.OTf),
             static_cast<std::size_t>(2 * cfg_.L), events);
    forward_done_ = true;
  }

  void enqueue_backward(std::vector<KernelEvent>* events) override {
    if (!has_grads_) throw Error("tensor-core resident problem was made without dh: no backward");
    if (!forward_done_ || skip_outputs_) throw Error("tensor-core backward: enqueue the forward (with outputs) first");
    const std::int64_t K = shape_.DHQK, V = shape_.DHHV;
    const std::size_t states_group = static_cast<std::size_t>(2 * cfg_.KT);
    const std::size_t states_global = states_group * static_cast<std::size_t>((K / cfg_.KT) * (V / cfg_.VT));
    const std::size_t L2 = static_cast<std::size_t>(2 * cfg_.L);
    launch(k_bw_prep_, "tc_bw_prep", static_cast<std::size_t>((S_ + 7) / 8) * 256, 256, events);
    launch(k_bw_states_, "tc_bw_states", states_global, states_group, events);
    launch(k_bw_dq_, "tc_bw_dq", L2 * NC_ * static_cast<std::size_t>(K / cfg_.OTq), L2, events);
    launch(k_bw_dk_, "tc_bw_dk", L2 * NC_ * static_cast<std::size_t>(K / cfg_.OTq), L2, events);
    launch(k_bw_dv_, "tc_bw_dv", L2 * NC_ * static_cast<std::size_t>(V / cfg_.OTf), L2, events);
    launch(k_bw_gate_grads_, "tc_bw_gate_grads", static_cast<std::size_t>(cfg_.gate_group),
           static_cast<std::size_t>(cfg_.gate_group), events);
  }

  ForwardResult read_forward() override {
    finish();
    const ProblemShape& p = shape_;
    ForwardResult out;
    if (!skip_outputs_) {
      out.h = Tensor({p.B, p.NH, p.S, p.DHHV}, p.dtype);
      device_->download(h_, out.h.bytes(), out.h.nbytes());
    }
    if (options_.return_last_states) detail::read_last_state(*device_, c_last_, n_last_, m_last_, p, options_.gate, out);
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
      out.dc0 = read32(dc0_, {p.B, p.NH, p.DHQK, p.DHHV});
      out.dn0 = read32(dn0_, {p.B, p.NH, p.DHQK});
      if (options_.gate == GateVariant::exp)
        out.dm0 = read32(dm0_, {p.B, p.NH});
      else
        out.dm0 = Tensor::zeros({p.B, p.NH}, DType::f32);
    }
    return out;
  }

  // last_state(): the forward without the output kernel.
  void skip_outputs() noexcept { skip_outputs_ = true; }

 private:
  void launch(const KernelObject& k, const char* name, std::size_t global0, std::size_t local0,
              std::vector<KernelEvent>* events) {
    const std::size_t global[2] = {global0, static_cast<std::size_t>(rows_)};
    const std::size_t local[2] = {local0, 1};
    cl_event e = nullptr;
    check(clEnqueueNDRangeKernel(device_->profiling_queue(), k.k, 2, nullptr, global, local, 0, nullptr,
                                 events ? &e : nullptr),
          name, device_->name());
    if (events) events->emplace_back(name, e);
  }
  void finish() { check(clFinish(device_->profiling_queue()), "clFinish", device_->name()); }

  std::shared_ptr<Device> device_;
  MlstmOptions options_;
  ProblemShape shape_;
  TcConfig cfg_;
  int rows_ = 0, S_ = 0, NC_ = 0, has_init_ = 0, has_dlast_ = 0;
  bool has_grads_ = false, forward_done_ = false, skip_outputs_ = false;
  KernelObject k_gates_, k_fw_states_, k_fw_outputs_, k_bw_prep_, k_bw_states_, k_bw_dq_, k_bw_dk_, k_bw_dv_,
      k_bw_gate_grads_;
  PooledBuffer q_, k_, v_, i_, f_, c0_, n0_, m0_, gb_, gbi_, gpm_, gG_, gA_, mst_, Cst_, nst_, c_last_, n_last_, m_last_, h_,
      Nt_, sgt_, dh_, dc_last_, dn_last_, dden_, dCst_, dnst_, dc0_, dn0_, dm0_, dq_, dk_, dv_, qdq_, kdk_, di_, df_;
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
    s.reason = "compute capability " + std::to_string(s.compute_major) + "." + std::to_string(s.compute_minor) +
               " < 8.0";
  } else {
    s.available = true;
  }
  return s;
}

std::string tensor_core_fit(const ProblemShape& p, const MlstmOptions& o) {
  if (p.dtype != DType::bf16 && p.dtype != DType::f16)
    return std::string("q/k/v are ") + std::string(dtype_name(p.dtype)) + ", the tensor-core kernels take bfloat16 or float16";
  if (p.DHQK % 16 != 0 || p.DHHV % 16 != 0)
    return "head dims " + std::to_string(p.DHQK) + "x" + std::to_string(p.DHHV) + " are not multiples of 16";
  if (o.chunk_size != 64 && o.chunk_size != 128)
    return "chunk size " + std::to_string(o.chunk_size) + " (the tensor-core kernels take 64 or 128)";
  return {};
}

TensorCoreRunner::TensorCoreRunner(std::shared_ptr<Device> device, Config config)
    : device_(std::move(device)), config_(config) {}

void TensorCoreRunner::prepare(const ProblemShape& p, const MlstmOptions& o) const {
  Device& dev = *device_;
  const TcConfig c = make_config(dev, config_.emulate, p, o);
  dev.program_from_text("tc_gates", source_text("tc_gates"), c.gates());
  dev.program_from_text("tc_states", source_text("tc_states"), c.states(0));
  dev.program_from_text("tc_states", source_text("tc_states"), c.states(1));
  dev.program_from_text("tc_chunk", source_text("tc_chunk"), c.chunk(0, p.DHQK, p.DHHV, c.OTf, c.DSf));
  dev.program_from_text("tc_chunk", source_text("tc_chunk"), c.chunk(1, p.DHHV, p.DHQK, c.OTq, c.DSq));
  dev.program_from_text("tc_chunk", source_text("tc_chunk"), c.chunk(2, p.DHHV, p.DHQK, c.OTq, c.DSq));
  dev.program_from_text("tc_chunk", source_text("tc_chunk"), c.chunk(3, p.DHQK, p.DHHV, c.OTf, c.DSf));
}

std::unique_ptr<ResidentChunkwise> TensorCoreRunner::resident(const ForwardArgs& args, const MlstmOptions& options,
                                                              const BackwardArgs* grads) const {
  return std::make_unique<ResidentTensorCore>(device_, config_.emulate, args, options, grads);
}

ForwardResult TensorCoreRunner::forward(const ForwardArgs& args, const MlstmOptions& options) const {
  ResidentTensorCore r(device_, config_.emulate, args, options, nullptr);
  r.enqueue_forward(nullptr);
  return r.read_forward();
}

ForwardResult TensorCoreRunner::last_state(const ForwardArgs& args, const MlstmOptions& options) const {
  MlstmOptions with_states = options;
  with_states.return_last_states = true;
  ResidentTensorCore r(device_, config_.emulate, args, with_states, nullptr);
  r.skip_outputs();
  r.enqueue_forward(nullptr);
  return r.read_forward();
}

BackwardResult TensorCoreRunner::backward(const BackwardArgs& args, const MlstmOptions& options) const {
  ResidentTensorCore r(device_, config_.emulate, args.inputs, options, &args);
  r.enqueue_forward(nullptr);
  r.enqueue_backward(nullptr);
  return r.read_backward();
}

namespace {

// "B*NH*S" of a (B,NH,S,D) view, for traces.
std::string token_rows(ConstTensorView t) { return std::to_string(t.numel() / std::max<std::int64_t>(1, t.dim(-1))); }

// Per device: whether the tensor-core programs failed to build (then the portable kernels run there).
std::mutex g_state_mutex;
std::map<cl_device_id, bool> g_build_failed;

}  // namespace

AutoChunkwiseRunner::AutoChunkwiseRunner(std::shared_ptr<Device> device, bool require_tensor_cores)
    : device_(device), portable_(device), tensor_cores_(device), require_(require_tensor_cores),
      support_(tensor_core_support(device->info())) {
  if (require_ && !support_.available)
    throw DeviceError(DeviceError::Kind::other, device->name(), "no tensor cores here: " + support_.reason);
}

ForwardResult AutoChunkwiseRunner::forward(const ForwardArgs& args, const MlstmOptions& o) const {
  const ScopedTrace trace([&] { return "forward of " + token_rows(args.q) + " token-rows on " + device_->name(); });
  if (uses_tensor_cores(validate_forward(args, o), o)) return tensor_cores_.forward(args, o);
  return portable_.forward(args, o);
}

ForwardResult AutoChunkwiseRunner::last_state(const ForwardArgs& args, const MlstmOptions& o) const {
  const ScopedTrace trace([&] { return "last_state of " + token_rows(args.q) + " token-rows on " + device_->name(); });
  if (uses_tensor_cores(validate_forward(args, o), o)) return tensor_cores_.last_state(args, o);
  return portable_.last_state(args, o);
}

BackwardResult AutoChunkwiseRunner::backward(const BackwardArgs& args, const MlstmOptions& o) const {
  const ScopedTrace trace([&] { return "backward of " + token_rows(args.dh) + " token-rows on " + device_->name(); });
  if (uses_tensor_cores(validate_backward(args, o), o)) return tensor_cores_.backward(args, o);
  return portable_.backward(args, o);
}

BackwardResult AutoChunkwiseRunner::state_gradient(const BackwardArgs& args, const MlstmOptions& o) const {
  const ScopedTrace trace([&] { return "state_gradient of " + token_rows(args.dh) + " token-rows on " + device_->name(); });
  if (!uses_tensor_cores(validate_backward(args, o), o)) return portable_.state_gradient(args, o);
  // The tensor-core backward computes everything; keep the state gradient. Without an initial state the zero
  // state is passed, so that it returns dc0 / dn0 / dm0.
  const ProblemShape p = validate_backward(args, o);
  BackwardArgs with_init = args;
  Tensor C0, n0, m0;
  if (!args.inputs.has_initial_state()) {
    C0 = Tensor::zeros({p.B, p.NH, p.DHQK, p.DHHV}, DType::f32);
    n0 = Tensor::zeros({p.B, p.NH, p.DHQK}, DType::f32);
    m0 = Tensor::zeros({p.B, p.NH}, DType::f32);
    with_init.inputs.c0 = C0.view();
    with_init.inputs.n0 = n0.view();
    with_init.inputs.m0 = m0.view();
  }
  BackwardResult full = tensor_cores_.backward(with_init, o), out;
  out.dc0 = std::move(full.dc0);
  out.dn0 = std::move(full.dn0);
  out.dm0 = std::move(full.dm0);
  return out;
}

bool AutoChunkwiseRunner::uses_tensor_cores(const ProblemShape& p, const MlstmOptions& o) const {
  if (!support_.available) return false;
  const std::string misfit = tensor_core_fit(p, o);
  if (!misfit.empty()) {
    if (require_) throw InvalidArgument("q", "the tensor-core kernels cannot run this problem: " + misfit);
    spdlog::debug("mlstm-flow: {}: portable kernels: {}", device_->name(), misfit);
    return false;
  }
  const cl_device_id id = device_->info().id;
  {
    std::lock_guard lock(g_state_mutex);
    auto it = g_build_failed.find(id);
    if (it != g_build_failed.end() && it->second && !require_) return false;
  }
  // Building (or finding) the seven programs is only needed once per configuration; the resident problem
  // fetches the ones it uses itself.
  std::ostringstream key;
  key << dtype_name(p.dtype) << '/' << p.DHQK << '/' << p.DHHV << '/' << o.chunk_size << '/' << gate_name(o.gate) << '/'
      << o.normalize << '/' << o.eps;
  {
    std::lock_guard lock(prepared_mutex_);
    if (prepared_.count(key.str())) return true;
  }
  try {
    tensor_cores_.prepare(p, o);
    std::lock_guard lock(prepared_mutex_);
    prepared_.insert(key.str());
  } catch (const DeviceError& e) {
    if (e.kind() != DeviceError::Kind::build || require_) throw;
    std::lock_guard lock(g_state_mutex);
    g_build_failed[id] = true;
    spdlog::warn("mlstm-flow: {}: the tensor-core kernels did not build; using the portable kernels. {}",
                 device_->name(), e.what());
    return false;
  }
  return true;
}

namespace {

class SelectingChunkwiseKernel final : public SequenceKernel {
 public:
  SelectingChunkwiseKernel(KernelInfo info, std::shared_ptr<Device> device, bool require)
      : info_(std::move(info)), runner_(std::move(device), require) {}
  const KernelInfo& info() const noexcept override { return info_; }
  ForwardResult forward(const ForwardArgs& args, const MlstmOptions& options) const override {
    return runner_.forward(args, with_gate(options));
  }
  BackwardResult backward(const BackwardArgs& args, const MlstmOptions& options) const override {
    return runner_.backward(args, with_gate(options));
  }

 private:
  MlstmOptions with_gate(const MlstmOptions& options) const {
    MlstmOptions o = options;
    if (info_.forced_gate) o.gate = *info_.forced_gate;
    return o;
  }
  KernelInfo info_;
  AutoChunkwiseRunner runner_;
};

}  // namespace

void register_tensor_core_kernels(KernelRegistry& registry) {
  const std::vector<DType> all{DType::f64, DType::f32, DType::f16, DType::bf16};
  const std::vector<DType> half{DType::f16, DType::bf16};
  auto add = [&](std::string name, std::optional<GateVariant> gate, bool require, std::string description) {
    KernelInfo info{std::move(name), KernelForm::chunkwise, "opencl", true, gate, require ? half : all,
                    std::move(description)};
    registry.add_sequence(info, [info, require](const KernelTarget& target) {
      const auto devices = select_devices(target.device_spec);
      return std::make_unique<SelectingChunkwiseKernel>(info, open_device(devices.front()), require);
    });
  };
  add("chunkwise--opencl_xl_chunk", std::nullopt, false,
      "chunkwise fw+bw, OpenCL: tensor cores (mma.sync PTX) on NVIDIA sm_80+, portable OpenCL C 1.2 elsewhere");
  add("chunkwise--opencl_xl_chunk_siging", GateVariant::sigmoid, false,
      "chunkwise fw+bw, OpenCL, sigmoid input gate: tensor cores on NVIDIA sm_80+, portable elsewhere");
  add("chunkwise--opencl_tc_xl_chunk", std::nullopt, true,
      "chunkwise fw+bw, NVIDIA tensor cores only (bf16/fp16, head dims multiples of 16, chunk 64|128)");
  add("chunkwise--opencl_tc_xl_chunk_siging", GateVariant::sigmoid, true,
      "chunkwise fw+bw, NVIDIA tensor cores only, sigmoid input gate");
}


// ---- DeviceStream: host streaming with the state on the device -------------------------------------

namespace {

constexpr int kStreamSlots = 3;  // up(p+1), kernels(p) and down(p-1) in flight at once

void release_event(cl_event& e) {
  if (e) clReleaseEvent(e);
  e = nullptr;
}

// Copies `src` (any strides, any dtype) into the contiguous `dst` (its dtype).
void copy_into(ConstTensorView src, TensorView dst) { copy_elements(src, 0, src.numel(), dst.dtype(), dst.bytes()); }

}  // namespace

struct DeviceStream::Slot {
  Buffer pinned_in, pinned_out;                // page-locked host staging (mapped for the stream's life)
  std::byte* host_in = nullptr;
  std::byte* host_out = nullptr;
  Buffer q, k, v, i, f, h;                     // device copies of one piece
  KernelObject gates, states, outputs;         // bound to this slot's buffers
  cl_event up = nullptr, computed = nullptr, down = nullptr;
  std::uint64_t ticket = 0;
  std::int64_t len = 0;
  bool busy = false, taken = true, taking = false;  // guarded by DeviceStream::mutex_
};

struct DeviceStream::Impl {
  cl_command_queue up = nullptr, kernels = nullptr, down = nullptr;
  TcConfig cfg;
  Slot slots[kStreamSlots];
  Buffer gb, gbi, gpm, gG, gA, mst, Cst, nst, Nt, sgt;  // intermediates: one piece computes at a time
  Buffer C[2], n[2], m[2];                               // the state, ping-pong between pieces
  int state = 0;                                         // index of the current state
  bool has_state = false;
  std::size_t q_bytes = 0, v_bytes = 0, g_bytes = 0;     // per-tensor staging sizes at max_piece
};

DeviceStream::DeviceStream(std::shared_ptr<Device> device, Config config, ConstTensorView c0, ConstTensorView n0,
                           ConstTensorView m0)
    : device_(std::move(device)), config_(config), impl_(std::make_unique<Impl>()) {
  Device& dev = *device_;
  const std::string& dn = dev.name();
  const Config& c = config_;
  if (c.B <= 0 || c.NH <= 0) throw InvalidArgument("config", "B and NH must be > 0");
  if (c.max_piece <= 0) throw InvalidArgument("config.max_piece", "must be > 0");
  validate_options(c.options);
  ProblemShape p;
  p.B = c.B; p.NH = c.NH; p.S = c.max_piece; p.DHQK = c.DHQK; p.DHHV = c.DHHV; p.dtype = c.dtype;
  Impl& im = *impl_;
  im.cfg = make_config(dev, c.emulate, p, c.options);
  const std::size_t rows = static_cast<std::size_t>(c.B * c.NH), maxS = static_cast<std::size_t>(c.max_piece);
  const std::size_t es = dtype_size(c.dtype), tok = rows * maxS;
  const std::size_t NC = (maxS + static_cast<std::size_t>(im.cfg.L) - 1) / static_cast<std::size_t>(im.cfg.L);
  const std::size_t K = static_cast<std::size_t>(c.DHQK), V = static_cast<std::size_t>(c.DHHV);
  im.q_bytes = tok * K * es;
  im.v_bytes = tok * V * es;
  im.g_bytes = tok * sizeof(float);
  cl_int err = CL_SUCCESS;
  for (cl_command_queue* q : {&im.up, &im.kernels, &im.down}) {
    *q = clCreateCommandQueue(dev.context(), dev.info().id, CL_QUEUE_PROFILING_ENABLE, &err);
    check(err, "clCreateCommandQueue(stream)", dn);
  }
  cl_program gates = dev.program_from_text("tc_gates", source_text("tc_gates"), im.cfg.gates());
  cl_program states = dev.program_from_text("tc_states", source_text("tc_states"), im.cfg.states(0));
  cl_program outputs = dev.program_from_text(
      "tc_chunk", source_text("tc_chunk"), im.cfg.chunk(0, c.DHQK, c.DHHV, im.cfg.OTf, im.cfg.DSf));
  auto pinned = [&](std::size_t bytes, Buffer& buf, std::byte*& host) {
    cl_mem mem = clCreateBuffer(dev.context(), CL_MEM_READ_WRITE | CL_MEM_ALLOC_HOST_PTR, bytes, nullptr, &err);
    check(err, "clCreateBuffer(pinned staging)", dn);
    buf = Buffer(mem, bytes);
    void* ptr = clEnqueueMapBuffer(im.up, mem, CL_TRUE, CL_MAP_READ | CL_MAP_WRITE, 0, bytes, 0, nullptr, nullptr, &err);
    check(err, "clEnqueueMapBuffer(pinned staging)", dn);
    host = static_cast<std::byte*>(ptr);
  };
  auto f32 = [&](std::size_t n) { return dev.alloc(std::max<std::size_t>(n, 1) * sizeof(float)); };
  for (Slot& s : im.slots) {
    pinned(2 * im.q_bytes + im.v_bytes + 2 * im.g_bytes, s.pinned_in, s.host_in);
    pinned(im.v_bytes, s.pinned_out, s.host_out);
    s.q = dev.alloc(im.q_bytes);
    s.k = dev.alloc(im.q_bytes);
    s.v = dev.alloc(im.v_bytes);
    s.i = dev.alloc(im.g_bytes);
    s.f = dev.alloc(im.g_bytes);
    s.h = dev.alloc(im.v_bytes);
    s.gates = KernelObject{dev.kernel(gates, "tc_fw_gates")};
    s.states = KernelObject{dev.kernel(states, "tc_fw_states")};
    s.outputs = KernelObject{dev.kernel(outputs, "tc_fw_outputs")};
  }
  im.gb = f32(tok); im.gbi = f32(tok); im.gpm = f32(tok); im.Nt = f32(tok); im.sgt = f32(tok);
  im.gG = f32(rows * NC); im.gA = f32(rows * NC); im.mst = f32(rows * (NC + 1));
  im.Cst = dev.alloc(rows * NC * K * V * es);
  im.nst = f32(rows * NC * K);
  for (int j = 0; j < 2; ++j) {
    im.C[j] = f32(rows * K * V);
    im.n[j] = f32(rows * K);
    im.m[j] = f32(rows);
  }
  if (!c0.empty()) {
    auto put = [&](ConstTensorView t, const Buffer& b, const char* name, const Shape& want) {
      if (t.shape() != want) throw InvalidArgument(name, "expected shape " + shape_to_string(want) + ", got " + shape_to_string(t.shape()));
      const Tensor x = Tensor::copy_of(t, DType::f32);
      check(clEnqueueWriteBuffer(im.kernels, b.get(), CL_TRUE, 0, x.nbytes(), x.bytes(), 0, nullptr, nullptr),
            "clEnqueueWriteBuffer(initial state)", dn);
    };
    if (n0.empty() || m0.empty()) throw InvalidArgument("c0", "c0, n0 and m0 must be given together");
    put(c0, im.C[0], "c0", {c.B, c.NH, c.DHQK, c.DHHV});
    put(n0, im.n[0], "n0", {c.B, c.NH, c.DHQK});
    put(m0, im.m[0], "m0", {c.B, c.NH});
    im.has_state = true;
  }
}

DeviceStream::~DeviceStream() {
  if (!impl_) return;
  Impl& im = *impl_;
  for (cl_command_queue q : {im.up, im.kernels, im.down})
    if (q) clFinish(q);
  for (Slot& s : im.slots) {
    release_event(s.up);
    release_event(s.computed);
    release_event(s.down);
    if (s.host_in) clEnqueueUnmapMemObject(im.up, s.pinned_in.get(), s.host_in, 0, nullptr, nullptr);
    if (s.host_out) clEnqueueUnmapMemObject(im.up, s.pinned_out.get(), s.host_out, 0, nullptr, nullptr);
  }
  for (cl_command_queue q : {im.up, im.kernels, im.down}) {
    if (!q) continue;
    clFinish(q);
    clReleaseCommandQueue(q);
  }
}

DeviceStream::Slot& DeviceStream::slot_of(std::uint64_t ticket) { return impl_->slots[ticket % kStreamSlots]; }

void DeviceStream::retire(Slot& s) {
  std::unique_lock lock(mutex_);
  slot_free_.wait(lock, [&] { return !s.taking; });
  if (!s.busy) return;
  cl_event down = s.down;
  clRetainEvent(down);
  lock.unlock();
  const cl_int waited = clWaitForEvents(1, &down);
  clReleaseEvent(down);
  check(waited, "clWaitForEvents(stream download)", device_->name());
  lock.lock();
  slot_free_.wait(lock, [&] { return !s.taking; });  // a take() that started meanwhile finishes first
  if (!s.taken) {
    Tensor h({config_.B, config_.NH, s.len, config_.DHHV}, config_.dtype);
    copy_rows(h.bytes(), 0, s.host_out, 0, 1, h.nbytes());
    finished_.emplace(s.ticket, std::move(h));
  }
  release_event(s.up);
  release_event(s.computed);
  release_event(s.down);
  s.busy = false;
  s.taken = true;
}

DeviceStream::HostPiece DeviceStream::next_piece(std::int64_t len) {
  if (len < 1 || len > config_.max_piece)
    throw InvalidArgument("len", "a piece must have 1.." + std::to_string(config_.max_piece) + " tokens, got " +
                                     std::to_string(len));
  Slot& s = slot_of(next_ticket_);
  retire(s);
  const Impl& im = *impl_;
  const Config& c = config_;
  const std::size_t es = dtype_size(c.dtype);
  std::byte* base = s.host_in;
  HostPiece p;
  p.len = len;
  p.q = TensorView(base, c.dtype, {c.B, c.NH, len, c.DHQK});
  p.k = TensorView(base + im.q_bytes, c.dtype, {c.B, c.NH, len, c.DHQK});
  p.v = TensorView(base + 2 * im.q_bytes, c.dtype, {c.B, c.NH, len, c.DHHV});
  p.i = TensorView(base + 2 * im.q_bytes + im.v_bytes, DType::f32, {c.B, c.NH, len});
  p.f = TensorView(base + 2 * im.q_bytes + im.v_bytes + im.g_bytes, DType::f32, {c.B, c.NH, len});
  (void)es;
  pending_len_ = len;
  return p;
}

std::uint64_t DeviceStream::submit() {
  if (pending_len_ == 0) throw Error("DeviceStream::submit: call next_piece() first");
  Impl& im = *impl_;
  const Config& c = config_;
  const std::string& dn = device_->name();
  const std::uint64_t ticket = next_ticket_++;
  Slot& s = slot_of(ticket);
  const std::int64_t len = pending_len_;
  pending_len_ = 0;
  const std::size_t rows = static_cast<std::size_t>(c.B * c.NH), L = static_cast<std::size_t>(len);
  const std::size_t es = dtype_size(c.dtype);
  const std::size_t qb = rows * L * static_cast<std::size_t>(c.DHQK) * es;
  const std::size_t vb = rows * L * static_cast<std::size_t>(c.DHHV) * es, gbytes = rows * L * sizeof(float);
  cl_event up = nullptr, computed = nullptr, down = nullptr;
  // Uploads (non-blocking, from pinned memory: DMA at full PCIe speed).
  const std::pair<const Buffer*, std::pair<std::size_t, std::size_t>> parts[] = {
      {&s.q, {0, qb}}, {&s.k, {im.q_bytes, qb}}, {&s.v, {2 * im.q_bytes, vb}},
      {&s.i, {2 * im.q_bytes + im.v_bytes, gbytes}}, {&s.f, {2 * im.q_bytes + im.v_bytes + im.g_bytes, gbytes}}};
  for (std::size_t j = 0; j < 5; ++j) {
    const auto& [buf, range] = parts[j];
    cl_event* ev = j == 4 ? &up : nullptr;
    check(clEnqueueWriteBuffer(im.up, buf->get(), CL_FALSE, 0, range.second, s.host_in + range.first, 0, nullptr, ev),
          "clEnqueueWriteBuffer(stream upload)", dn);
    bytes_up_ += range.second;
  }
  clFlush(im.up);
  cl_event after_compute = up;
  if (c.compute) {
    const int S = static_cast<int>(len), NC = (S + im.cfg.L - 1) / im.cfg.L, has_init = im.has_state ? 1 : 0;
    const int from = im.state, to = 1 - im.state;
    set_args(s.gates.k, dn, s.i, s.f, im.gb, im.gbi, im.gpm, im.gG, im.gA, S, NC);
    set_args(s.states.k, dn, s.k, s.v, im.gbi, im.gG, im.gA, im.C[from], im.n[from], im.m[from], has_init, im.Cst, im.nst,
             im.mst, im.C[to], im.n[to], im.m[to], S, NC);
    set_args(s.outputs.k, dn, s.q, s.k, s.v, im.Cst, im.nst, im.mst, im.gb, im.gbi, im.gpm, s.h, im.Nt, im.sgt, S, NC);
    const std::size_t rws = rows, KT = static_cast<std::size_t>(im.cfg.KT);
    const std::size_t sg = 2 * KT * static_cast<std::size_t>((c.DHQK / im.cfg.KT) * (c.DHHV / im.cfg.VT));
    const std::size_t L2 = static_cast<std::size_t>(2 * im.cfg.L);
    const std::size_t g0[3] = {static_cast<std::size_t>(NC) * static_cast<std::size_t>(im.cfg.L), sg,
                               L2 * static_cast<std::size_t>(NC) * static_cast<std::size_t>(c.DHHV / im.cfg.OTf)};
    const std::size_t l0[3] = {static_cast<std::size_t>(im.cfg.L), 2 * KT, L2};
    const cl_kernel ks[3] = {s.gates.k, s.states.k, s.outputs.k};
    for (int j = 0; j < 3; ++j) {
      const std::size_t global[2] = {g0[j], rws}, local[2] = {l0[j], 1};
      check(clEnqueueNDRangeKernel(im.kernels, ks[j], 2, nullptr, global, local, j == 0 ? 1 : 0, j == 0 ? &up : nullptr,
                                   j == 2 ? &computed : nullptr),
            "stream kernels", dn);
    }
    clFlush(im.kernels);
    after_compute = computed;
    im.state = to;
    im.has_state = true;
  } else {
    clRetainEvent(up);
    computed = up;
  }
  check(clEnqueueReadBuffer(im.down, s.h.get(), CL_FALSE, 0, vb, s.host_out, 1, &after_compute, &down),
        "clEnqueueReadBuffer(stream download)", dn);
  clFlush(im.down);
  bytes_down_ += vb;
  {
    std::lock_guard lock(mutex_);
    s.up = up;
    s.computed = computed;
    s.down = down;
    s.ticket = ticket;
    s.len = len;
    s.busy = true;
    s.taken = false;
  }
  tokens_ += len;
  return ticket;
}

std::uint64_t DeviceStream::push(const ForwardArgs& piece) {
  if (piece.has_initial_state()) throw InvalidArgument("c0", "a streamed piece carries no state (the stream does)");
  MlstmOptions o = config_.options;
  const ProblemShape p = validate_forward(piece, o);
  const Config& c = config_;
  if (p.B != c.B || p.NH != c.NH || p.DHQK != c.DHQK || p.DHHV != c.DHHV)
    throw InvalidArgument("q", "piece is (B,NH,S,DHQK,DHHV) = (" + std::to_string(p.B) + "," + std::to_string(p.NH) +
                                   "," + std::to_string(p.S) + "," + std::to_string(p.DHQK) + "," +
                                   std::to_string(p.DHHV) + "), the stream expects B=" + std::to_string(c.B) +
                                   " NH=" + std::to_string(c.NH) + " DHQK=" + std::to_string(c.DHQK) +
                                   " DHHV=" + std::to_string(c.DHHV));
  HostPiece h = next_piece(p.S);
  copy_into(piece.q, h.q);
  copy_into(piece.k, h.k);
  copy_into(piece.v, h.v);
  copy_into(piece.i, h.i);
  copy_into(piece.f, h.f);
  return submit();
}

Tensor DeviceStream::take(std::uint64_t ticket) {
  std::unique_lock lock(mutex_);
  if (auto it = finished_.find(ticket); it != finished_.end()) {
    Tensor h = std::move(it->second);
    finished_.erase(it);
    return h;
  }
  Slot& s = slot_of(ticket);
  if (!s.busy || s.ticket != ticket || s.taken || s.taking)
    throw InvalidArgument("ticket", "no piece " + std::to_string(ticket) + " waiting (already taken or never submitted)");
  s.taking = true;
  cl_event down = s.down;
  clRetainEvent(down);
  lock.unlock();
  const cl_int waited = clWaitForEvents(1, &down);
  clReleaseEvent(down);
  Tensor h;
  if (waited == CL_SUCCESS) {
    h = Tensor({config_.B, config_.NH, s.len, config_.DHHV}, config_.dtype);
    copy_rows(h.bytes(), 0, s.host_out, 0, 1, h.nbytes());
  }
  lock.lock();
  s.taking = false;
  if (waited == CL_SUCCESS) s.taken = true;
  lock.unlock();
  slot_free_.notify_all();
  check(waited, "clWaitForEvents(stream download)", device_->name());
  return h;
}

ConstTensorView DeviceStream::view(std::uint64_t ticket) {
  std::unique_lock lock(mutex_);
  Slot& s = slot_of(ticket);
  if (!s.busy || s.ticket != ticket || s.taken || s.taking)
    throw InvalidArgument("ticket", "no piece " + std::to_string(ticket) + " waiting in its slot (taken, copied aside "
                                    "by a later next_piece(), or never submitted)");
  s.taking = true;
  cl_event down = s.down;
  clRetainEvent(down);
  lock.unlock();
  const cl_int waited = clWaitForEvents(1, &down);
  clReleaseEvent(down);
  lock.lock();
  s.taking = false;
  if (waited == CL_SUCCESS) s.taken = true;
  lock.unlock();
  slot_free_.notify_all();
  check(waited, "clWaitForEvents(stream download)", device_->name());
  return ConstTensorView(s.host_out, config_.dtype, {config_.B, config_.NH, s.len, config_.DHHV});
}

void DeviceStream::finish() {
  for (cl_command_queue q : {impl_->up, impl_->kernels, impl_->down})
    check(clFinish(q), "clFinish(stream)", device_->name());
}

void DeviceStream::read_state(Tensor& C, Tensor& n, Tensor& m) {
  Impl& im = *impl_;
  const Config& c = config_;
  check(clFinish(im.kernels), "clFinish(stream kernels)", device_->name());
  C = Tensor({c.B, c.NH, c.DHQK, c.DHHV}, DType::f32);
  n = Tensor({c.B, c.NH, c.DHQK}, DType::f32);
  m = Tensor({c.B, c.NH}, DType::f32);
  if (!im.has_state) {
    std::memset(C.bytes(), 0, C.nbytes());
    std::memset(n.bytes(), 0, n.nbytes());
    std::memset(m.bytes(), 0, m.nbytes());
    return;
  }
  for (auto [t, b] : {std::pair<Tensor*, const Buffer*>{&C, &im.C[im.state]}, {&n, &im.n[im.state]}, {&m, &im.m[im.state]}})
    check(clEnqueueReadBuffer(im.kernels, b->get(), CL_TRUE, 0, t->nbytes(), t->bytes(), 0, nullptr, nullptr),
          "clEnqueueReadBuffer(stream state)", device_->name());
  if (c.options.gate == GateVariant::sigmoid) std::memset(m.bytes(), 0, m.nbytes());
}

}  // namespace mlstm::opencl
