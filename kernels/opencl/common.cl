// Helpers shared by the portable (mlstm_chunkwise.cl) and the tensor-core (tc/*.cl) kernels. The host prepends
// this text to every program it builds from those files (chunkwise_routine.cpp, tc_program.cpp tc_source_text).
// The C++ side has the same expressions in kernels/include/mlstm/gates.hpp.

// The lf from which on a decay goes to the portable kernels' large-decay channel, and from which on it is a cut
// (stages::kBigDecay, stages::kCutDecay; stages.hpp "Gates at +-inf").
#define BIG_DECAY 32.0f
#define CUT_DECAY 4096.0f
// log(sigmoid(x)), without overflow for either sign of x; logsigmoid(+inf) = 0, logsigmoid(-inf) = -inf.
inline float logsigmoid(float x) { return x >= 0.0f ? -log1p(exp(-x)) : x - log1p(exp(x)); }
// exp of a log-weight difference; (-inf) - (-inf) gives NaN, which means "no contribution".
inline float safe_exp(float x) { return isnan(x) ? 0.0f : exp(x); }
