// mlstm::dist::MpiRunner: one sequence across MPI ranks equals one call over the whole sequence.
//
// Run under mpirun (tests/dist/CMakeLists.txt: np 1 to 4). Every rank runs the same tests in the same order (the
// runner's calls are collectives), draws the SAME full inputs (rank 0's test seed, broadcast: fresh_seed's fixed
// base unless MLSTM_TEST_SEED says otherwise, printed with its replay command), computes the whole-sequence
// reference itself (graph::FlowGraphRunner on the CPU workers) and checks its own slice of the results.
//
// Nothing here may leave a test early on one rank only while the others go on into a collective: checks are
// EXPECTs, skips are agreed on by every rank, and the runner's failures are RankFailed on every rank. Each test's
// TearDown gathers every rank's outcome, so rank 0's printer (the only one) reports a test that failed anywhere;
// the other ranks print their own failures on stderr as "[rank r] ...".
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "mlstm/devices/opencl/device.hpp"
#include "mlstm/dist/mpi_runner.hpp"
#include "mlstm/mlstm.hpp"
#include "test_util.hpp"

namespace mlstm {
namespace {

using testing::GateRegime;
using testing::Inputs;
using testing::InputSpec;

int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

int world_size() {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

// True on every rank when `mine` is true on every rank (so a skip is taken by all ranks or by none).
bool on_every_rank(bool mine) {
  int in = mine ? 1 : 0, all = 0;
  MPI_Allreduce(&in, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return all == 1;
}

// Rank 0's seed of this test's next draw (fresh_seed: recorded and printed there), the same on every rank.
std::uint64_t shared_seed() {
  std::uint64_t seed = world_rank() == 0 ? testing::fresh_seed() : 0;
  MPI_Bcast(&seed, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
  return seed;
}

// Every test: after it, every rank's outcome reaches rank 0, whose printer then reports a failure on any rank.
class Mpi : public ::testing::Test {
 protected:
  void TearDown() override {
    const auto outcomes = dist::all_gather(MPI_COMM_WORLD, HasFailure() ? "F" : ".");
    std::string failed;
    for (std::size_t r = 0; r < outcomes.size(); ++r)
      if (outcomes[r] == "F") {
        failed += ' ';
        failed += std::to_string(r);
      }
    if (world_rank() == 0 && !failed.empty() && !HasFailure()) {
      ADD_FAILURE() << "failed on rank(s)" << failed << " (their failures are on stderr as [rank r])";
    }
  }
};

// The other ranks' failures on stderr, one copy each (their default printer is removed in main).
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  // The test's name from OnTestStart: OnTestPartResult runs under gtest's own lock (current_test_info() there
  // would wait for it forever).
  void OnTestStart(const ::testing::TestInfo& info) override {
    test_ = std::string(info.test_suite_name()) + "." + info.name();
  }
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s: %s:%d: Failure\n%s\n", rank_, test_.c_str(),
                 r.file_name() ? r.file_name() : "?", r.line_number(), r.message());
    std::fflush(stderr);
  }

 private:
  int rank_;
  std::string test_;
};

// ---- shards ----------------------------------------------------------------------------------------------------

// The ranks' cut points (cuts[r] .. cuts[r + 1] is rank r's shard) from shard_of.
std::vector<std::int64_t> shard_of_cuts(std::int64_t S, std::int64_t chunk, int ranks) {
  std::vector<std::int64_t> cuts;
  for (int r = 0; r < ranks; ++r) cuts.push_back(dist::shard_of(S, chunk, r, ranks).first);
  cuts.push_back(S);
  return cuts;
}

std::string describe_cuts(const std::vector<std::int64_t>& cuts) {
  std::string out = "cuts";
  for (const auto c : cuts) {
    out += ' ';
    out += std::to_string(c);
  }
  return out;
}

// Tokens [t0, t1) of the inputs; the initial state when `initial` (rank 0's shard).
ForwardArgs shard_args(const Inputs& in, std::int64_t t0, std::int64_t t1, bool initial) {
  ForwardArgs a = sequence_slice(in.args(), t0, t1);
  if (initial && !in.c0.empty()) {
    a.c0 = in.c0.view();
    a.n0 = in.n0.view();
    a.m0 = in.m0.view();
  }
  return a;
}

// The backward's shard: dh of [t0, t1); the last-state gradients when `last_grads` (the last rank's shard).
BackwardArgs shard_bargs(const Inputs& in, std::int64_t t0, std::int64_t t1, bool initial, bool last_grads) {
  BackwardArgs b;
  b.inputs = shard_args(in, t0, t1, initial);
  b.dh = sequence_slice(in.dh.view(), t0, t1);
  if (last_grads) {
    b.dc_last = in.dc_last.view();
    b.dn_last = in.dn_last.view();
  }
  return b;
}

// `ref` (B,NH,S,...) with tokens [t0, t1) taken from `mine` (B,NH,t1-t0,...), in float64: a shard's result in
// place of the reference's. Compared with the reference, its error is the shard's and the scale (max |ref|) the whole
// sequence's, as the graph tests compare whole tensors (a shard whose gradients are all ~1e-7, say df of one token
// from the zero state, is not held to 1e-4 of itself), and the per-token checks (the normaliser's conditioning) see
// the tokens where they lie.
Tensor splice(const Tensor& ref, const Tensor& mine, std::int64_t t0, std::int64_t t1) {
  auto r = ref.to_vector();
  const auto m = mine.to_vector();
  const std::int64_t rows = ref.dim(0) * ref.dim(1), S = ref.dim(2),
                     inner = ref.numel() / std::max<std::int64_t>(rows * S, 1);
  const std::int64_t len = t1 - t0;
  for (std::int64_t row = 0; row < rows; ++row)
    for (std::int64_t e = 0; e < len * inner; ++e)
      r[static_cast<std::size_t>((row * S + t0) * inner + e)] = m[static_cast<std::size_t>(row * len * inner + e)];
  return Tensor::from(r, ref.shape(), DType::f64);
}

// True when `mine` has the shape of tokens [t0, t1) of `whole` (a failure otherwise).
bool expect_slice_shape(const Tensor& mine, const Tensor& whole, std::int64_t t0, std::int64_t t1,
                        const std::string& what) {
  Shape shape = whole.shape();
  shape.at(2) = t1 - t0;
  EXPECT_EQ(shape_to_string(mine.shape()), shape_to_string(shape)) << what;
  return mine.shape() == shape;
}

std::string label(const std::string& what) {
  return "mpi rank " + std::to_string(world_rank()) + "/" + std::to_string(world_size()) + " " + what;
}

// ---- the whole-sequence reference (this rank, CPU workers) ----------------------------------------------------

struct Tolerances {
  double h = 2e-5;      // forward h, c, n: float32 rounding of another cut (graph tests: 2e-5)
  double m = 1e-6;      // m: a running max of float32 sums of log-gates (1e-5 where an OpenCL kernel sums them)
  double grads = 1e-4;  // backward, every gradient (graph tests, CPU workers: 1e-4)
  bool well_conditioned_h = false;  // h on the tokens whose normaliser is well conditioned only
};

// The forward of this rank's shard [t0, t1) (`got`) against the whole-sequence reference `whole` (h's slice) and,
// with return_last_states, the state leaving the shard against the reference's state at t1 (a run of [0, t1)).
void expect_forward_shard(const ForwardResult& got, const ForwardResult& whole, graph::FlowGraphRunner& reference,
                          const Inputs& in, const MlstmOptions& o, std::int64_t t0, std::int64_t t1,
                          const Tolerances& tol, const InputSpec& s, const std::string& what) {
  const std::string kernel = label(what);
  if (expect_slice_shape(got.h, whole.h, t0, t1, kernel + " h")) {
    const Tensor spliced = splice(whole.h, got.h, t0, t1);
    if (tol.well_conditioned_h) {
      EXPECT_TRUE(testing::all_finite(whole.h, kernel + " (reference)", "h", s)) << "the reference is not NaN-free";
      EXPECT_TRUE(testing::all_finite(got.h, kernel, "h", s));
      EXPECT_TRUE(testing::matches_well_conditioned(spliced, whole.h, in, o, tol.h, kernel, "h", s));
    } else {
      EXPECT_TRUE(testing::matches(spliced, whole.h, tol.h, kernel, "h", s));
    }
  }
  if (!o.return_last_states) {
    EXPECT_TRUE(got.c.empty() && got.n.empty() && got.m.empty()) << kernel << ": last states without asking";
    return;
  }
  if (t1 == 0) {
    ADD_FAILURE() << kernel << ": a shard ending at token 0";
    return;
  }
  const ForwardResult at_t1 = t1 == in.q.dim(2) ? ForwardResult{Tensor(), whole.c, whole.n, whole.m}
                                                : reference.forward(shard_args(in, 0, t1, /*initial=*/true), o);
  EXPECT_TRUE(testing::last_state_matches(got.c, got.n, got.m, at_t1.c, at_t1.n, at_t1.m, tol.h, tol.m,
                                          kernel + " state leaving token " + std::to_string(t1), s));
}

// The gradients of this rank's shard [t0, t1) against the whole-sequence reference's slices; dc0 / dn0 / dm0 on
// rank 0 when the initial state was given, none elsewhere.
void expect_backward_shard(const BackwardResult& got, const BackwardResult& whole, const Inputs& in, std::int64_t t0,
                           std::int64_t t1, const Tolerances& tol, const InputSpec& s, const std::string& what) {
  const std::string kernel = label(what);
  for (auto [name, a, b] : {std::tuple{"dq", &got.dq, &whole.dq},
                            {"dk", &got.dk, &whole.dk},
                            {"dv", &got.dv, &whole.dv},
                            {"di", &got.di, &whole.di},
                            {"df", &got.df, &whole.df}}) {
    EXPECT_TRUE(testing::all_finite(*b, kernel + " (reference)", name, s)) << "the reference is not NaN-free";
    if (expect_slice_shape(*a, *b, t0, t1, kernel + " " + name)) {
      EXPECT_TRUE(testing::all_finite(*a, kernel, name, s));
      EXPECT_TRUE(testing::matches(splice(*b, *a, t0, t1), *b, tol.grads, kernel, name, s));
    }
  }
  if (world_rank() == 0 && !in.c0.empty()) {
    EXPECT_TRUE(testing::matches(got.dc0, whole.dc0, tol.grads, kernel, "dc0", s));
    EXPECT_TRUE(testing::matches(got.dn0, whole.dn0, tol.grads, kernel, "dn0", s));
    EXPECT_EQ(got.dm0.empty(), whole.dm0.empty()) << kernel << " dm0";
    if (!got.dm0.empty() && !whole.dm0.empty()) {
      EXPECT_TRUE(testing::dm0_matches(got.dm0, whole.dm0, whole.dc0, whole.dn0, in, tol.grads, kernel, s));
    }
  } else {
    EXPECT_TRUE(got.dc0.empty() && got.dn0.empty() && got.dm0.empty())
        << kernel << ": initial-state gradients on a rank without the initial state";
  }
}

// One problem: every rank's shard (cuts) forward and backward through `runner` against the reference.
struct Case {
  InputSpec s;
  MlstmOptions o;
  std::vector<std::int64_t> cuts;  // world_size() + 1 cut points
  bool last_grads = true;          // dc_last / dn_last on the last rank
  std::string what;
};

void expect_case(dist::MpiRunner& runner, graph::FlowGraphRunner& reference, Inputs in, const Case& c,
                 const Tolerances& tol, bool backward = true) {
  const int rank = runner.rank(), last = runner.size() - 1;
  const std::int64_t t0 = c.cuts[static_cast<std::size_t>(rank)], t1 = c.cuts[static_cast<std::size_t>(rank) + 1];
  const std::string what =
      c.what + " [" + c.s.describe() + " L=" + std::to_string(c.o.chunk_size) + " " + describe_cuts(c.cuts) + "]";
  SCOPED_TRACE(label(what));
  const ForwardResult whole = reference.forward(in.args(), c.o);
  const ForwardResult got = runner.forward(shard_args(in, t0, t1, rank == 0), c.o);
  expect_forward_shard(got, whole, reference, in, c.o, t0, t1, tol, c.s, what);
  EXPECT_EQ(runner.last_exchange().exchanges, 1);
  if (runner.size() > 1) {
    EXPECT_GT(runner.last_exchange().bytes, 0u);
  }
  if (!backward) return;
  // As in the graph tests: no upstream gradient at tokens next to the normaliser's kink (their gradient jumps).
  // The same tokens on every rank: the same inputs, the same float64 computation.
  EXPECT_GE(testing::quiet_normaliser_kinks(in, c.o, c.s), 0) << "most tokens near the normaliser's kink";
  const BackwardResult whole_bw = reference.backward(in.backward_args(c.last_grads), c.o);
  const BackwardResult got_bw = runner.backward(shard_bargs(in, t0, t1, rank == 0, c.last_grads && rank == last), c.o);
  expect_backward_shard(got_bw, whole_bw, in, t0, t1, tol, c.s, what + " backward");
  EXPECT_EQ(runner.last_exchange().exchanges, 2);
}

InputSpec odd_shape(GateVariant gate, bool initial, GateRegime regime = GateRegime::typical) {
  return testing::spec(2, 3, 77, 8, 12, DType::f32, gate, initial, regime);
}

MlstmOptions options(GateVariant gate, std::int64_t chunk, bool normalize = true) {
  MlstmOptions o = testing::options_of(gate, chunk);
  o.normalize = normalize;
  return o;
}

// ---- 1. shard_of ----------------------------------------------------------------------------------------------

TEST_F(Mpi, ShardOfCoversTheSequenceInWholeChunks) {
  for (const std::int64_t S : {0, 1, 3, 15, 16, 17, 20, 50, 64, 77, 1000}) {
    for (const std::int64_t chunk : {1, 16, 64}) {
      for (int ranks = 1; ranks <= 9; ++ranks) {
        SCOPED_TRACE("S=" + std::to_string(S) + " chunk=" + std::to_string(chunk) + " ranks=" + std::to_string(ranks));
        const std::int64_t chunks = (S + chunk - 1) / chunk;
        std::int64_t at = 0, empty = 0, largest = 0, smallest = std::numeric_limits<std::int64_t>::max();
        for (int r = 0; r < ranks; ++r) {
          const auto [t0, t1] = dist::shard_of(S, chunk, r, ranks);
          EXPECT_EQ(t0, at) << "rank " << r << " does not start where rank " << r - 1 << " ended";
          EXPECT_LE(t0, t1) << "rank " << r;
          EXPECT_TRUE(t0 % chunk == 0 || t0 == S) << "rank " << r << " starts inside a chunk: " << t0;
          if (t1 != S) {
            EXPECT_EQ(t1 % chunk, 0) << "rank " << r << " ends inside a chunk (not the last shard)";
          }
          const std::int64_t whole_chunks = (t1 - t0 + chunk - 1) / chunk;
          largest = std::max(largest, whole_chunks);
          smallest = std::min(smallest, whole_chunks);
          empty += t1 == t0;
          at = t1;
        }
        EXPECT_EQ(at, S) << "the shards do not end at S";
        // Empty shards only when there are fewer chunks than ranks, and then exactly ranks - chunks of them.
        EXPECT_EQ(empty, std::max<std::int64_t>(0, ranks - chunks));
        EXPECT_LE(largest - smallest, 1) << "chunks not spread as evenly as possible";
        // The earlier ranks take the extra chunks, so the empty shards are the last ones and rank 0 (which holds
        // the initial state) has tokens whenever the sequence has.
        std::int64_t before = std::numeric_limits<std::int64_t>::max();
        for (int r = 0; r < ranks; ++r) {
          const auto [t0, t1] = dist::shard_of(S, chunk, r, ranks);
          const std::int64_t own = (t1 - t0 + chunk - 1) / chunk;
          EXPECT_LE(own, before) << "rank " << r << " has more chunks than rank " << r - 1;
          before = own;
        }
        if (S > 0) {
          EXPECT_GT(dist::shard_of(S, chunk, 0, ranks).second, 0) << "rank 0's shard is empty";
        }
      }
    }
  }
  EXPECT_THROW((void)dist::shard_of(-1, 16, 0, 2), InvalidArgument);
  EXPECT_THROW((void)dist::shard_of(10, 0, 0, 2), InvalidArgument);
  EXPECT_THROW((void)dist::shard_of(10, 16, 2, 2), InvalidArgument);
  EXPECT_THROW((void)dist::shard_of(10, 16, -1, 2), InvalidArgument);
  EXPECT_THROW((void)dist::shard_of(10, 16, 0, 0), InvalidArgument);
}

// ---- 2. forward equals one call --------------------------------------------------------------------------------

TEST_F(Mpi, ForwardEqualsOneCall) {
  dist::MpiRunner runner(MPI_COMM_WORLD, "workers");
  graph::FlowGraphRunner reference("workers");
  const int rank = runner.rank(), ranks = runner.size();
  for (auto [gate, initial, normalize, last_states] :
       {std::tuple{GateVariant::exp, true, true, true}, std::tuple{GateVariant::exp, false, true, true},
        std::tuple{GateVariant::exp, true, true, false}, std::tuple{GateVariant::sigmoid, true, true, true},
        std::tuple{GateVariant::sigmoid, false, false, true}}) {
    Case c;
    c.s = odd_shape(gate, initial);
    c.o = options(gate, 16, normalize);
    c.o.return_last_states = last_states;
    c.cuts = shard_of_cuts(c.s.S, 16, ranks);
    c.what = std::string("forward ") + (initial ? "with" : "without") + " initial state" +
             (normalize ? "" : "; no normaliser") + (last_states ? "" : "; no last states");
    const Inputs in = testing::make_inputs(c.s, shared_seed());
    expect_case(runner, reference, in, c, Tolerances{}, /*backward=*/false);
  }
  // forward_into: h written into this rank's slice of a whole-sequence tensor, nothing outside it.
  const InputSpec s = odd_shape(GateVariant::exp, true);
  const Inputs in = testing::make_inputs(s, shared_seed());
  const MlstmOptions o = options(GateVariant::exp, 16);
  const auto [t0, t1] = dist::shard_of(s.S, 16, rank, ranks);
  Tensor h = Tensor::full({s.B, s.NH, s.S, s.DHHV}, DType::f32, 7.0);
  const ForwardResult into =
      runner.forward_into(sequence_slice(h.view(), t0, t1), shard_args(in, t0, t1, rank == 0), o);
  EXPECT_TRUE(into.h.empty());
  const ForwardResult whole = reference.forward(in.args(), o);
  EXPECT_TRUE(testing::matches(testing::slice_seq(h, t0, t1), testing::slice_seq(whole.h, t0, t1), 2e-5,
                               label("forward_into"), "h", s));
  std::int64_t written_outside = 0;
  const auto hv = h.to_vector();
  for (std::int64_t row = 0; row < s.B * s.NH; ++row)
    for (std::int64_t t = 0; t < s.S; ++t)
      for (std::int64_t e = 0; e < s.DHHV; ++e)
        written_outside += (t < t0 || t >= t1) && hv[static_cast<std::size_t>((row * s.S + t) * s.DHHV + e)] != 7.0;
  EXPECT_EQ(written_outside, 0) << label("forward_into") << ": elements outside the shard written";
  if (rank == ranks - 1) {
    EXPECT_TRUE(testing::last_state_matches(into.c, into.n, into.m, whole.c, whole.n, whole.m, 2e-5, 1e-6,
                                            label("forward_into"), s));
  }
}

// ---- 3. backward equals one call -------------------------------------------------------------------------------

TEST_F(Mpi, BackwardEqualsOneCall) {
  dist::MpiRunner runner(MPI_COMM_WORLD, "workers");
  graph::FlowGraphRunner reference("workers");
  const int rank = runner.rank(), ranks = runner.size();
  for (auto [gate, initial, last_grads] :
       {std::tuple{GateVariant::exp, true, true}, std::tuple{GateVariant::exp, false, false},
        std::tuple{GateVariant::exp, false, true}, std::tuple{GateVariant::sigmoid, true, true}}) {
    Case c;
    c.s = odd_shape(gate, initial);
    c.o = options(gate, 16);
    c.cuts = shard_of_cuts(c.s.S, 16, ranks);
    c.last_grads = last_grads;
    c.what = std::string("backward ") + (initial ? "with" : "without") + " initial state; " +
             (last_grads ? "with" : "without") + " dc_last";
    expect_case(runner, reference, testing::make_inputs(c.s, shared_seed()), c, Tolerances{});
  }
  // backward_into: the gradients written into this rank's slices of whole-sequence tensors.
  const InputSpec s = odd_shape(GateVariant::exp, true);
  Inputs in = testing::make_inputs(s, shared_seed());
  const MlstmOptions o = options(GateVariant::exp, 16);
  EXPECT_GE(testing::quiet_normaliser_kinks(in, o, s), 0);
  const auto [t0, t1] = dist::shard_of(s.S, 16, rank, ranks);
  Tensor dq({s.B, s.NH, s.S, s.DHQK}, DType::f32), dk({s.B, s.NH, s.S, s.DHQK}, DType::f32),
      dv({s.B, s.NH, s.S, s.DHHV}, DType::f32), di({s.B, s.NH, s.S}, DType::f32), df({s.B, s.NH, s.S}, DType::f32);
  const GradientViews all{dq.view(), dk.view(), dv.view(), di.view(), df.view()};
  const BackwardResult into =
      runner.backward_into(all.slice(t0, t1), shard_bargs(in, t0, t1, rank == 0, rank == ranks - 1), o);
  const BackwardResult whole = reference.backward(in.backward_args(true), o);
  for (auto [name, got, ref] : {std::tuple{"dq", &dq, &whole.dq},
                                {"dk", &dk, &whole.dk},
                                {"dv", &dv, &whole.dv},
                                {"di", &di, &whole.di},
                                {"df", &df, &whole.df}}) {
    EXPECT_TRUE(testing::matches(splice(*ref, testing::slice_seq(*got, t0, t1), t0, t1), *ref, 1e-4,
                                 label("backward_into"), name, s));
  }
  EXPECT_TRUE(into.dq.empty());
  if (rank == 0) {
    EXPECT_TRUE(testing::matches(into.dc0, whole.dc0, 1e-4, label("backward_into"), "dc0", s));
  }
}

// ---- 4. short, uneven and empty shards -------------------------------------------------------------------------

// Cut points of S = 50 (chunk 16) for `ranks` ranks that no shard_of gives: a rank of 3 tokens (shorter than a
// chunk), ragged middle shards (starting and ending inside chunks), single tokens.
std::vector<std::vector<std::int64_t>> uneven_cuts(int ranks) {
  switch (ranks) {
    case 1:
      return {{0, 50}};
    case 2:
      return {{0, 3, 50}, {0, 47, 50}, {0, 21, 50}};
    case 3:
      return {{0, 3, 27, 50}, {0, 16, 19, 50}, {0, 1, 49, 50}};
    case 4:
      return {{0, 3, 27, 30, 50}, {0, 16, 17, 49, 50}, {0, 5, 21, 37, 50}};
    default:
      return {};
  }
}

// Cut points of S = 50 with empty shards on ranks > 0: in the middle, and the last rank's (which then holds
// dc_last / dn_last and returns the sequence's last state without a token of its own).
std::vector<std::vector<std::int64_t>> empty_shard_cuts(int ranks) {
  switch (ranks) {
    case 2:
      return {{0, 50, 50}};
    case 3:
      return {{0, 20, 20, 50}, {0, 50, 50, 50}};
    case 4:
      return {{0, 16, 16, 50, 50}, {0, 3, 3, 3, 50}};
    default:
      return {};
  }
}

TEST_F(Mpi, ShortAndUnevenShardsEqualOneCall) {
  dist::MpiRunner runner(MPI_COMM_WORLD, "workers");
  graph::FlowGraphRunner reference("workers");
  for (const auto& cuts : uneven_cuts(runner.size())) {
    for (auto [gate, initial] : {std::tuple{GateVariant::exp, true}, std::tuple{GateVariant::sigmoid, false}}) {
      Case c;
      c.s = testing::spec(2, 3, 50, 8, 12, DType::f32, gate, initial);
      c.o = options(gate, 16);
      c.cuts = cuts;
      c.what = "uneven shards";
      expect_case(runner, reference, testing::make_inputs(c.s, shared_seed()), c, Tolerances{});
    }
  }
}

TEST_F(Mpi, EmptyShardsOnLaterRanksEqualOneCall) {
  dist::MpiRunner runner(MPI_COMM_WORLD, "workers");
  graph::FlowGraphRunner reference("workers");
  for (const auto& cuts : empty_shard_cuts(runner.size())) {
    for (auto [gate, initial] : {std::tuple{GateVariant::exp, true}, std::tuple{GateVariant::sigmoid, true}}) {
      Case c;
      c.s = testing::spec(2, 3, 50, 8, 12, DType::f32, gate, initial);
      c.o = options(gate, 16);
      c.cuts = cuts;
      c.what = "empty shards";
      expect_case(runner, reference, testing::make_inputs(c.s, shared_seed()), c, Tolerances{});
    }
  }
}

// More ranks than chunks with shard_of (S = 20, chunk 16: 2 chunks): np 3 and 4 give the last ranks empty shards
// ([0,16) [16,20) [20,20) ...), which take part in the exchanges only; the last of them holds dc_last / dn_last and
// returns the sequence's last state.
TEST_F(Mpi, ShardOfWithMoreRanksThanChunksEqualsOneCall) {
  dist::MpiRunner runner(MPI_COMM_WORLD, "workers");
  graph::FlowGraphRunner reference("workers");
  for (auto [gate, initial] : {std::tuple{GateVariant::exp, true}, std::tuple{GateVariant::sigmoid, false}}) {
    Case c;
    c.s = testing::spec(2, 3, 20, 8, 12, DType::f32, gate, initial);
    c.o = options(gate, 16);
    c.cuts = shard_of_cuts(20, 16, runner.size());
    c.what = "shard_of with more ranks than chunks";
    try {
      expect_case(runner, reference, testing::make_inputs(c.s, shared_seed()), c, Tolerances{});
    } catch (const dist::RankFailed& e) {
      ADD_FAILURE() << describe_cuts(c.cuts) << ": RankFailed(rank " << e.rank() << ", exit code " << e.exit_code()
                    << ", argument \"" << e.argument() << "\"): " << e.what();
    }
  }
}

// ---- 5. extreme gates ------------------------------------------------------------------------------------------

// Gates at +-inf and far out, placed at the ranks' cut points: f = -inf at the first token of every shard but rank
// 0's (the state is forgotten exactly at a cut; rank 0 keeps its initial state, so dc0 / dn0 are not 0) and at the
// last token of ranks 2, 4, ... (the others' leaving states carry more than their last token), i = -inf at
// t % 5 == 2 and at those shards' first token in row 1, f = -80 / +80 at t % 7 == 3 / t % 7 == 0 (G of -80 per
// token: exp(G) underflows).
// `forgotten_shards` (2+ ranks): also f = i = -inf over the whole of rank 0's shard and the first token of rank 1's
// in row 0 (an EMPTY state, m = -inf, leaves rank 0 and enters rank 1 at a forgotten token), and over the whole of
// rank 1's shard in row 2 (a live state enters it, an EMPTY one leaves it).
void extreme_gates(Inputs& in, const std::vector<std::int64_t>& cuts, bool forgotten_shards) {
  const double inf = std::numeric_limits<double>::infinity();
  const std::int64_t rows = in.q.dim(0) * in.q.dim(1), S = in.q.dim(2);
  auto iv = in.i.to_vector(), fv = in.f.to_vector();
  auto at = [&](std::int64_t r, std::int64_t t) { return static_cast<std::size_t>(r * S + t); };
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t t = 0; t < S; ++t) {
      if (t % 5 == 2) iv[at(r, t)] = -inf;
      if (t % 7 == 3) fv[at(r, t)] = -80.0;
      if (t % 7 == 0) fv[at(r, t)] = 80.0;
    }
    for (std::size_t k = 1; k + 1 < cuts.size(); ++k) {
      if (cuts[k] == cuts[k + 1]) continue;
      fv[at(r, cuts[k])] = -inf;
      if (k % 2 == 0) fv[at(r, cuts[k + 1] - 1)] = -inf;
      if (r == 1) iv[at(r, cuts[k])] = -inf;
    }
  }
  if (forgotten_shards && cuts.size() >= 3 && rows >= 3) {
    for (std::int64_t t = cuts[0]; t <= std::min(cuts[1], S - 1); ++t) iv[at(0, t)] = fv[at(0, t)] = -inf;
    for (std::int64_t t = cuts[1]; t < cuts[2]; ++t) iv[at(2, t)] = fv[at(2, t)] = -inf;
  }
  in.i = Tensor::from(iv, in.i.shape(), in.i.dtype());
  in.f = Tensor::from(fv, in.f.shape(), in.f.dtype());
}

// The sharded run and the reference are the same CPU kernel with other chunk grids: a forget gate of -inf is a cut
// (a mask, stages.hpp "Gates at +-inf") and f = -80 adds terms of 80 to the large-decay cumsum, so the cumsums round
// at ~3e-5 absolute and the token weights at u ~ 1e-4 relative (test_util's rounding for gates at -inf), which a
// normaliser of condition kappa <= 20 turns into up to 2e-3 in h; m (hundreds under these gates) rounds at ~1e-6
// relative per cumsum. Gradients as the graph tests hold gates at -inf (1e-2). Measured over 200 random draws
// (MLSTM_TEST_SEED=random, np 1-4): h up to 5.2e-4, gradients 1.0e-3, m 4.4e-6, c / n 9.4e-6; a wrong state or
// gradient across a cut is O(1) off (or NaN).
Tolerances extreme_tolerances() {
  Tolerances tol;
  tol.h = 2e-3;
  tol.m = 5e-5;
  tol.grads = 1e-2;
  tol.well_conditioned_h = true;
  return tol;
}

void expect_extreme_case(dist::MpiRunner& runner, graph::FlowGraphRunner& reference, GateVariant gate,
                         std::vector<std::int64_t> cuts, bool forgotten_shards) {
  Case c;
  c.s = testing::spec(2, 3, cuts.back(), 8, 12, DType::f32, gate, /*initial_state=*/true, GateRegime::mixed);
  c.s.inf = testing::InfGates::mixed;  // for test_util's kink rounding (cumsums cut by 256), as the graph tests
  c.o = options(gate, 16);
  c.cuts = std::move(cuts);
  c.what = forgotten_shards ? "extreme gates with forgotten shards" : "extreme gates";
  // Forgotten shards: no gradient of the last state. The tensor cores (and every chunkwise form before session 22)
  // keep a state forgotten by f = -inf as (C, n) under m - 256, so dc_last would flow into a row whose whole last
  // shard is forgotten, while the exchange passes it through the shard's decay exp(G + ...) = 0 exactly.
  c.last_grads = !forgotten_shards;
  Inputs in = testing::make_inputs(c.s, shared_seed());
  extreme_gates(in, c.cuts, forgotten_shards);
  expect_case(runner, reference, in, c, extreme_tolerances());
}

TEST_F(Mpi, ExtremeGatesEqualOneCall) {
  dist::MpiRunner runner(MPI_COMM_WORLD, "workers");
  graph::FlowGraphRunner reference("workers");
  const int ranks = runner.size();
  for (auto gate : {GateVariant::exp, GateVariant::sigmoid}) {
    for (const auto& cuts : {shard_of_cuts(77, 16, ranks), uneven_cuts(ranks).front()}) {
      expect_extreme_case(runner, reference, gate, cuts, /*forgotten_shards=*/false);
    }
  }
  // Whole shards of f = i = -inf, both gates: a shard entered EMPTY (m = -inf) whose first tokens have f = i = -inf,
  // and a live state that leaves a shard EMPTY (found by this test: NaN from the chunkwise and parallel kernels'
  // intra-chunk weights, -inf - -inf, and from the segment decay exp(G + m_in - m_out) with G = m_out = -inf; the
  // same NaNs came out of one process's graph with segment boundaries there).
  for (auto gate : {GateVariant::exp, GateVariant::sigmoid}) {
    for (const auto& cuts : {shard_of_cuts(77, 16, ranks), uneven_cuts(ranks).front()}) {
      expect_extreme_case(runner, reference, gate, cuts, /*forgotten_shards=*/true);
    }
  }
}

// ---- 6. mixed devices ------------------------------------------------------------------------------------------

TEST_F(Mpi, MixedDevicesEqualOneCall) {
  if (!on_every_rank(!opencl::list_devices().empty()))
    GTEST_SKIP() << "needs an OpenCL device on every rank (POCL_DEVICES=\"pthread pthread\")";
  const int rank = world_rank();
  // rank 0 on the CPU workers, odd ranks on the first PoCL device, even ranks > 0 on both.
  const std::string spec = rank == 0 ? "workers" : rank % 2 == 1 ? "0" : "workers+0";
  dist::MpiRunner runner(MPI_COMM_WORLD, spec);
  graph::FlowGraphRunner reference("workers");
  for (auto [gate, initial, uneven] :
       {std::tuple{GateVariant::exp, true, false}, std::tuple{GateVariant::sigmoid, true, false},
        std::tuple{GateVariant::exp, true, true}}) {
    Case c;
    c.s = uneven ? testing::spec(2, 3, 50, 8, 12, DType::f32, gate, initial) : odd_shape(gate, initial);
    c.o = options(gate, 16);
    c.cuts = uneven ? uneven_cuts(runner.size()).front() : shard_of_cuts(c.s.S, 16, runner.size());
    c.what = "devices " + spec;
    // Another kernel on the OpenCL ranks: as the graph tests hold OpenCL mixes against the CPU one call
    // (forward 2e-5, m 1e-5, backward 2e-3).
    Tolerances tol;
    tol.m = 1e-5;
    tol.grads = 2e-3;
    expect_case(runner, reference, testing::make_inputs(c.s, shared_seed()), c, tol);
    // The PoCL device alone did the rank's work (its backward, the last run).
    if (spec == "0") {
      std::string log;
      for (const auto& line : runner.local().last_log()) log += line + "\n";
      EXPECT_NE(log.find("opencl"), std::string::npos) << label("no OpenCL device in the log:\n") << log;
      EXPECT_EQ(log.find("cpu:numa"), std::string::npos) << label("a CPU worker in the log:\n") << log;
    }
  }
}

// ---- 7. failures -----------------------------------------------------------------------------------------------

// What `fn` threw: the RankFailed, or nothing (any other exception is a failure here, recorded, not rethrown, so
// the rank goes on with the others).
std::optional<dist::RankFailed> rank_failure(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const dist::RankFailed& e) {
    return e;
  } catch (const std::exception& e) {
    ADD_FAILURE() << label("") << "threw something other than RankFailed: " << e.what();
    return std::nullopt;
  }
  return std::nullopt;
}

void expect_rank_failed(const std::optional<dist::RankFailed>& e, int rank, int exit_code, const std::string& argument,
                        const std::string& what) {
  EXPECT_TRUE(e.has_value()) << label(what) << ": no RankFailed";
  if (!e) return;
  EXPECT_EQ(e->rank(), rank) << label(what) << ": " << e->what();
  EXPECT_EQ(e->exit_code(), exit_code) << label(what) << ": " << e->what();
  EXPECT_EQ(e->argument(), argument) << label(what) << ": " << e->what();
  EXPECT_EQ(std::string(e->what()).rfind("rank " + std::to_string(rank) + ": ", 0), 0u) << e->what();
}

// collectively(): a throw on the last rank only reaches every rank as RankFailed (exit code 1 for an error, 2
// with the argument for an InvalidArgument); a call that throws nowhere returns everywhere.
TEST_F(Mpi, CollectivelyReportsOneRanksFailureEverywhere) {
  dist::MpiRunner runner(MPI_COMM_WORLD, "workers");
  const int last = runner.size() - 1;
  int calls = 0;
  EXPECT_NO_THROW(runner.collectively([&] { ++calls; }));
  EXPECT_EQ(calls, 1);
  auto failed = rank_failure([&] {
    runner.collectively([&] {
      if (runner.rank() == last) throw Error("the last rank's own error");
    });
  });
  expect_rank_failed(failed, last, 1, "", "collectively, Error on the last rank");
  if (failed) {
    EXPECT_EQ(failed->message(), "the last rank's own error");
  }
  failed = rank_failure([&] {
    dist::collectively(MPI_COMM_WORLD, [&] {
      if (runner.rank() == last) throw InvalidArgument("q", "refused on the last rank");
    });
  });
  expect_rank_failed(failed, last, 2, "q", "collectively, InvalidArgument on the last rank");
  // The runner still runs afterwards.
  const InputSpec s = testing::spec(1, 2, 40, 8, 8);
  const Inputs in = testing::make_inputs(s, shared_seed());
  const MlstmOptions o = options(GateVariant::exp, 16);
  const auto [t0, t1] = dist::shard_of(s.S, 16, runner.rank(), runner.size());
  graph::FlowGraphRunner reference("workers");
  const ForwardResult whole = reference.forward(in.args(), o);
  const ForwardResult got = runner.forward(shard_args(in, t0, t1, false), o);
  EXPECT_TRUE(testing::matches(got.h, testing::slice_seq(whole.h, t0, t1), 2e-5, label("after collectively"), "h", s));
}

// A rank whose run fails (MLSTM_MPI_FAIL_RANK: a device lost before its graph; an argument only that rank refuses)
// makes every rank's forward and backward throw RankFailed naming it, and the runner runs again afterwards. On one
// rank, rank 0 fails itself.
TEST_F(Mpi, OneRanksRunFailsOnEveryRank) {
  const testing::ScopedEnv fail_rank("MLSTM_MPI_FAIL_RANK", nullptr);
  dist::MpiRunner runner(MPI_COMM_WORLD, "workers");
  graph::FlowGraphRunner reference("workers");
  const int rank = runner.rank(), ranks = runner.size();
  const InputSpec s = odd_shape(GateVariant::exp, true);
  const Inputs in = testing::make_inputs(s, shared_seed());
  const MlstmOptions o = options(GateVariant::exp, 16);
  const auto [t0, t1] = dist::shard_of(s.S, 16, rank, ranks);
  const ForwardArgs mine = shard_args(in, t0, t1, rank == 0);
  const BackwardArgs mine_bw = shard_bargs(in, t0, t1, rank == 0, rank == ranks - 1);
  const int failing = ranks >= 2 ? 1 : 0;  // rank 1 (the brief's case); on one rank, rank 0 itself
  fail_rank.set(std::to_string(failing).c_str());
  expect_rank_failed(rank_failure([&] { (void)runner.forward(mine, o); }), failing, 1, "", "injected, forward");
  expect_rank_failed(rank_failure([&] { (void)runner.backward(mine_bw, o); }), failing, 1, "", "injected, backward");
  fail_rank.set(nullptr);
  const ForwardResult whole = reference.forward(in.args(), o);
  ForwardResult after;
  EXPECT_NO_THROW(after = runner.forward(mine, o)) << label("the forward after the injected failures");
  EXPECT_TRUE(testing::matches(after.h, testing::slice_seq(whole.h, t0, t1), 2e-5, label("after failures"), "h", s));
  if (ranks >= 2) {
    // c0 given on rank 1 only (and not on rank 0): rank 1 refuses it.
    const ForwardArgs bad = shard_args(in, t0, t1, rank == 1);
    expect_rank_failed(rank_failure([&] { (void)runner.forward(bad, o); }), 1, 2, "c0", "c0 on rank 1, forward");
    const BackwardArgs bad_bw = shard_bargs(in, t0, t1, rank == 1, rank == ranks - 1);
    expect_rank_failed(rank_failure([&] { (void)runner.backward(bad_bw, o); }), 1, 2, "c0", "c0 on rank 1, backward");
    // dc_last on rank 0 as well as on the last rank: rank 0 refuses it.
    const BackwardArgs bad_last = shard_bargs(in, t0, t1, rank == 0, true);
    expect_rank_failed(rank_failure([&] { (void)runner.backward(bad_last, o); }), 0, 2, "dc_last",
                       "dc_last on every rank");
  }
  EXPECT_NO_THROW(after = runner.forward(mine, o)) << label("the forward after the refused arguments");
  EXPECT_TRUE(testing::matches(after.h, testing::slice_seq(whole.h, t0, t1), 2e-5, label("after refusals"), "h", s));
}

}  // namespace
}  // namespace mlstm

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
  ::testing::InitGoogleTest(&argc, argv);
  const int rank = mlstm::world_rank();
  if (rank != 0) {
    // One copy of the output (rank 0's); the other ranks print only their failures. Their result still counts:
    // RUN_ALL_TESTS returns non-zero on a rank with a failure, and the MAX below reaches every rank's exit code.
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new mlstm::RankFailurePrinter(rank));
  }
  const int mine = RUN_ALL_TESTS();
  int worst = mine;
  MPI_Allreduce(&mine, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return worst;
}
