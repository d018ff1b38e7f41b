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
// The sequence split's combine (stages.hpp "Combine"): a state at stabiliser ml joined by one at mi decayed by the
// log decay G. Returns their joint stabiliser and the factors of the local part (*f_loc) and the decayed part
// (*f_in); a part at -inf weighs nothing (shard_fw_combine, fw_fixup_weights).
inline float combine_m(const float ml, const float mi, const float G, float* f_loc, float* f_in) {
  const float mn = fmax(G + mi, ml);
  *f_loc = mn == -INFINITY ? 0.0f : safe_exp(ml - mn);
  *f_in = mn == -INFINITY ? 0.0f : safe_exp((mi - mn) + G);
  return mn;
}
// The factor of a state gradient carried back over the log decay G, from the stabiliser mo to mi (0 from an EMPTY
// state at mi = -inf; shard_bw_combine, bw_fixup_weights).
inline float combine_decay(const float mi, const float mo, const float G) {
  return mi == -INFINITY ? 0.0f : safe_exp((mi - mo) + G);
}
