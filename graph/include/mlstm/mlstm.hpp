// mlstm-flow's public facade: the kernel registry (devices/registry.hpp: CPU, reference and OpenCL kernels), a
// Backend that picks kernels like mlstm_kernels' backend module, and the graph module (runner, streaming).
//
//   #include "mlstm/mlstm.hpp"
//   auto kernel = mlstm::get_kernel("chunkwise--cpu_xl_chunk");
//   mlstm::ForwardResult out = kernel->forward(args, options);   // h, last states
//
//   mlstm::BackendConfig config;                 // chunkwise--cpu_xl_chunk, train mode, chunk 64
//   config.chunk_size = 128;
//   mlstm::Backend backend(config);
//   auto out = backend.forward(args);  auto grads = backend.backward(bwargs);
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "mlstm/core/error.hpp"
#include "mlstm/core/problem.hpp"
#include "mlstm/core/tensor.hpp"
#include "mlstm/devices/registry.hpp"
#include "mlstm/graph/graph.hpp"
#include "mlstm/kernel.hpp"

namespace mlstm {

enum class BackendMode { train, inference };

struct BackendConfig {
  std::string chunkwise_kernel = "chunkwise--cpu_xl_chunk";
  std::string sequence_kernel = "sequence--cpu";
  std::string step_kernel = "cpu";
  std::int64_t chunk_size = kAutoChunk;  // or 1..kMaxChunkSize
  bool return_last_states = true;
  BackendMode mode = BackendMode::train;
  double eps = 1e-6;
  GateVariant gate = GateVariant::exp;
  bool normalize = true;
  std::optional<DType> autocast;  // inputs q, k, v converted to this dtype before the kernel
  std::string device_spec;        // for device kernels (OpenCL); empty = default device
};

// train: the chunkwise kernel, forward and backward. inference: the chunkwise kernel for prefill
// (S > 1) and the step kernel for S == 1 (inputs (B,NH,1,D) are reshaped for it and back).
class Backend {
 public:
  explicit Backend(BackendConfig config);  // InvalidArgument naming the bad field
  const BackendConfig& config() const noexcept { return config_; }
  MlstmOptions options() const;
  ForwardResult forward(const ForwardArgs& args) const;
  BackwardResult backward(const BackwardArgs& args) const;  // train mode only
  // Which kernel a call with sequence length S would use.
  std::string kernel_for(std::int64_t S) const;

 private:
  BackendConfig config_;
  std::unique_ptr<SequenceKernel> chunkwise_;
  std::unique_ptr<StepKernel> step_;
};

}  // namespace mlstm
