// The float64 reference: the specification every kernel is checked against.
// All results are float64 tensors (h, states and gradients). Inputs may be of any dtype.
#pragma once

#include "mlstm/core/problem.hpp"

namespace mlstm::reference {

// How the backward treats the stabiliser m_t.
//   full: the exact derivative of the forward as computed (m_t = max(...) differentiated through its
//         winning branch); checked against central finite differences in the tests.
//   stop: m_t held constant (what the fast kernels compute; see stages.hpp), the initial m0 excepted.
//         Without last-state gradients the two differ by terms of relative size
//         eps / (max(|q'n|, exp(-m)) + eps). With dc_last/dn_last they differ for real: the returned last
//         state is stabilised by m_S, and stop holds m_S constant (as TFLA does).
enum class StabilizerGradient { full, stop };

// Step by step over S (initial state, last state). The definition.
ForwardResult recurrent_forward(const ForwardArgs& args, const MlstmOptions& options);
BackwardResult recurrent_backward(const BackwardArgs& args, const MlstmOptions& options,
                                  StabilizerGradient mode = StabilizerGradient::full);

// Parallel form with the stabilised (B,NH,S,S) forget-gate matrix; the initial state enters as an extra
// column, and m_t = max(b_t + m0, max_s D_ts) equals the recurrent m_t, so both forms agree to rounding.
ForwardResult parallel_forward(const ForwardArgs& args, const MlstmOptions& options);
BackwardResult parallel_backward(const BackwardArgs& args, const MlstmOptions& options,
                                 StabilizerGradient mode = StabilizerGradient::full);

// One recurrent step.
StepResult step(const StepArgs& args, const MlstmOptions& options);

}  // namespace mlstm::reference
