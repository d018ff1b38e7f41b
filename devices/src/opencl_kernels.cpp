#include "mlstm/devices/opencl_kernels.hpp"

#include <sstream>

namespace mlstm::opencl {

namespace {

// Host float32 copy of a view (gates, states).
std::vector<float> as_f32(ConstTensorView t) {
  const Tensor c = Tensor::copy_of(t, DType::f32);
  return std::vector<float>(c.data<float>(), c.data<float>() + c.numel());
}

int dtype_code(DType d) {
  switch (d) {
    case DType::f32: return 0;
    case DType::f16: return 1;
    case DType::bf16: return 2;
    case DType::f64: return 0;  // converted to float32 on upload
  }
  return 0;
}

// RAII for a cl_kernel.
struct KernelHandle {
  cl_kernel k = nullptr;
  ~KernelHandle() {
    if (k) clReleaseKernel(k);
  }
};

template <class... Args>
void set_args(cl_kernel k, const std::string& device, const Args&... args) {
  cl_uint index = 0;
  auto one = [&](const auto& a) {
    using T = std::decay_t<decltype(a)>;
    if constexpr (std::is_same_v<T, Buffer>) {
      cl_mem m = a.get();
      check(clSetKernelArg(k, index++, sizeof(cl_mem), &m), "clSetKernelArg", device);
    } else {
      check(clSetKernelArg(k, index++, sizeof(T), &a), "clSetKernelArg", device);
    }
  };
  (one(args), ...);
}

}  // namespace

ChunkwiseRunner::ChunkwiseRunner(std::shared_ptr<Device> device) : device_(std::move(device)) {}

ForwardResult ChunkwiseRunner::forward(const ForwardArgs& a, const MlstmOptions& o) const { return run(a, o, true); }

ForwardResult ChunkwiseRunner::last_state(const ForwardArgs& a, const MlstmOptions& o) const {
  MlstmOptions with_states = o;
  with_states.return_last_states = true;
  return run(a, with_states, false);
}

ForwardResult ChunkwiseRunner::run(const ForwardArgs& a, const MlstmOptions& o, bool outputs) const {
  const ProblemShape p = validate_forward(a, o);
  Device& dev = *device_;
  const std::string& dn = dev.name();
  const int S = static_cast<int>(p.S), rows = static_cast<int>(p.rows());
  const int L = static_cast<int>(o.chunk_size);
  const int nchunks = (S + L - 1) / L;
  // q, k, v keep their 16-bit dtype on the device; float64 inputs go up as float32.
  const DType dev_dtype = p.dtype == DType::f64 ? DType::f32 : p.dtype;
  const Tensor q = Tensor::copy_of(a.q, dev_dtype), k = Tensor::copy_of(a.k, dev_dtype),
               v = Tensor::copy_of(a.v, dev_dtype);
  const auto i = as_f32(a.i), f = as_f32(a.f);
  std::vector<float> C0(static_cast<std::size_t>(p.rows() * p.DHQK * p.DHHV), 0.f),
      n0(static_cast<std::size_t>(p.rows() * p.DHQK), 0.f), m0(static_cast<std::size_t>(p.rows()), 0.f);
  if (a.has_initial_state()) {
    C0 = as_f32(a.c0);
    n0 = as_f32(a.n0);
    m0 = as_f32(a.m0);
  }
  std::ostringstream opts;
  opts << "-DDHQK=" << p.DHQK << " -DDHHV=" << p.DHHV << " -DCHUNK=" << L << " -DKEY_TILE=" << kKeyTile
       << " -DGATE_EXP=" << (o.gate == GateVariant::exp ? 1 : 0) << " -DNORMALIZE=" << (o.normalize ? 1 : 0)
       << " -DIN_DTYPE=" << dtype_code(dev_dtype) << " -DEPS=" << std::hexfloat << static_cast<float>(o.eps) << "f";
  // The tiled output kernel when its tiles fit in local memory (QB queries x KT keys), else the per-token one.
  int qb = 0, kt = 0;
  for (int cand : {16, 8}) {
    const std::uint64_t bytes = 4ull * (static_cast<std::uint64_t>(cand) * (2 * p.DHQK + p.DHHV + cand + 4));
    if (bytes + 1024 <= dev.info().local_memory && static_cast<std::size_t>(kWorkGroup) <= dev.info().max_work_group) {
      qb = kt = cand;
      break;
    }
  }
  if (qb > 0) opts << " -DQB=" << qb << " -DKT=" << kt << " -DWG=" << kWorkGroup;
  cl_program prog = dev.program("mlstm_chunkwise", opts.str());

  const std::size_t fs = sizeof(float);
  Buffer dq = dev.upload(q.bytes(), q.nbytes()), dk = dev.upload(k.bytes(), k.nbytes()),
         dv = dev.upload(v.bytes(), v.nbytes());
  Buffer di = dev.upload(i.data(), i.size() * fs), df = dev.upload(f.data(), f.size() * fs);
  Buffer db = dev.alloc(static_cast<std::size_t>(rows) * S * fs), dig = dev.alloc(static_cast<std::size_t>(rows) * S * fs),
         dG = dev.alloc(static_cast<std::size_t>(rows) * nchunks * fs);
  Buffer dC0 = dev.upload(C0.data(), C0.size() * fs), dn0 = dev.upload(n0.data(), n0.size() * fs),
         dm0 = dev.upload(m0.data(), m0.size() * fs);
  const std::size_t nb = static_cast<std::size_t>(rows) * nchunks;
  Buffer dCb = dev.alloc(nb * p.DHQK * p.DHHV * fs), dnb = dev.alloc(nb * p.DHQK * fs), dmb = dev.alloc(nb * fs);
  Buffer dCo = dev.alloc(C0.size() * fs), dno = dev.alloc(n0.size() * fs), dmo = dev.alloc(m0.size() * fs);
  Buffer dh = dev.alloc(static_cast<std::size_t>(rows) * S * p.DHHV * dtype_size(dev_dtype));
  Buffer dmt = dev.alloc(static_cast<std::size_t>(rows) * S * fs), dNt = dev.alloc(static_cast<std::size_t>(rows) * S * fs),
         ddt = dev.alloc(static_cast<std::size_t>(rows) * S * fs);

  cl_command_queue queue = dev.queue();
  {
    KernelHandle kh{dev.kernel(prog, "fw_gates")};
    set_args(kh.k, dn, di, df, db, dig, dG, S, nchunks);
    const std::size_t g[2] = {static_cast<std::size_t>(nchunks), static_cast<std::size_t>(rows)};
    check(clEnqueueNDRangeKernel(queue, kh.k, 2, nullptr, g, nullptr, 0, nullptr, nullptr), "fw_gates", dn);
  }
  Buffer dcarry = dev.alloc(nb * fs), dw = dev.alloc(static_cast<std::size_t>(rows) * S * fs);
  {
    KernelHandle kh{dev.kernel(prog, "fw_state_weights")};
    set_args(kh.k, dn, db, dig, dG, dm0, dmb, dcarry, dw, dmo, S, nchunks);
    const std::size_t g[1] = {static_cast<std::size_t>(rows)};
    check(clEnqueueNDRangeKernel(queue, kh.k, 1, nullptr, g, nullptr, 0, nullptr, nullptr), "fw_state_weights", dn);
  }
  {
    KernelHandle kh{dev.kernel(prog, "fw_states")};
    set_args(kh.k, dn, dk, dv, dcarry, dw, dC0, dn0, dCb, dnb, dCo, dno, S, nchunks);
    const std::size_t g[3] = {static_cast<std::size_t>(p.DHHV + 1), static_cast<std::size_t>(p.DHQK),
                              static_cast<std::size_t>(rows)};
    check(clEnqueueNDRangeKernel(queue, kh.k, 3, nullptr, g, nullptr, 0, nullptr, nullptr), "fw_states", dn);
  }
  if (outputs) {
    KernelHandle kh{dev.kernel(prog, qb > 0 ? "fw_outputs_tiled" : "fw_outputs")};
    set_args(kh.k, dn, dq, dk, dv, db, dig, dCb, dnb, dmb, dh, dmt, dNt, ddt, S, nchunks);
    const std::size_t groups = qb > 0 ? static_cast<std::size_t>(nchunks) * static_cast<std::size_t>((L + qb - 1) / qb)
                                      : static_cast<std::size_t>(S);
    const std::size_t g[2] = {groups * kWorkGroup, static_cast<std::size_t>(rows)};
    const std::size_t l[2] = {kWorkGroup, 1};
    check(clEnqueueNDRangeKernel(queue, kh.k, 2, nullptr, g, l, 0, nullptr, nullptr), "fw_outputs", dn);
  }
  ForwardResult out;
  if (outputs) {
    Tensor h({p.B, p.NH, p.S, p.DHHV}, dev_dtype);
    dev.download(dh, h.bytes(), h.nbytes());
    out.h = dev_dtype == p.dtype ? std::move(h) : h.to(p.dtype);
  }
  if (o.return_last_states) {
    out.c = Tensor({p.B, p.NH, p.DHQK, p.DHHV}, DType::f32);
    out.n = Tensor({p.B, p.NH, p.DHQK}, DType::f32);
    out.m = Tensor({p.B, p.NH}, DType::f32);
    dev.download(dCo, out.c.bytes(), out.c.nbytes());
    dev.download(dno, out.n.bytes(), out.n.nbytes());
    dev.download(dmo, out.m.bytes(), out.m.nbytes());
    if (o.gate == GateVariant::sigmoid) std::fill(out.m.data<float>(), out.m.data<float>() + out.m.numel(), 0.f);
  }
  return out;
}

namespace {

class OpenCLChunkwiseKernel final : public SequenceKernel {
 public:
  OpenCLChunkwiseKernel(KernelInfo info, std::shared_ptr<Device> device)
      : info_(std::move(info)), runner_(std::move(device)) {}
  const KernelInfo& info() const noexcept override { return info_; }
  ForwardResult forward(const ForwardArgs& args, const MlstmOptions& options) const override {
    MlstmOptions o = options;
    if (info_.forced_gate) o.gate = *info_.forced_gate;
    return runner_.forward(args, o);
  }
  BackwardResult backward(const BackwardArgs&, const MlstmOptions&) const override {
    throw Error(info_.name + ": the OpenCL backward is not available yet; use chunkwise--cpu_xl_chunk for gradients");
  }

 private:
  KernelInfo info_;
  ChunkwiseRunner runner_;
};

}  // namespace

void register_kernels(KernelRegistry& registry) {
  const std::vector<DType> dtypes{DType::f64, DType::f32, DType::f16, DType::bf16};
  auto add = [&](std::string name, std::optional<GateVariant> gate, std::string description) {
    KernelInfo info{std::move(name), KernelForm::chunkwise, "opencl", false, gate, dtypes, std::move(description)};
    registry.add_sequence(info, [info](const KernelTarget& target) {
      const auto devices = select_devices(target.device_spec);
      return std::make_unique<OpenCLChunkwiseKernel>(info, open_device(devices.front()));
    });
  };
  add("chunkwise--opencl_xl_chunk", std::nullopt, "chunkwise forward, portable OpenCL C 1.2, key-tiled chunks");
  add("chunkwise--opencl_xl_chunk_siging", GateVariant::sigmoid, "chunkwise forward, portable OpenCL, sigmoid input gate");
}

}  // namespace mlstm::opencl
