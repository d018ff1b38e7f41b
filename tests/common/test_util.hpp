// Test helpers: fresh random inputs, comparisons against the float64 reference, and error reports.
// Every comparison appends one line (kernel, what, shape, dtype, max abs/rel error) to
// test_outputs/<suite>.csv in the build tree. Inputs are drawn from seeds derived from a base seed, the test's
// name and the draw's number, so every run (CI's included) draws the same inputs; MLSTM_TEST_SEED=<n> picks
// another base, MLSTM_TEST_SEED=random a fresh one per test (scripts/stress.sh hunts flakes that way).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "mlstm/core/problem.hpp"
#include "mlstm/core/tensor.hpp"

namespace mlstm::testing {

enum class GateRegime {
  typical,  // i ~ N(0,1), f ~ 3 + N(0,1)   (the TFLA benchmark's gates)
  extreme,  // i, f ~ U[-20, 20]
  mixed,    // i ~ N(0,3), f ~ N(0,3)
};

// Gate pre-activations of +-inf written over the drawn gates (stages.hpp "Gates at +-inf"). Positions are per
// row r (shifted by r): chunk boundaries of L = 16/32/64 and tokens inside chunks.
enum class InfGates {
  none,
  forget_neg,   // f = -inf at t in {0, 15, 16, 37, 63, 64, 100, S-1} + r (the state is forgotten there)
  forget_pos,   // f = +inf (lf = 0) at every third token
  input_neg,    // i = -inf at t % 4 == 1 and at t = 0
  all_neg,      // f = i = -inf on the block [S/4, S/2): the state empties, h = 0 there, then starts again
  all_neg_end,  // f = i = -inf on [S/2, S): the state leaves empty (the tensor cores: forward checks only)
  mixed,        // f = -inf at t % 7 == 3, f = +inf at t % 5 == 0, i = -inf at t % 6 == 2
  // Finite gates across the float range (not infinite, but beyond what one float32 cumsum holds):
  forget_finite,  // f in {-FLT_MAX, -1e30, -1e6, -300, -90} at forget_neg's positions, f = 1e30 at t % 5 == 2
  spread,         // input gates far above the rest (i = 300, 1e6, 1e29: at most the gate dtype's largest finite)
                  // at t % 23 == 4 + r, then f = -inf at t % 23 == 9 + r and f = i = -inf on t % 23 in [15, 17]:
                  // the cuts must forget states whose stabiliser lies far above the gates after them
  input_pos,      // i = +inf (taken as the largest float32) where spread puts its large gates, and at t = 1 and
                  // t = S - 2, with spread's cuts (f = -inf) and emptied tokens: the state leaves at m = 3.4e38
};
const char* inf_gates_name(InfGates g);

struct InputSpec {
  std::int64_t B = 1, NH = 1, S = 64, DHQK = 16, DHHV = 16;
  DType dtype = DType::f32;       // q, k, v
  DType gate_dtype = DType::f32;  // i, f
  bool initial_state = false;     // random c0, n0 (and m0 for the exp gate)
  GateVariant gate = GateVariant::exp;
  GateRegime regime = GateRegime::typical;
  InfGates inf = InfGates::none;
  std::string describe() const;  // "B=3 NH=5 S=1000 DHQK=48 DHHV=96 bfloat16 exp init"
};

// Random inputs with dh and last-state gradients for the backward tests (all float32 except as the spec says).
using Inputs = BackwardInputs;

// The seed of this test's next draw: derived from the base seed (default fixed; MLSTM_TEST_SEED=<n> or
// =random), the test's full name and the number of draws it made before. Printed with the replay command.
std::uint64_t fresh_seed();
Inputs make_inputs(const InputSpec& spec, std::uint64_t seed);
// Packed inputs (ForwardArgs::cu_seqlens): sequences of `lengths` one after the other in one row (B = 1, S their
// sum; spec's B and S are ignored), with (N,...) initial states when spec.initial_state (m0 = 0 for the sigmoid
// gate) and (N,...) last-state gradients.
Inputs make_packed_inputs(const std::vector<std::int64_t>& lengths, InputSpec spec, std::uint64_t seed);
// Options of `gate` and chunk size `chunk`, the rest as default.
MlstmOptions options_of(GateVariant gate, std::int64_t chunk);
// Those inputs with the spec that describes them (S their total; for comparisons' records).
struct PackedInputs {
  Inputs in;
  InputSpec spec;
  BackwardArgs args() const { return in.backward_args(); }
};
PackedInputs make_packed(const std::vector<std::int64_t>& lengths, DType dtype, GateVariant gate, bool initial_state,
                         std::uint64_t seed, std::int64_t NH = 2, std::int64_t DHQK = 16, std::int64_t DHHV = 8);
// An InputSpec in one line.
InputSpec spec(std::int64_t B, std::int64_t NH, std::int64_t S, std::int64_t DHQK, std::int64_t DHHV,
               DType dtype = DType::f32, GateVariant gate = GateVariant::exp, bool initial_state = false,
               GateRegime regime = GateRegime::typical);
Tensor random_normal(const Shape& shape, DType dtype, std::mt19937_64& rng, double mean = 0.0, double stddev = 1.0);

struct Comparison {
  double max_abs = 0;  // max |got - ref|
  double max_ref = 0;  // max |ref|
  double rel = 0;      // max_abs / max(max_ref, 1e-30)
  bool finite = true;  // no NaN/Inf in got
  std::int64_t worst_index = -1;
};
Comparison compare(const Tensor& got, const Tensor& ref);

// Compare and record; returns failure if rel > tol or any non-finite value.
::testing::AssertionResult matches(const Tensor& got, const Tensor& ref, double tol, const std::string& kernel,
                                   const std::string& what, const InputSpec& spec);
// Per token (B*NH*S, row-major): the condition number of the normaliser's dot product, from a float64
// recurrence on the given inputs: sum_e |q'_e n_t,e| / max(|q'.n_t|, exp(-m_t)) (1 without a normaliser).
// Relative rounding of size u in the terms (float32 gate cumsums under extreme gates: ~1e-4) moves h_t by
// up to about kappa_t * u: where q'.n_t cancels, any float32 kernel is that far from the float64 reference.
std::vector<double> normaliser_condition(const Inputs& in, const MlstmOptions& o);
// `got` in float64 with the listed tokens (row * S + t of a (B,NH,S,D) tensor) taken from `ref`: for checks
// that leave those tokens out.
Tensor replace_tokens(const Tensor& got, const Tensor& ref, const std::vector<std::int64_t>& tokens);
// matches() over the tokens whose normaliser_condition(in, o) is <= 20 only (got/ref: (B,NH,S,D)); fails when
// fewer than half of the tokens qualify (so the check cannot become vacuous) or any element is non-finite.
::testing::AssertionResult matches_well_conditioned(const Tensor& got, const Tensor& ref, const Inputs& in,
                                                    const MlstmOptions& o, double tol, const std::string& kernel,
                                                    const std::string& what, const InputSpec& spec);
// The tokens (row * S + t) whose normaliser max(|q'.n_t|, exp(-m_t)) is near its kink or ill conditioned:
// |q'.n_t| within 10% of exp(-m_t), or within 4 kappa u of it (kappa = sum |q'_e n_e| / |q'.n_t|, u the
// relative rounding of the kernel's den: the 16-bit unit roundoff for 16-bit inputs, 1e-4 for float32 under
// extreme gates (gate cumsums of ~1e3), 1e-6 otherwise), or where 2 kappa u > 2% (float32; 20% for 16-bit)
// and |q'.n_t| wins the max (the gradient grows as 1 / N^2 there: measured dq of 2e7 off by 3%). There h's gradient jumps
// or is amplified by kappa, so a kernel may legitimately differ from the float64 reference.
// u is the rounding above for `spec`'s dtype and gate regime.
std::vector<std::int64_t> near_normaliser_kink(const Inputs& in, const MlstmOptions& o, const InputSpec& spec);
// Gives those tokens dh = 0 (so the branch does not matter to any gradient) and returns how many there were;
// fails (returns -1) when more than half of the tokens would be silenced.
std::int64_t quiet_normaliser_kinks(Inputs& in, const MlstmOptions& o, const InputSpec& spec);
// dm0 = <dC0, C0> + <dn0, n0> per row is a sum whose terms can cancel to far below their size (extreme gates:
// 1e-5 from terms of 1e-1): |got - ref| <= tol * (sum |dC0 * C0| + sum |dn0 * n0|) per row, with the reference's
// dc0 / dn0 and the initial state c0 / n0 of the inputs.
::testing::AssertionResult dm0_matches(const Tensor& got, const Tensor& ref, const Tensor& ref_dc0,
                                       const Tensor& ref_dn0, const Inputs& in, double tol, const std::string& kernel,
                                       const InputSpec& spec);
// Last states (c, n, m) against the reference's, with an EMPTY state in one canonical form: a row whose m is
// <= -128 (exp(m) = 0 in float32: the tensor cores carry a forgotten state as m - 256 per cut, the recurrence as
// m = -inf, and a state emptied at a huge finite gate of -1e30 is carried as m = -1e30; stages.hpp "Gates at
// +-inf") compares as C = n = 0, m = 0. Otherwise (c, n) are compared under the reference's m (c exp(m - m_ref):
// the same state; a float32 m of 1e6 cannot equal the reference's to its last digit), then m, as matches().
::testing::AssertionResult last_state_matches(const Tensor& c, const Tensor& n, const Tensor& m, const Tensor& ref_c,
                                              const Tensor& ref_n, const Tensor& ref_m, double tol, double m_tol,
                                              const std::string& kernel, const InputSpec& spec);
// Only checks that every element is finite (records the line too).
::testing::AssertionResult all_finite(const Tensor& got, const std::string& kernel, const std::string& what,
                                      const InputSpec& spec);

// A command in a child process (tests of the command line): /bin/sh -c `command`, stdout and stderr to files in
// `dir` (read back and removed); `setup` runs in the child before exec (limits, affinity, environment).
struct CommandRun {
  int code = -1;   // exit code, or -1 when killed by a signal
  int signal = 0;  // the signal that killed it
  std::string out, err;
};
CommandRun run_command(const std::filesystem::path& dir, const std::string& command,
                       const std::function<void()>& setup = {});
std::string slurp(const std::filesystem::path& p);  // a whole file ("" when it cannot be read)
// The argument an InvalidArgument thrown by `fn` names; "<nothing thrown>" or "<other exception: ...>" otherwise.
std::string thrown_argument(const std::function<void()>& fn);
// An empty directory of the running test: <temp>/<prefix><pid>_<test name>, emptied first.
std::filesystem::path fresh_test_dir(const std::string& prefix);
// A refusal: exit code `code`, one line on stderr, naming `argument`.
void expect_refused(const CommandRun& r, int code, const std::string& argument);

// Concatenate along the sequence axis (axis 2) / slice [s0, s1) along it. For state-carry tests.
Tensor slice_seq(const Tensor& t, std::int64_t s0, std::int64_t s1);
Tensor concat_seq(const Tensor& a, const Tensor& b);

// Sets (or, with nullptr, unsets) an environment variable for one scope and restores the old value (ctest sets
// MLSTM_PROGRAM_CACHE).
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    set(value);
  }
  ~ScopedEnv() {
    if (old_)
      ::setenv(name_, old_->c_str(), 1);
    else
      ::unsetenv(name_);
  }
  // Another value (nullptr: unset) for the rest of the scope; the destructor still restores the one before it.
  void set(const char* value) const {
    if (value)
      ::setenv(name_, value, 1);
    else
      ::unsetenv(name_);
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

}  // namespace mlstm::testing
