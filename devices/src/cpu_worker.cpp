// CPU workers: one TBB arena per NUMA node, running the CPU chunkwise kernels (kernels/cpu_kernels.hpp).
#include <spdlog/spdlog.h>
#include <tbb/info.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include "mlstm/core/env.hpp"
#include "mlstm/cpu_kernels.hpp"
#include "mlstm/devices/compute_device.hpp"
#include "mlstm/stages.hpp"

namespace mlstm {

namespace {

constexpr std::int64_t kCpuTile = 64;

class CpuWorker final : public ComputeDevice {
 public:
  CpuWorker(int numa_node, int concurrency)
      : numa_node_(numa_node),
        arena_(numa_node >= 0 ? tbb::task_arena(tbb::task_arena::constraints{numa_node, concurrency})
                              : tbb::task_arena(concurrency)) {}
  std::string name() const override { return "cpu:numa" + std::to_string(numa_node_ < 0 ? 0 : numa_node_); }
  // Every stage of every valid problem: the CPU kernels take any shape, dtype and chunk size.
  DeviceSupport supports(DeviceStage, const ProblemShape&, const MlstmOptions&) const override { return {}; }
  ForwardResult forward(const ForwardArgs& a, const MlstmOptions& o) override {
    ForwardResult r;
    arena_.execute([&] { r = cpu::chunkwise_forward(a, o, kCpuTile); });
    return r;
  }
  ForwardResult last_state(const ForwardArgs& a, const MlstmOptions& o) override {
    ForwardResult r;
    arena_.execute([&] { r = states_only(a, o); });
    return r;
  }
  BackwardResult backward(const BackwardArgs& a, const MlstmOptions& o) override {
    BackwardResult r;
    arena_.execute([&] { r = cpu::chunkwise_backward(a, o, kCpuTile); });
    return r;
  }
  BackwardResult state_gradient(const BackwardArgs& a, const MlstmOptions& o) override {
    BackwardResult r;
    arena_.execute([&] { r = cpu::chunkwise_state_gradient(a, o, kCpuTile); });
    return r;
  }

 private:
  // fw_gates + fw_states per row (no outputs).
  static ForwardResult states_only(const ForwardArgs& a, const MlstmOptions& o) {
    const ProblemShape p = validate_forward(a, o);
    ForwardResult out;
    out.c = Tensor({p.B, p.NH, p.DHQK, p.DHHV}, DType::f32);
    out.n = Tensor({p.B, p.NH, p.DHQK}, DType::f32);
    out.m = Tensor({p.B, p.NH}, DType::f32);
    const Tensor q32k = Tensor::copy_of(a.k, DType::f32), v32 = Tensor::copy_of(a.v, DType::f32);
    const Tensor i32 = Tensor::copy_of(a.i, DType::f32), f32 = Tensor::copy_of(a.f, DType::f32);
    const Tensor C0 = Tensor::copy_of(a.c0, DType::f32), n0 = Tensor::copy_of(a.n0, DType::f32),
                 m0 = Tensor::copy_of(a.m0, DType::f32);
    stages::SegmentShape s{p.S, std::min(o.chunk_size, p.S), p.DHQK, p.DHHV};
    tbb::parallel_for(std::int64_t{0}, p.rows(), [&](std::int64_t r) {
      std::vector<float> b(static_cast<std::size_t>(p.S)), ig(static_cast<std::size_t>(p.S)),
          G(static_cast<std::size_t>(s.num_chunks()));
      stages::fw_gates(i32.data<float>() + r * p.S, f32.data<float>() + r * p.S, o.gate, s, b.data(), ig.data(),
                       G.data());
      stages::ConstStateRef in(C0.data<float>() + r * p.DHQK * p.DHHV, n0.data<float>() + r * p.DHQK,
                               m0.data<float>() + r);
      stages::StateRef st{out.c.data<float>() + r * p.DHQK * p.DHHV, out.n.data<float>() + r * p.DHQK,
                          out.m.data<float>() + r};
      stages::fw_states(q32k.data<float>() + r * p.S * p.DHQK, v32.data<float>() + r * p.S * p.DHHV, b.data(),
                        ig.data(), G.data(), o.gate, s, in, nullptr, st);
    });
    return out;
  }
  int numa_node_;
  tbb::task_arena arena_;
};

}  // namespace

std::vector<std::shared_ptr<ComputeDevice>> cpu_workers() {
  std::vector<std::shared_ptr<ComputeDevice>> out;
  // MLSTM_NUMA=off: one worker, no NUMA query. TBB's topology query loads libtbbbind with RTLD_DEEPBIND,
  // which AddressSanitizer refuses (google/sanitizers#611); the sanitizer runs set it.
  if (env::is("MLSTM_NUMA", "off")) {
    out.push_back(std::make_shared<CpuWorker>(-1, tbb::info::default_concurrency()));
    spdlog::info("mlstm-flow: 1 CPU worker (MLSTM_NUMA=off)");
    return out;
  }
  const auto nodes = tbb::info::numa_nodes();
  const bool known = nodes.size() > 1 || (nodes.size() == 1 && nodes[0] >= 0);
  if (!known || nodes.size() == 1) {
    out.push_back(std::make_shared<CpuWorker>(known ? nodes[0] : -1, tbb::info::default_concurrency()));
  } else {
    for (int node : nodes) {
      out.push_back(std::make_shared<CpuWorker>(node, tbb::info::default_concurrency(node)));
    }
  }
  spdlog::info("mlstm-flow: {} CPU worker(s) over NUMA nodes ({} reported by TBB)", out.size(), nodes.size());
  return out;
}

}  // namespace mlstm
