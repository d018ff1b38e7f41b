#include "test_util.hpp"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <stdexcept>

#include "mlstm/core/error.hpp"

namespace mlstm::testing {

std::string InputSpec::describe() const {
  std::ostringstream os;
  os << "B=" << B << " NH=" << NH << " S=" << S << " DHQK=" << DHQK << " DHHV=" << DHHV << " " << dtype_name(dtype)
     << " gates=" << dtype_name(gate_dtype) << " " << gate_name(gate) << (initial_state ? " init" : "")
     << (regime == GateRegime::extreme ? " extreme"
         : regime == GateRegime::mixed ? " mixed"
                                       : "");
  if (inf != InfGates::none) os << " inf=" << inf_gates_name(inf);
  return os.str();
}

const char* inf_gates_name(InfGates g) {
  switch (g) {
    case InfGates::none:
      return "none";
    case InfGates::forget_neg:
      return "forget_neg";
    case InfGates::forget_pos:
      return "forget_pos";
    case InfGates::input_neg:
      return "input_neg";
    case InfGates::all_neg:
      return "all_neg";
    case InfGates::all_neg_end:
      return "all_neg_end";
    case InfGates::mixed:
      return "mixed";
    case InfGates::forget_finite:
      return "forget_finite";
    case InfGates::spread:
      return "spread";
    case InfGates::input_pos:
      return "input_pos";
  }
  return "?";
}

namespace {
// Whether token t of row r is one of the positions forget_neg cuts at (and forget_finite puts its values at).
bool at_cut_position(std::int64_t t, std::int64_t r, std::int64_t S) {
  for (std::int64_t u : {std::int64_t{0}, std::int64_t{15}, std::int64_t{16}, std::int64_t{37}, std::int64_t{63},
                         std::int64_t{64}, std::int64_t{100}, S - 1}) {
    if (t == std::min(S - 1, u + r)) return true;
  }
  return false;
}

// Writes the +-inf gates of `g` over i and f (B, NH, S), keeping their dtype.
void apply_inf_gates(InfGates g, Tensor& i, Tensor& f) {
  if (g == InfGates::none) return;
  const std::int64_t S = i.dim(2), rows = i.numel() / S;
  auto iv = i.to_vector(), fv = f.to_vector();
  const double inf = INFINITY;
  // The largest finite value of the gates' dtype (16-bit gates round 1e6 to +inf otherwise).
  const double most = i.dtype() == DType::f16 ? 65504.0 : i.dtype() == DType::bf16 ? 3.3e38 : 3.4e38;
  std::int64_t k = 0;  // forget_finite: which value
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t t = 0; t < S; ++t) {
      double& ii = iv[static_cast<std::size_t>(r * S + t)];
      double& ff = fv[static_cast<std::size_t>(r * S + t)];
      switch (g) {
        case InfGates::forget_neg:
          if (at_cut_position(t, r, S)) ff = -inf;
          break;
        case InfGates::forget_pos:
          if (t % 3 == r % 3) ff = inf;
          break;
        case InfGates::input_neg:
          if (t % 4 == 1 || t == 0) ii = -inf;
          break;
        case InfGates::all_neg:
          if (t >= S / 4 + r && t < S / 2 + r) ii = ff = -inf;
          break;
        case InfGates::all_neg_end:
          if (t >= S / 2 + r) ii = ff = -inf;
          break;
        case InfGates::mixed:
          if (t % 7 == 3) ff = -inf;
          if (t % 5 == 0) ff = inf;
          if (t % 6 == 2) ii = -inf;
          break;
        case InfGates::forget_finite: {
          if (t % 5 == 2) ff = std::min(1e30, most);
          if (at_cut_position(t, r, S)) {
            const double values[] = {-3.4e38, -1e30, -1e6, -300.0, -90.0};
            ff = std::max(values[k++ % 5], -most);
          }
          break;
        }
        case InfGates::spread: {
          const std::int64_t u = (t - r % 23 + 23) % 23;
          const double big[] = {300.0, 1e6, 1e29};
          if (u == 4) ii = std::min(big[(t / 23) % 3], most);
          if (u == 9) ff = -inf;
          if (u >= 15 && u <= 17) ii = ff = -inf;
          break;
        }
        case InfGates::input_pos: {
          const std::int64_t u = (t - r % 23 + 23) % 23;
          if (u == 4 || t == 1 || t == S - 2) ii = inf;
          if (u == 9 && t != S - 1) ff = -inf;
          if (u >= 15 && u <= 17 && t < S - 2) ii = ff = -inf;
          break;
        }
        case InfGates::none:
          break;
      }
    }
  }
  i = Tensor::from(iv, i.shape(), i.dtype());
  f = Tensor::from(fv, f.shape(), f.dtype());
}
}  // namespace

namespace {
// The base every test's draws derive from; CI runs with this one, so every run draws the same inputs.
constexpr std::uint64_t kDefaultBaseSeed = 20261202;

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::uint64_t hash_name(const std::string& name) {  // FNV-1a: stable across compilers and runs
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : name) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

// Per test: the base seed (fixed, MLSTM_TEST_SEED=<n>, or fresh per test with MLSTM_TEST_SEED=random) and the
// number of draws so far. Reset at every test start, so a test's draws do not depend on which tests ran before
// it in the same process (ctest runs one test per process; --gtest_repeat and plain runs run many).
struct SeedState {
  std::uint64_t base = kDefaultBaseSeed;
  std::uint64_t draws = 0;
};
SeedState& seed_state() {
  static SeedState state;
  return state;
}

std::uint64_t base_seed_for_next_test() {
  const char* env = std::getenv("MLSTM_TEST_SEED");
  if (env == nullptr || *env == '\0') return kDefaultBaseSeed;
  if (std::string(env) == "random") {
    std::random_device rd;
    return (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  }
  char* end = nullptr;
  const auto value = std::strtoull(env, &end, 10);
  if (end == env || *end != '\0') {
    std::fprintf(stderr, "MLSTM_TEST_SEED=%s: expected a decimal number or 'random'\n", env);
    std::abort();
  }
  return value;
}

class SeedListener : public ::testing::EmptyTestEventListener {
  void OnTestStart(const ::testing::TestInfo&) override { seed_state() = SeedState{base_seed_for_next_test(), 0}; }
};

// Registered before main: every test binary links this file through the helpers it uses.
[[maybe_unused]] const bool seed_listener_registered = [] {
  ::testing::UnitTest::GetInstance()->listeners().Append(new SeedListener);
  return true;
}();

// The OpenCL programs the tests build are cached under the build tree, never in the user's home; a value the
// caller set wins. Child processes (the CLI tests' mlstm) inherit it.
[[maybe_unused]] const bool program_cache_set = [] {
  ::setenv("MLSTM_PROGRAM_CACHE", MLSTM_TEST_PROGRAM_CACHE_DIR, 0);
  return true;
}();
}  // namespace

std::uint64_t fresh_seed() {
  auto& state = seed_state();
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const std::string name = info ? std::string(info->test_suite_name()) + "." + info->name() : "";
  const std::uint64_t draw = state.draws++;
  const std::uint64_t seed = splitmix64(state.base ^ splitmix64(hash_name(name) + draw));
  ::testing::Test::RecordProperty("seed_base", std::to_string(state.base));
  std::printf("[ seed     ] draw %llu from MLSTM_TEST_SEED=%llu (replay: MLSTM_TEST_SEED=%llu --gtest_filter=%s)\n",
              static_cast<unsigned long long>(draw), static_cast<unsigned long long>(state.base),
              static_cast<unsigned long long>(state.base), name.c_str());
  return seed;
}

Tensor random_normal(const Shape& shape, DType dtype, std::mt19937_64& rng, double mean, double stddev) {
  std::normal_distribution<double> dist(mean, stddev);
  std::vector<double> v(static_cast<std::size_t>(shape_numel(shape)));
  for (auto& x : v) x = dist(rng);
  return Tensor::from(v, shape, dtype);
}

namespace {
Tensor random_uniform(const Shape& shape, DType dtype, std::mt19937_64& rng, double lo, double hi) {
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(static_cast<std::size_t>(shape_numel(shape)));
  for (auto& x : v) x = dist(rng);
  return Tensor::from(v, shape, dtype);
}
}  // namespace

Inputs make_packed_inputs(const std::vector<std::int64_t>& lengths, InputSpec s, std::uint64_t seed) {
  const auto N = static_cast<std::int64_t>(lengths.size());
  s.B = 1;
  s.S = 0;
  for (const std::int64_t len : lengths) s.S += len;
  const bool init = s.initial_state;
  s.initial_state = false;
  Inputs in = make_inputs(s, seed);
  in.cu_seqlens = {0};
  for (const std::int64_t len : lengths) in.cu_seqlens.push_back(in.cu_seqlens.back() + len);
  std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ull);
  if (init) {
    in.c0 = random_normal({N, s.NH, s.DHQK, s.DHHV}, DType::f32, rng, 0.0, 0.5);
    in.n0 = random_normal({N, s.NH, s.DHQK}, DType::f32, rng, 0.0, 0.5);
    in.m0 = s.gate == GateVariant::exp ? random_normal({N, s.NH}, DType::f32, rng, 0.0, 1.0)
                                       : Tensor::zeros({N, s.NH}, DType::f32);
  }
  in.dc_last = random_normal({N, s.NH, s.DHQK, s.DHHV}, DType::f32, rng, 0.0, 0.1);
  in.dn_last = random_normal({N, s.NH, s.DHQK}, DType::f32, rng, 0.0, 0.1);
  return in;
}

MlstmOptions options_of(GateVariant gate, std::int64_t chunk) {
  MlstmOptions o;
  o.gate = gate;
  o.chunk_size = chunk;
  return o;
}

PackedInputs make_packed(const std::vector<std::int64_t>& lengths, DType dtype, GateVariant gate, bool initial_state,
                         std::uint64_t seed, std::int64_t NH, std::int64_t DHQK, std::int64_t DHHV) {
  PackedInputs p;
  p.in = make_packed_inputs(lengths, spec(1, NH, 1, DHQK, DHHV, dtype, gate, initial_state), seed);
  p.spec = spec(1, NH, p.in.cu_seqlens.back(), DHQK, DHHV, dtype, gate, initial_state);
  return p;
}

Inputs make_inputs(const InputSpec& s, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  Inputs in;
  in.q = random_normal({s.B, s.NH, s.S, s.DHQK}, s.dtype, rng);
  in.k = random_normal({s.B, s.NH, s.S, s.DHQK}, s.dtype, rng);
  in.v = random_normal({s.B, s.NH, s.S, s.DHHV}, s.dtype, rng);
  switch (s.regime) {
    case GateRegime::typical:
      in.i = random_normal({s.B, s.NH, s.S}, s.gate_dtype, rng, 0.0, 1.0);
      in.f = random_normal({s.B, s.NH, s.S}, s.gate_dtype, rng, 3.0, 1.0);
      break;
    case GateRegime::extreme:
      in.i = random_uniform({s.B, s.NH, s.S}, s.gate_dtype, rng, -20.0, 20.0);
      in.f = random_uniform({s.B, s.NH, s.S}, s.gate_dtype, rng, -20.0, 20.0);
      break;
    case GateRegime::mixed:
      in.i = random_normal({s.B, s.NH, s.S}, s.gate_dtype, rng, 0.0, 3.0);
      in.f = random_normal({s.B, s.NH, s.S}, s.gate_dtype, rng, 0.0, 3.0);
      break;
  }
  apply_inf_gates(s.inf, in.i, in.f);
  if (s.initial_state) {
    in.c0 = random_normal({s.B, s.NH, s.DHQK, s.DHHV}, DType::f32, rng, 0.0, 0.5);
    in.n0 = random_normal({s.B, s.NH, s.DHQK}, DType::f32, rng, 0.0, 0.5);
    in.m0 = s.gate == GateVariant::exp ? random_normal({s.B, s.NH}, DType::f32, rng, 0.0, 1.0)
                                       : Tensor::zeros({s.B, s.NH}, DType::f32);
  }
  in.dh = random_normal({s.B, s.NH, s.S, s.DHHV}, DType::f32, rng);
  in.dc_last = random_normal({s.B, s.NH, s.DHQK, s.DHHV}, DType::f32, rng, 0.0, 0.1);
  in.dn_last = random_normal({s.B, s.NH, s.DHQK}, DType::f32, rng, 0.0, 0.1);
  return in;
}

Comparison compare(const Tensor& got, const Tensor& ref) {
  Comparison c;
  if (got.shape() != ref.shape()) {
    c.finite = false;
    c.rel = INFINITY;
    return c;
  }
  const auto g = got.to_vector();
  const auto r = ref.to_vector();
  for (std::size_t e = 0; e < g.size(); ++e) {
    if (!std::isfinite(g[e])) {
      c.finite = false;
      c.worst_index = static_cast<std::int64_t>(e);
      continue;
    }
    const double d = std::fabs(g[e] - r[e]);
    if (d > c.max_abs) {
      c.max_abs = d;
      if (c.finite) c.worst_index = static_cast<std::int64_t>(e);
    }
    c.max_ref = std::max(c.max_ref, std::fabs(r[e]));
  }
  c.rel = c.max_abs / std::max(c.max_ref, 1e-30);
  if (!c.finite) c.rel = INFINITY;
  return c;
}

namespace {
std::mutex report_mutex;

void record(const std::string& kernel, const std::string& what, const InputSpec& spec, const Comparison& c,
            double tol) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const std::string suite = info ? info->test_suite_name() : "misc";
  std::string safe = suite;
  for (auto& ch : safe) {
    if (ch == '/') ch = '_';
  }
  std::lock_guard lock(report_mutex);
  std::filesystem::create_directories(MLSTM_TEST_OUTPUT_DIR);
  const auto path = std::filesystem::path(MLSTM_TEST_OUTPUT_DIR) / (safe + ".csv");
  const bool fresh = !std::filesystem::exists(path);
  std::ofstream os(path, std::ios::app);
  if (fresh) os << "test,kernel,what,shape,max_abs_err,max_abs_ref,rel_err,tolerance,finite\n";
  os << (info ? info->name() : "?") << ',' << kernel << ',' << what << ",\"" << spec.describe() << "\"," << c.max_abs
     << ',' << c.max_ref << ',' << c.rel << ',' << tol << ',' << (c.finite ? 1 : 0) << '\n';
}
}  // namespace

::testing::AssertionResult matches(const Tensor& got, const Tensor& ref, double tol, const std::string& kernel,
                                   const std::string& what, const InputSpec& spec) {
  if (got.shape() != ref.shape()) {
    return ::testing::AssertionFailure() << kernel << " " << what << ": shape " << shape_to_string(got.shape())
                                         << " != reference " << shape_to_string(ref.shape());
  }
  const Comparison c = compare(got, ref);
  record(kernel, what, spec, c, tol);
  if (!c.finite) {
    return ::testing::AssertionFailure() << kernel << " " << what << " [" << spec.describe()
                                         << "]: non-finite value at flat index " << c.worst_index;
  }
  if (!(c.rel <= tol)) {
    return ::testing::AssertionFailure() << kernel << " " << what << " [" << spec.describe() << "]: rel error " << c.rel
                                         << " > " << tol << " (max abs " << c.max_abs << " at flat index "
                                         << c.worst_index << ", max |ref| " << c.max_ref << ")";
  }
  return ::testing::AssertionSuccess();
}

namespace {

// The float64 recurrence of n_t (with the stabiliser m_t) on the given inputs; for every token calls
// visit(token index row * S + t, den = q'.n_t, terms = sum_e |q'_e n_t,e|, m_t).
template <class Visit>
void for_each_normaliser(const Inputs& in, const MlstmOptions& o, Visit&& visit) {
  const Tensor q = in.q.to(DType::f64), k = in.k.to(DType::f64), ig = in.i.to(DType::f64), fg = in.f.to(DType::f64);
  const std::int64_t B = q.dim(0), NH = q.dim(1), S = q.dim(2), K = q.dim(3);
  const bool init = !in.c0.empty();
  const Tensor n0 = init ? in.n0.to(DType::f64) : Tensor(), m0 = init ? in.m0.to(DType::f64) : Tensor();
  const double scale = 1.0 / std::sqrt(static_cast<double>(K));
  auto logsig = [](double x) { return x < 0 ? x - std::log1p(std::exp(x)) : -std::log1p(std::exp(-x)); };
  for (std::int64_t r = 0; r < B * NH; ++r) {
    std::vector<double> n(static_cast<std::size_t>(K), 0.0);
    double m = 0.0;
    if (init) {
      for (std::int64_t e = 0; e < K; ++e) n[static_cast<std::size_t>(e)] = n0.data<double>()[r * K + e];
      m = o.gate == GateVariant::exp ? m0.data<double>()[r] : 0.0;
    }
    for (std::int64_t t = 0; t < S; ++t) {
      const double lf = logsig(fg.data<double>()[r * S + t]);
      double iv = ig.data<double>()[r * S + t];
      double a = 0.0, b = 0.0, mt = 0.0;
      if (o.gate == GateVariant::exp) {  // with the limits at +-inf (reference_recurrent.cpp)
        iv = std::min(iv, static_cast<double>(std::numeric_limits<float>::max()));  // i = +inf (gates.hpp)
        const double cand = lf == -INFINITY ? -INFINITY : lf + m;
        mt = std::max(cand, iv);
        a = cand == -INFINITY ? 0.0 : std::exp(lf + (m - mt));
        b = iv == -INFINITY ? 0.0 : std::exp(iv - mt);
      } else {
        a = std::exp(lf);
        b = 1.0 / (1.0 + std::exp(-iv));
      }
      double den = 0.0, terms = 0.0;
      for (std::int64_t e = 0; e < K; ++e) {
        double& ne = n[static_cast<std::size_t>(e)];
        ne = a * ne + b * k.data<double>()[(r * S + t) * K + e];
        const double term = scale * q.data<double>()[(r * S + t) * K + e] * ne;
        den += term;
        terms += std::abs(term);
      }
      m = mt;
      visit(r * S + t, den, terms, mt);
    }
  }
}

}  // namespace

std::vector<double> normaliser_condition(const Inputs& in, const MlstmOptions& o) {
  std::vector<double> kappa(static_cast<std::size_t>(in.q.numel() / in.q.dim(3)), 1.0);
  if (o.gate == GateVariant::sigmoid && !o.normalize) return kappa;
  for_each_normaliser(in, o, [&](std::int64_t token, double den, double terms, double m) {
    kappa[static_cast<std::size_t>(token)] = terms / std::max(std::abs(den), std::exp(-m));
  });
  return kappa;
}

Tensor replace_tokens(const Tensor& got, const Tensor& ref, const std::vector<std::int64_t>& tokens) {
  if (got.shape() != ref.shape() || got.dims() != 4)
    throw std::invalid_argument("replace_tokens: shapes differ or not 4-d");
  Tensor out = got.to(DType::f64);
  const Tensor r = ref.to(DType::f64);
  const std::int64_t D = got.dim(3);
  for (const std::int64_t t : tokens) std::copy_n(r.data<double>() + t * D, D, out.data<double>() + t * D);
  return out;
}

::testing::AssertionResult matches_well_conditioned(const Tensor& got, const Tensor& ref, const Inputs& in,
                                                    const MlstmOptions& o, double tol, const std::string& kernel,
                                                    const std::string& what, const InputSpec& spec) {
  constexpr double kappa_max = 20.0, min_fraction = 0.5;
  const std::vector<double> kappa = normaliser_condition(in, o);
  if (got.shape() != ref.shape() || got.dims() != 4 ||
      static_cast<std::int64_t>(kappa.size()) * got.dim(3) != got.numel()) {
    return ::testing::AssertionFailure() << kernel << " " << what << ": shapes do not fit the token mask";
  }
  if (auto finite = all_finite(got, kernel, what, spec); !finite) return finite;
  std::vector<std::int64_t> excluded;
  for (std::size_t t = 0; t < kappa.size(); ++t) {
    if (!(kappa[t] <= kappa_max)) excluded.push_back(static_cast<std::int64_t>(t));
  }
  const std::size_t kept = kappa.size() - excluded.size();
  if (static_cast<double>(kept) < min_fraction * static_cast<double>(kappa.size())) {
    return ::testing::AssertionFailure() << kernel << " " << what << " [" << spec.describe() << "]: only " << kept
                                         << " of " << kappa.size()
                                         << " tokens have a normaliser condition <= " << kappa_max;
  }
  const Tensor masked = replace_tokens(got, ref, excluded);
  const Tensor r = ref.to(DType::f64);
  return matches(masked, r, tol, kernel, what + " (tokens with kappa <= " + std::to_string(kappa_max) + ")", spec);
}

namespace {
// The relative rounding u of a kernel's den for this spec (near_normaliser_kink in test_util.hpp).
double kernel_roundoff(const InputSpec& spec) {
  if (spec.dtype == DType::bf16) return std::ldexp(1.0, -8);
  if (spec.dtype == DType::f16) return std::ldexp(1.0, -11);
  // Gates at +-inf and across the float range (large decays, input gates of 1e6): rounding like extreme gates.
  return spec.regime == GateRegime::extreme || spec.inf != InfGates::none ? 1e-4 : 1e-6;
}
}  // namespace

std::vector<std::int64_t> near_normaliser_kink(const Inputs& in, const MlstmOptions& o, const InputSpec& spec) {
  const double u = kernel_roundoff(spec);
  std::vector<std::int64_t> near;
  if (!o.normalize && o.gate == GateVariant::sigmoid) return near;
  for_each_normaliser(in, o, [&](std::int64_t token, double den, double terms, double m) {
    const double kappa = terms / std::max(std::abs(den), 1e-300);
    const double ratio = std::abs(den) / std::exp(-m);
    // Near the kink, or so ill conditioned that rounding of u moves the token's gradient (which grows as
    // 1 / N^2 where N = |q'.n_t| wins) by more than 2% (float32) or 20% (16-bit inputs and states: a
    // token at kappa = 1e4 put the tensor-core dq 30% off its size there under extreme gates, and at 50% a
    // token at kappa = 32 left the tensor-core di of the tokens before it 6.4e-2 off in 1 of 150 draws).
    const bool amplified = 2.0 * kappa * u > (u <= 1e-4 ? 0.02 : 0.2) && std::abs(den) > std::exp(-m);
    if (std::abs(ratio - 1.0) < std::max(0.1, 4.0 * kappa * u) || amplified) near.push_back(token);
  });
  return near;
}

std::int64_t quiet_normaliser_kinks(Inputs& in, const MlstmOptions& o, const InputSpec& spec) {
  const auto near = near_normaliser_kink(in, o, spec);
  if (static_cast<std::int64_t>(near.size()) * 2 > spec.B * spec.NH * spec.S) return -1;
  const std::int64_t V = in.dh.dim(3);
  for (const std::int64_t token : near) std::fill_n(in.dh.data<float>() + token * V, V, 0.0f);
  return static_cast<std::int64_t>(near.size());
}

::testing::AssertionResult dm0_matches(const Tensor& got, const Tensor& ref, const Tensor& ref_dc0,
                                       const Tensor& ref_dn0, const Inputs& in, double tol, const std::string& kernel,
                                       const InputSpec& spec) {
  if (got.numel() != ref.numel() || in.c0.empty())
    return ::testing::AssertionFailure() << kernel << " dm0: sizes differ or no initial state";
  const Tensor g = got.to(DType::f64), r = ref.to(DType::f64), dC = ref_dc0.to(DType::f64), dn = ref_dn0.to(DType::f64),
               C = in.c0.to(DType::f64), n = in.n0.to(DType::f64);
  const std::int64_t rows = r.numel(), kv = C.numel() / rows, k = n.numel() / rows;
  for (std::int64_t row = 0; row < rows; ++row) {
    double terms = 0.0;
    for (std::int64_t e = 0; e < kv; ++e)
      terms += std::abs(dC.data<double>()[row * kv + e] * C.data<double>()[row * kv + e]);
    for (std::int64_t e = 0; e < k; ++e)
      terms += std::abs(dn.data<double>()[row * k + e] * n.data<double>()[row * k + e]);
    const double err = std::abs(g.data<double>()[row] - r.data<double>()[row]);
    if (!std::isfinite(g.data<double>()[row]) || err > tol * terms + 1e-30) {
      return ::testing::AssertionFailure()
             << kernel << " dm0 [" << spec.describe() << "] row " << row << ": got " << g.data<double>()[row]
             << ", reference " << r.data<double>()[row] << ", error " << err << " > " << tol << " * " << terms
             << " (sum of |terms|)";
    }
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult last_state_matches(const Tensor& c, const Tensor& n, const Tensor& m, const Tensor& ref_c,
                                              const Tensor& ref_n, const Tensor& ref_m, double tol, double m_tol,
                                              const std::string& kernel, const InputSpec& spec) {
  if (c.numel() != ref_c.numel() || n.numel() != ref_n.numel() || m.numel() != ref_m.numel() || m.numel() == 0)
    return ::testing::AssertionFailure() << kernel << " last state: sizes differ or no last state";
  auto canonical = [](const Tensor& cc, const Tensor& nn, const Tensor& mm, Tensor& oc, Tensor& on, Tensor& om) {
    auto cv = cc.to_vector(), nv = nn.to_vector(), mv = mm.to_vector();
    const std::size_t rows = mv.size(), kv = cv.size() / rows, k = nv.size() / rows;
    for (std::size_t r = 0; r < rows; ++r) {
      if (!(mv[r] <= -128.0)) continue;  // NaN stays (and fails)
      std::fill_n(cv.begin() + static_cast<std::ptrdiff_t>(r * kv), kv, 0.0);
      std::fill_n(nv.begin() + static_cast<std::ptrdiff_t>(r * k), k, 0.0);
      mv[r] = 0.0;
    }
    oc = Tensor::from(cv, cc.shape(), DType::f64);
    on = Tensor::from(nv, nn.shape(), DType::f64);
    om = Tensor::from(mv, mm.shape(), DType::f64);
  };
  Tensor gc, gn, gm, rc, rn, rm;
  canonical(c, n, m, gc, gn, gm);
  canonical(ref_c, ref_n, ref_m, rc, rn, rm);
  // The state is (C, n) under its stabiliser: exp(m) C is what it means. A float32 m of 1e6 (input gates that
  // large) cannot equal the reference's to the last digit, and its (C, n) follow its own m: compare them under
  // the reference's m, C exp(m - m_ref).
  {
    auto cv = gc.to_vector(), nv = gn.to_vector();
    const auto mv = gm.to_vector(), rv = rm.to_vector();
    const std::size_t rows = mv.size(), kv = cv.size() / rows, k = nv.size() / rows;
    for (std::size_t r = 0; r < rows; ++r) {
      const double scale = std::exp(mv[r] - rv[r]);
      if (!std::isfinite(scale)) continue;  // NaN or far apart: compared as they are (and fails)
      for (std::size_t e = 0; e < kv; ++e) cv[r * kv + e] *= scale;
      for (std::size_t e = 0; e < k; ++e) nv[r * k + e] *= scale;
    }
    gc = Tensor::from(cv, gc.shape(), DType::f64);
    gn = Tensor::from(nv, gn.shape(), DType::f64);
  }
  if (auto r = matches(gc, rc, tol, kernel, "c_last", spec); !r) return r;
  if (auto r = matches(gn, rn, tol, kernel, "n_last", spec); !r) return r;
  return matches(gm, rm, m_tol, kernel, "m_last", spec);
}

::testing::AssertionResult all_finite(const Tensor& got, const std::string& kernel, const std::string& what,
                                      const InputSpec& spec) {
  Comparison c;
  const auto g = got.to_vector();
  for (std::size_t e = 0; e < g.size(); ++e) {
    if (!std::isfinite(g[e])) {
      c.finite = false;
      c.worst_index = static_cast<std::int64_t>(e);
      break;
    }
  }
  record(kernel, what + " (finite)", spec, c, 0.0);
  if (!c.finite) {
    return ::testing::AssertionFailure() << kernel << " " << what << " [" << spec.describe()
                                         << "]: non-finite value at flat index " << c.worst_index;
  }
  return ::testing::AssertionSuccess();
}

Tensor slice_seq(const Tensor& t, std::int64_t s0, std::int64_t s1) {
  Shape shape = t.shape();
  const std::int64_t S = shape.at(2);
  const std::int64_t inner = t.numel() / (shape[0] * shape[1] * S);
  shape[2] = s1 - s0;
  Tensor out(shape, t.dtype());
  const std::size_t es = dtype_size(t.dtype());
  for (std::int64_t r = 0; r < shape[0] * shape[1]; ++r) {
    std::memcpy(out.bytes() + static_cast<std::size_t>(r * (s1 - s0) * inner) * es,
                t.bytes() + static_cast<std::size_t>((r * S + s0) * inner) * es,
                static_cast<std::size_t>((s1 - s0) * inner) * es);
  }
  return out;
}

Tensor concat_seq(const Tensor& a, const Tensor& b) {
  Shape shape = a.shape();
  const std::int64_t Sa = a.dim(2), Sb = b.dim(2);
  const std::int64_t rows = shape[0] * shape[1];
  const std::int64_t inner = a.numel() / (rows * Sa);
  shape[2] = Sa + Sb;
  Tensor out(shape, a.dtype());
  const std::size_t es = dtype_size(a.dtype());
  for (std::int64_t r = 0; r < rows; ++r) {
    std::memcpy(out.bytes() + static_cast<std::size_t>(r * (Sa + Sb) * inner) * es,
                a.bytes() + static_cast<std::size_t>(r * Sa * inner) * es, static_cast<std::size_t>(Sa * inner) * es);
    std::memcpy(out.bytes() + static_cast<std::size_t>((r * (Sa + Sb) + Sa) * inner) * es,
                b.bytes() + static_cast<std::size_t>(r * Sb * inner) * es, static_cast<std::size_t>(Sb * inner) * es);
  }
  return out;
}

InputSpec spec(std::int64_t B, std::int64_t NH, std::int64_t S, std::int64_t DHQK, std::int64_t DHHV, DType dtype,
               GateVariant gate, bool initial_state, GateRegime regime) {
  InputSpec s;
  s.B = B;
  s.NH = NH;
  s.S = S;
  s.DHQK = DHQK;
  s.DHHV = DHHV;
  s.dtype = dtype;
  s.gate = gate;
  s.initial_state = initial_state;
  s.regime = regime;
  return s;
}

std::string thrown_argument(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const InvalidArgument& e) {
    return e.argument();
  } catch (const std::exception& e) {
    return std::string("<other exception: ") + e.what() + ">";
  }
  return "<nothing thrown>";
}

std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::filesystem::path fresh_test_dir(const std::string& prefix) {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() /
      (prefix + std::to_string(getpid()) + "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

CommandRun run_command(const std::filesystem::path& dir, const std::string& command,
                       const std::function<void()>& setup) {
  static int counter = 0;
  const std::filesystem::path out = dir / ("cmd_out_" + std::to_string(counter)),
                              err = dir / ("cmd_err_" + std::to_string(counter));
  ++counter;
  const pid_t pid = fork();
  if (pid == 0) {
    const int o = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int e = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(o, 1);
    ::dup2(e, 2);
    if (setup) setup();
    ::execl("/bin/sh", "sh", "-c", command.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  CommandRun r;
  if (WIFEXITED(status)) r.code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) r.signal = WTERMSIG(status);
  r.out = slurp(out);
  r.err = slurp(err);
  std::filesystem::remove(out);
  std::filesystem::remove(err);
  return r;
}

void expect_refused(const CommandRun& r, int code, const std::string& argument) {
  EXPECT_EQ(r.code, code) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find(argument), std::string::npos) << "stderr should name " << argument << ": " << r.err;
}

}  // namespace mlstm::testing
