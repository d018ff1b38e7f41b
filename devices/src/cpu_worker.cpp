// CPU devices: the graph's workers (one TBB arena per NUMA node, tiled chunkwise kernels) and the registry's CPU
// kernels (one device per algorithm of kernels/cpu_kernels.hpp and kernels/reference.hpp).
#include <spdlog/spdlog.h>
#include <tbb/info.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>
#include <tbb/task_scheduler_observer.h>

#include <optional>

#include "mlstm/core/env.hpp"
#include "mlstm/core/error.hpp"
#include "mlstm/cpu_kernels.hpp"
#include "mlstm/devices/compute_device.hpp"
#include "mlstm/reference.hpp"
#include "mlstm/stages.hpp"

namespace mlstm {

namespace {

// Tile of the TFLA-style chunkwise CPU kernel.
constexpr std::int64_t kCpuTile = 64;
// Largest chunk of the untiled chunkwise CPU kernel.
constexpr std::int64_t kWholeChunkMax = 256;

// Results of the float64 reference in the library's dtypes (h and gradients in their inputs' dtypes, states
// float32).
Tensor to_dtype(const Tensor& t, DType d) { return t.empty() ? Tensor() : t.to(d); }

ForwardResult in_library_dtypes(ForwardResult r, const ProblemShape& p) {
  r.h = to_dtype(r.h, p.dtype);
  r.c = to_dtype(r.c, DType::f32);
  r.n = to_dtype(r.n, DType::f32);
  r.m = to_dtype(r.m, DType::f32);
  return r;
}

BackwardResult in_library_dtypes(BackwardResult r, const ProblemShape& p) {
  r.dq = to_dtype(r.dq, p.dtype);
  r.dk = to_dtype(r.dk, p.dtype);
  r.dv = to_dtype(r.dv, p.dtype);
  r.di = to_dtype(r.di, p.gate_dtype);
  r.df = to_dtype(r.df, p.gate_dtype);
  r.dc0 = to_dtype(r.dc0, DType::f32);
  r.dn0 = to_dtype(r.dn0, DType::f32);
  r.dm0 = to_dtype(r.dm0, DType::f32);
  return r;
}

// fw_gates + fw_states per row (no outputs): the tiled chunkwise kernel's state pass.
ForwardResult chunkwise_states(const ForwardArgs& a, const MlstmOptions& o) {
  const ProblemShape p = validate_forward(a, o);
  ForwardResult out;
  out.c = Tensor({p.B, p.NH, p.DHQK, p.DHHV}, DType::f32);
  out.n = Tensor({p.B, p.NH, p.DHQK}, DType::f32);
  out.m = Tensor({p.B, p.NH}, DType::f32);
  const Tensor k32 = Tensor::copy_of(a.k, DType::f32), v32 = Tensor::copy_of(a.v, DType::f32);
  const Tensor i32 = Tensor::copy_of(a.i, DType::f32), f32 = Tensor::copy_of(a.f, DType::f32);
  const Tensor C0 = Tensor::copy_of(a.c0, DType::f32), n0 = Tensor::copy_of(a.n0, DType::f32),
               m0 = Tensor::copy_of(a.m0, DType::f32);
  const stages::SegmentShape s{p.S, std::min(chunk_of(o), p.S), p.DHQK, p.DHHV, gemm::operands_for(p.dtype)};
  // v where it lies for the products with bf16 operands, when it is contiguous bfloat16.
  const auto* v16 = a.v.dtype() == DType::bf16 && a.v.is_contiguous()
                        ? static_cast<const std::uint16_t*>(static_cast<const void*>(a.v.bytes()))
                        : nullptr;
  tbb::parallel_for(std::int64_t{0}, p.rows(), [&](std::int64_t r) {
    std::vector<float> b(static_cast<std::size_t>(p.S)), B(b.size()), cut(b.size()), ig(b.size()),
        G(static_cast<std::size_t>(s.num_chunks()));
    stages::fw_gates(i32.data<float>() + r * p.S, f32.data<float>() + r * p.S, o.gate, s, b.data(), B.data(),
                     cut.data(), ig.data(), G.data());
    stages::ConstStateRef in(C0.data<float>() + r * p.DHQK * p.DHHV, n0.data<float>() + r * p.DHQK,
                             m0.data<float>() + r);
    stages::StateRef st{out.c.data<float>() + r * p.DHQK * p.DHHV, out.n.data<float>() + r * p.DHQK,
                        out.m.data<float>() + r};
    stages::fw_states_parts(k32.data<float>() + r * p.S * p.DHQK, v32.data<float>() + r * p.S * p.DHHV,
                            stages::Decays{b.data(), B.data(), cut.data()}, ig.data(), G.data(), o.gate, s, in, nullptr,
                            st, stages::SequenceParts::for_rows(s, p.rows()),
                            stages::Bf16Rows{nullptr, nullptr, v16 ? v16 + r * p.S * p.DHHV : nullptr});
  });
  return out;
}

class CpuDevice final : public ComputeDevice {
 public:
  // numa_node >= 0 with concurrency > 0: a worker of the graph in its own arena on that node; concurrency > 0
  // alone: its own arena; otherwise the caller's arena.
  CpuDevice(CpuAlgorithm algorithm, int numa_node, int concurrency) : algorithm_(algorithm), numa_node_(numa_node) {
    if (numa_node >= 0 && concurrency > 0) {
      arena_.emplace(tbb::task_arena::constraints{numa_node, concurrency});
      node_marker_.emplace(*arena_, numa_node);
    } else if (concurrency > 0) {
      arena_.emplace(concurrency);
    }
  }
  std::string name() const override { return "cpu:numa" + std::to_string(numa_node_ < 0 ? 0 : numa_node_); }

  DeviceSupport supports(DeviceStage stage, const ProblemShape&, const MlstmOptions& o) const override {
    const bool gradients = stage == DeviceStage::backward || stage == DeviceStage::state_gradient;
    if (algorithm_ == CpuAlgorithm::sequence && gradients)
      return {"the float32 recurrent form has no backward", "kernel"};
    if (algorithm_ == CpuAlgorithm::chunkwise_whole && o.chunk_size > kWholeChunkMax)
      return {"chunk sizes up to " + std::to_string(kWholeChunkMax) + " only, got " + std::to_string(o.chunk_size) +
                  "; use chunkwise--cpu_xl_chunk for larger chunks",
              "chunk_size"};
    return {};
  }

  ChunkChoice chunk_choice(const ProblemShape& shape, const MlstmOptions&) const override {
    const int threads = arena_ ? arena_->max_concurrency() : tbb::this_task_arena::max_concurrency();
    ChunkChoice c = table_chunk(ChunkFamily::cpu, "", shape, 1, threads);
    if (algorithm_ == CpuAlgorithm::chunkwise_whole) c.chunk = std::min(c.chunk, kWholeChunkMax);
    return c;
  }

  ForwardResult forward(const ForwardArgs& a, const MlstmOptions& options) override {
    const MlstmOptions o = with_chunk(options, shape_hint(a));
    return run([&] {
      switch (algorithm_) {
        case CpuAlgorithm::chunkwise_tiled:
          return cpu::chunkwise_forward(a, o, kCpuTile);
        case CpuAlgorithm::chunkwise_whole:
          return cpu::chunkwise_forward(a, o, 0);
        case CpuAlgorithm::parallel:
          return cpu::parallel_forward(a, o);
        case CpuAlgorithm::sequence:
          return cpu::sequence_forward(a, o);
        case CpuAlgorithm::reference_parallel:
          return in_library_dtypes(reference::parallel_forward(a, o), validate_forward(a, o));
        case CpuAlgorithm::reference_sequence:
          return in_library_dtypes(reference::recurrent_forward(a, o), validate_forward(a, o));
      }
      throw Error("unknown CPU algorithm");
    });
  }

  ForwardResult last_state(const ForwardArgs& a, const MlstmOptions& options) override {
    const MlstmOptions o = with_chunk(options, shape_hint(a));
    // (Packed rows through forward(): the state pass below runs whole rows.)
    if (algorithm_ == CpuAlgorithm::chunkwise_tiled && !a.packed()) return run([&] { return chunkwise_states(a, o); });
    MlstmOptions with_states = o;
    with_states.return_last_states = true;
    ForwardResult r = forward(a, with_states);
    r.h = Tensor();
    return r;
  }

  BackwardResult backward(const BackwardArgs& a, const MlstmOptions& options) override {
    const MlstmOptions o = with_chunk(options, shape_hint(a.inputs));
    return run([&] {
      switch (algorithm_) {
        case CpuAlgorithm::chunkwise_tiled:
          return cpu::chunkwise_backward(a, o, kCpuTile);
        case CpuAlgorithm::chunkwise_whole:
          return cpu::chunkwise_backward(a, o, 0);
        case CpuAlgorithm::parallel:
          return cpu::parallel_backward(a, o);
        case CpuAlgorithm::sequence:
          break;
        // The reference's gradients with the stabiliser held constant, as every fast kernel computes them.
        case CpuAlgorithm::reference_parallel:
          return in_library_dtypes(reference::parallel_backward(a, o, reference::StabilizerGradient::stop),
                                   validate_backward(a, o));
        case CpuAlgorithm::reference_sequence:
          return in_library_dtypes(reference::recurrent_backward(a, o, reference::StabilizerGradient::stop),
                                   validate_backward(a, o));
      }
      throw Error(name() + ": the float32 recurrent form has no backward");
    });
  }

  // The recurrent forms step with their own routines (cpu::step, reference::step) rather than a one-token
  // sequence through forward().
  StepResult step(const StepArgs& a, const MlstmOptions& o) override {
    if (algorithm_ == CpuAlgorithm::sequence) return run([&] { return cpu::step(a, o); });
    if (algorithm_ != CpuAlgorithm::reference_sequence) return ComputeDevice::step(a, o);
    const ProblemShape p = validate_step(a, o);
    StepResult r = run([&] { return reference::step(a, o); });
    r.h = to_dtype(r.h, p.dtype);
    r.c = to_dtype(r.c, DType::f32);
    r.n = to_dtype(r.n, DType::f32);
    r.m = to_dtype(r.m, DType::f32);
    return r;
  }

  BackwardResult state_gradient(const BackwardArgs& a, const MlstmOptions& options) override {
    const MlstmOptions o = with_chunk(options, shape_hint(a.inputs));
    if (algorithm_ == CpuAlgorithm::chunkwise_tiled)
      return run([&] { return cpu::chunkwise_state_gradient(a, o, kCpuTile); });
    return state_gradient_through_backward([&](const BackwardArgs& with_state) { return backward(with_state, o); }, a,
                                           validate_backward(a, o));
  }

 private:
  template <class F>
  auto run(F&& f) -> decltype(f()) {
    if (!arena_) return f();
    decltype(f()) r;
    arena_->execute([&] { r = f(); });
    return r;
  }
  // Marks the threads of a NUMA worker's arena with its node while they work in it, so the CPU kernels' buffer pool
  // hands them buffers of their own node (stages::set_thread_pool_node).
  class NodeMarker final : public tbb::task_scheduler_observer {
   public:
    NodeMarker(tbb::task_arena& arena, int node) : tbb::task_scheduler_observer(arena), node_(node) { observe(true); }
    ~NodeMarker() override { observe(false); }
    void on_scheduler_entry(bool) override { stages::set_thread_pool_node(node_); }
    void on_scheduler_exit(bool) override { stages::set_thread_pool_node(-1); }

   private:
    int node_;
  };

  CpuAlgorithm algorithm_;
  int numa_node_;
  std::optional<tbb::task_arena> arena_;
  std::optional<NodeMarker> node_marker_;  // after arena_: stops observing before the arena goes
};

}  // namespace

std::shared_ptr<ComputeDevice> cpu_device(CpuAlgorithm algorithm) {
  return std::make_shared<CpuDevice>(algorithm, -1, 0);
}

std::vector<std::shared_ptr<ComputeDevice>> cpu_workers() {
  std::vector<std::shared_ptr<ComputeDevice>> out;
  // MLSTM_NUMA=off: one worker, no NUMA query. TBB's topology query loads libtbbbind with RTLD_DEEPBIND,
  // which AddressSanitizer refuses (google/sanitizers#611); the sanitizer runs set it.
  if (env::one_of("MLSTM_NUMA", {"on", "off"}) == "off") {
    out.push_back(std::make_shared<CpuDevice>(CpuAlgorithm::chunkwise_tiled, -1, tbb::info::default_concurrency()));
    spdlog::info("mlstm-flow: 1 CPU worker (MLSTM_NUMA=off)");
    return out;
  }
  const auto nodes = tbb::info::numa_nodes();
  const bool known = nodes.size() > 1 || (nodes.size() == 1 && nodes[0] >= 0);
  if (!known || nodes.size() == 1) {
    out.push_back(std::make_shared<CpuDevice>(CpuAlgorithm::chunkwise_tiled, known ? nodes[0] : -1,
                                              tbb::info::default_concurrency()));
  } else {
    for (int node : nodes) {
      out.push_back(
          std::make_shared<CpuDevice>(CpuAlgorithm::chunkwise_tiled, node, tbb::info::default_concurrency(node)));
    }
  }
  spdlog::info("mlstm-flow: {} CPU worker(s) over NUMA nodes ({} reported by TBB)", out.size(), nodes.size());
  return out;
}

}  // namespace mlstm
