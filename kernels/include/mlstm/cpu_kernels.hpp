// CPU kernels: float32 compute for any input dtype, float32 states, dense products through CBLAS
// (OpenBLAS serial), work split with TBB across rows (batch x head) and chunk blocks.
// h is returned in q's dtype; dq/dk/dv in q's dtype, di/df in i's dtype; state gradients float32.
#pragma once

#include <cstdint>

#include "mlstm/core/problem.hpp"

namespace mlstm::cpu {

// Chunkwise form (stages.hpp), chunk size options.chunk_size (any; S need not be a multiple).
// tile == 0: the whole chunk at once ("limit chunk"); tile > 0: the chunk is cut into tile x tile blocks
// (TFLA), so the chunk size is not limited by cache.
ForwardResult chunkwise_forward(const ForwardArgs& args, const MlstmOptions& options, std::int64_t tile = 0);
BackwardResult chunkwise_backward(const BackwardArgs& args, const MlstmOptions& options, std::int64_t tile = 0);
// Only the gradient of the state entering the sequence: dc0, dn0 and dm0 of chunkwise_backward (set also when
// no initial state is given: the zero state); dq ... df are left empty. The forward and the reverse state-gradient
// recurrence run, the token gradients do not (about half the work). The flow graph's sequence-parallel backward
// uses it for a segment's local state gradient.
BackwardResult chunkwise_state_gradient(const BackwardArgs& args, const MlstmOptions& options, std::int64_t tile = 0);

// Parallel form: the whole sequence as one chunk, tiled (kParallelTile), so memory stays O(S * tile).
inline constexpr std::int64_t kParallelTile = 64;
ForwardResult parallel_forward(const ForwardArgs& args, const MlstmOptions& options);
BackwardResult parallel_backward(const BackwardArgs& args, const MlstmOptions& options);

// Recurrent form: one step, and a whole sequence step by step (state carried).
StepResult step(const StepArgs& args, const MlstmOptions& options);
ForwardResult sequence_forward(const ForwardArgs& args, const MlstmOptions& options);

}  // namespace mlstm::cpu
