// Gate functions shared by the float64 reference, the float32 CPU kernels and stages, and the flow-graph
// nodes: one definition each, so that every form computes lf = logsigmoid(f) with the same expression.
// The OpenCL kernels have their own copy in kernels/opencl/common.cl (same expressions, OpenCL C).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

namespace mlstm::gates {

// log(sigmoid(x)), without overflow for either sign of x; logsigmoid(+inf) = 0, logsigmoid(-inf) = -inf.
inline float logsigmoid(float x) { return x >= 0.f ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x)); }
inline double logsigmoid(double x) { return x >= 0 ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x)); }

// sigmoid(x), without overflow for either sign of x.
inline float sigmoid(float x) { return x >= 0.f ? 1.f / (1.f + std::exp(-x)) : std::exp(x) / (1.f + std::exp(x)); }
inline double sigmoid(double x) { return x >= 0 ? 1.0 / (1.0 + std::exp(-x)) : std::exp(x) / (1.0 + std::exp(x)); }

// The input gate the exponential gate computes with: i itself, except that +inf (and a float64 value beyond
// float32's range) is taken as the largest float32, 3.4028235e38 (stages.hpp "Gates at +-inf": the value the float64
// recurrence settles at as i grows). NaN never reaches it (refused).
inline constexpr float kInputGateCeiling = std::numeric_limits<float>::max();
inline float exp_input_gate(float i) { return std::min(i, kInputGateCeiling); }
inline double exp_input_gate(double i) { return std::min(i, static_cast<double>(kInputGateCeiling)); }

// exp(x) of a difference of log weights x, with exp(-inf) = 0 and 0 for the NaN of (-inf) - (-inf): a log
// weight of -inf weighs 0 also against a stabiliser of -inf (the empty state; stages.hpp "Gates at +-inf").
inline float safe_exp(float x) { return std::isnan(x) ? 0.f : std::exp(x); }

// exp(x - m) for a log weight x and a stabiliser m >= x, in float64: a log weight of -inf contributes 0, also
// when m is -inf too (the same limit as safe_exp, tested on x instead of on the difference).
inline double weight(double x, double m) {
  return x == -std::numeric_limits<double>::infinity() ? 0.0 : std::exp(x - m);
}

}  // namespace mlstm::gates
