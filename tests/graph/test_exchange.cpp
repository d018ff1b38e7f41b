// FlowGraphRunner as one shard of a longer sequence (graph/exchange.hpp), without MPI: P shards run at once in P
// threads, each through its own runner, exchanging their summaries through an in-process StateExchange. The
// shards together must equal one call; the gateway's thread, the folds and the replays are exercised under the
// sanitizers (this file carries the "graph" label, so ThreadSanitizer runs it too). dist::MpiRunner's tests
// (tests/dist) check the same over MPI.
#include <gtest/gtest.h>

#include <condition_variable>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "mlstm/graph/exchange.hpp"
#include "mlstm/mlstm.hpp"
#include "mlstm/reference.hpp"
#include "mlstm/stages.hpp"
#include "test_util.hpp"

namespace mlstm {
namespace {

using testing::InputSpec;

// What the shards publish, per exchange call (a backward calls entering_state again: call numbers keep them apart).
struct Board {
  explicit Board(int shards) : P(shards) {}
  const int P;
  std::mutex mutex;
  std::condition_variable changed;
  std::map<int, std::vector<std::optional<graph::ShardSummary>>> states;
  std::map<int, std::vector<std::optional<graph::ShardGradientSummary>>> gradients;
  GateVariant gate = GateVariant::exp;
  int fail_shard = -1;  // this shard's exchange throws (and the others' then stop waiting: `failed`)
  bool failed = false;
};

class BoardExchange : public graph::StateExchange {
 public:
  BoardExchange(std::shared_ptr<Board> board, int shard) : board_(std::move(board)), shard_(shard) {}

  State entering_state(const graph::ShardSummary& mine) override {
    const int call = calls_++;
    std::unique_lock lock(board_->mutex);
    fail_if_asked();
    auto& slot = board_->states[call];
    slot.resize(static_cast<std::size_t>(board_->P));
    slot[static_cast<std::size_t>(shard_)] = mine;
    board_->changed.notify_all();
    board_->changed.wait(lock, [&] {
      if (board_->failed) return true;
      for (int j = 0; j < shard_; ++j)
        if (!slot[static_cast<std::size_t>(j)]) return false;
      return true;
    });
    if (board_->failed) throw Error("another shard failed");
    const graph::ShardSummary& first = *slot[0];
    State s{first.initial->C, first.initial->n, first.initial->m};
    for (int j = 0; j < shard_; ++j) s = combine(s, *slot[static_cast<std::size_t>(j)]);
    return s;
  }

  std::pair<Tensor, Tensor> leaving_gradient(const graph::ShardGradientSummary& mine) override {
    const int call = calls_++;
    std::unique_lock lock(board_->mutex);
    fail_if_asked();
    auto& slot = board_->gradients[call];
    slot.resize(static_cast<std::size_t>(board_->P));
    slot[static_cast<std::size_t>(shard_)] = mine;
    board_->changed.notify_all();
    board_->changed.wait(lock, [&] {
      if (board_->failed) return true;
      for (int j = shard_ + 1; j < board_->P; ++j)
        if (!slot[static_cast<std::size_t>(j)]) return false;
      return true;
    });
    if (board_->failed) throw Error("another shard failed");
    const graph::ShardGradientSummary& last = *slot[static_cast<std::size_t>(board_->P - 1)];
    Tensor dC = last.dc_last, dn = last.dn_last;    // the gradient leaving the last shard
    for (int j = board_->P - 1; j > shard_; --j) {  // through shard j: X -> L_j + D_j X
      const auto& g = *slot[static_cast<std::size_t>(j)];
      const std::int64_t rows = g.decay.dim(0) * g.decay.dim(1), KV = dC.numel() / rows, K = dn.numel() / rows;
      for (std::int64_t r = 0; r < rows; ++r) {
        const float D = g.decay.data<float>()[r];
        for (std::int64_t e = 0; e < KV; ++e)
          dC.data<float>()[r * KV + e] = g.dC.data<float>()[r * KV + e] + D * dC.data<float>()[r * KV + e];
        for (std::int64_t e = 0; e < K; ++e)
          dn.data<float>()[r * K + e] = g.dn.data<float>()[r * K + e] + D * dn.data<float>()[r * K + e];
      }
    }
    return {std::move(dC), std::move(dn)};
  }

 private:
  void fail_if_asked() {
    if (board_->fail_shard != shard_) return;
    board_->failed = true;
    board_->changed.notify_all();
    throw Error("exchange down (test)");
  }
  State combine(const State& in, const graph::ShardSummary& seg) const {
    const Shape& cs = in.C.shape();
    const std::int64_t rows = cs[0] * cs[1], K = cs[2], V = cs[3];
    State out{Tensor(cs, DType::f32), Tensor(in.n.shape(), DType::f32), Tensor(in.m.shape(), DType::f32)};
    for (std::int64_t r = 0; r < rows; ++r) {
      stages::combine(
          {in.C.data<float>() + r * K * V, in.n.data<float>() + r * K, in.m.data<float>() + r}, seg.G.data<float>()[r],
          {seg.local->C.data<float>() + r * K * V, seg.local->n.data<float>() + r * K, seg.local->m.data<float>() + r},
          board_->gate, K, V, {out.C.data<float>() + r * K * V, out.n.data<float>() + r * K, out.m.data<float>() + r});
    }
    return out;
  }
  std::shared_ptr<Board> board_;
  int shard_;
  int calls_ = 0;
};

// Runs fn(shard) for every shard at once, one thread each; rethrows the first error.
void run_shards(int P, const std::function<void(int)>& fn) {
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(P));
  for (int r = 0; r < P; ++r) {
    threads.emplace_back([&, r] {
      try {
        fn(r);
      } catch (...) {
        errors[static_cast<std::size_t>(r)] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// Tokens [t0, t1) of the inputs; the initial state enters the first shard only (sequence_slice leaves it out).
ForwardArgs shard_args(const testing::Inputs& in, std::int64_t t0, std::int64_t t1, bool first) {
  const ForwardArgs all = in.args();
  ForwardArgs a = sequence_slice(all, t0, t1);
  if (first) {
    a.c0 = all.c0;
    a.n0 = all.n0;
    a.m0 = all.m0;
  }
  return a;
}

struct Case {
  GateVariant gate;
  testing::InfGates inf;
  bool initial_state;
};

class ShardExchange : public ::testing::TestWithParam<Case> {};

// Shards cut anywhere: one of a single token, a ragged one, one of several segments (segment_tokens 16).
TEST_P(ShardExchange, ShardsTogetherEqualOneCallForwardAndBackward) {
  const Case c = GetParam();
  InputSpec s;
  s.B = 2;
  s.NH = 3;
  s.S = 150;
  s.DHQK = 8;
  s.DHHV = 12;
  s.gate = c.gate;
  s.inf = c.inf;
  s.initial_state = c.initial_state;
  auto in = testing::make_inputs(s, testing::fresh_seed());
  const bool infinite = c.inf != testing::InfGates::none;
  MlstmOptions o = testing::options_of(c.gate, 16);
  o.return_last_states = true;
  // Infinite gates: against the float64 recurrence with test_graph's tolerances (the shards sum in another order
  // than one call, and where the normaliser cancels that order shows: up to 2e-4 relative), else against one call.
  if (infinite) {
    ASSERT_GE(testing::quiet_normaliser_kinks(in, o, s), 0) << "most tokens near the normaliser's kink";
  }
  const std::vector<std::int64_t> cuts{0, 37, 38, 100, 150};
  const int P = static_cast<int>(cuts.size()) - 1;
  graph::FlowGraphRunner whole("workers");
  const ForwardResult one_call = infinite ? reference::recurrent_forward(in.args(), o) : whole.forward(in.args(), o);
  const BackwardResult one_back =
      infinite ? reference::recurrent_backward(in.backward_args(), o, reference::StabilizerGradient::stop)
               : whole.backward(in.backward_args(), o);
  const double h_tol = infinite ? 1e-3 : 2e-5, grad_tol = infinite ? 1e-2 : 1e-4;

  auto board = std::make_shared<Board>(P);
  board->gate = c.gate;
  std::vector<ForwardResult> fw(static_cast<std::size_t>(P));
  std::vector<BackwardResult> bw(static_cast<std::size_t>(P));
  run_shards(P, [&](int r) {
    graph::FlowGraphRunner runner("workers");
    runner.set_exchange(std::make_shared<BoardExchange>(board, r));
    const auto t0 = cuts[static_cast<std::size_t>(r)], t1 = cuts[static_cast<std::size_t>(r) + 1];
    fw[static_cast<std::size_t>(r)] = runner.forward(shard_args(in, t0, t1, r == 0), o, 16);
    BackwardArgs b;
    b.inputs = shard_args(in, t0, t1, r == 0);
    b.dh = sequence_slice(in.dh.view(), t0, t1);
    if (r == P - 1) {
      b.dc_last = in.dc_last.view();
      b.dn_last = in.dn_last.view();
    }
    bw[static_cast<std::size_t>(r)] = runner.backward(b, o, 16);
  });
  auto joined = [&](auto field) {
    Tensor t = field(0);
    for (int r = 1; r < P; ++r) t = testing::concat_seq(t, field(r));
    return t;
  };
  const std::string what = "shards " + std::string(testing::inf_gates_name(c.inf));
  const Tensor h = joined([&](int r) { return fw[static_cast<std::size_t>(r)].h; });
  if (infinite) {
    EXPECT_TRUE(testing::matches_well_conditioned(h, one_call.h, in, o, h_tol, what, "h", s));
    EXPECT_TRUE(testing::last_state_matches(fw.back().c, fw.back().n, fw.back().m, one_call.c, one_call.n, one_call.m,
                                            1e-3, 1e-3, what, s));
  } else {
    EXPECT_TRUE(testing::matches(h, one_call.h, h_tol, what, "h", s));
    EXPECT_TRUE(testing::matches(fw.back().c, one_call.c, 2e-5, what, "c_last", s));
    EXPECT_TRUE(testing::matches(fw.back().m, one_call.m, 1e-6, what, "m_last", s));
  }
  for (auto [name, get] : std::vector<std::pair<const char*, Tensor BackwardResult::*>>{{"dq", &BackwardResult::dq},
                                                                                        {"dk", &BackwardResult::dk},
                                                                                        {"dv", &BackwardResult::dv},
                                                                                        {"di", &BackwardResult::di},
                                                                                        {"df", &BackwardResult::df}}) {
    const Tensor got = joined([&](int r) { return bw[static_cast<std::size_t>(r)].*get; });
    EXPECT_TRUE(testing::matches(got, one_back.*get, grad_tol, what, name, s));
  }
  if (c.initial_state) {
    EXPECT_TRUE(testing::matches(bw.front().dc0, one_back.dc0, grad_tol, what, "dc0", s));
    EXPECT_TRUE(testing::matches(bw.front().dn0, one_back.dn0, grad_tol, what, "dn0", s));
  } else {
    EXPECT_TRUE(bw.front().dc0.empty());
  }
}

INSTANTIATE_TEST_SUITE_P(Gates, ShardExchange,
                         ::testing::Values(Case{GateVariant::exp, testing::InfGates::none, true},
                                           Case{GateVariant::exp, testing::InfGates::none, false},
                                           Case{GateVariant::sigmoid, testing::InfGates::none, true},
                                           Case{GateVariant::exp, testing::InfGates::mixed, true},
                                           Case{GateVariant::exp, testing::InfGates::forget_neg, false},
                                           Case{GateVariant::exp, testing::InfGates::input_pos, true}));

// An exchange that fails ends every shard's run with an error, none waits forever, and the runners work again.
TEST(ShardExchangeFaults, FailedExchangeEndsEveryShardAndTheRunnersRecover) {
  InputSpec s;
  s.B = 1;
  s.NH = 2;
  s.S = 96;
  s.DHQK = 8;
  s.DHHV = 8;
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  const MlstmOptions o = testing::options_of(GateVariant::exp, 16);
  const int P = 3;
  auto board = std::make_shared<Board>(P);
  board->fail_shard = 1;
  std::vector<std::string> errors(P);
  std::vector<std::unique_ptr<graph::FlowGraphRunner>> runners;
  for (int r = 0; r < P; ++r) runners.push_back(std::make_unique<graph::FlowGraphRunner>("workers"));
  run_shards(P, [&](int r) {
    runners[static_cast<std::size_t>(r)]->set_exchange(std::make_shared<BoardExchange>(board, r));
    try {
      (void)runners[static_cast<std::size_t>(r)]->forward(shard_args(in, 32 * r, 32 * (r + 1), r == 0), o, 16);
    } catch (const Error& e) {
      errors[static_cast<std::size_t>(r)] = e.what();
    }
  });
  EXPECT_EQ(errors[1], "exchange down (test)");
  EXPECT_EQ(errors[2], "another shard failed");  // it waits for shard 1's summary
  // Shard 0 waits for nobody: it may finish before shard 1 fails, or see the failure first.
  EXPECT_TRUE(errors[0].empty() || errors[0] == "another shard failed") << errors[0];
  // The same runners with a working exchange: the shards equal one call.
  auto good = std::make_shared<Board>(P);
  std::vector<Tensor> h(P);
  run_shards(P, [&](int r) {
    runners[static_cast<std::size_t>(r)]->set_exchange(std::make_shared<BoardExchange>(good, r));
    h[static_cast<std::size_t>(r)] =
        runners[static_cast<std::size_t>(r)]->forward(shard_args(in, 32 * r, 32 * (r + 1), r == 0), o, 16).h;
  });
  const ForwardResult one_call = graph::FlowGraphRunner("workers").forward(in.args(), o);
  EXPECT_TRUE(testing::matches(testing::concat_seq(testing::concat_seq(h[0], h[1]), h[2]), one_call.h, 2e-5,
                               "shards after a failed exchange", "h", s));
}

// What cannot run as one shard is refused, naming the exchange.
TEST(ShardExchangeFaults, HeadSplitPackedAndStreamsAreRefused) {
  graph::FlowGraphRunner runner("workers");
  runner.set_exchange(std::make_shared<BoardExchange>(std::make_shared<Board>(1), 0));
  InputSpec s;
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  const MlstmOptions o = testing::options_of(GateVariant::exp, 16);
  for (const auto& call :
       std::vector<std::function<void()>>{[&] { (void)runner.forward_head_split(in.args(), o); },
                                          [&] { (void)runner.backward_head_split(in.backward_args(), o); },
                                          [&] {
                                            (void)runner.open_stream(ProblemShape{1, 1, 16, 16, 16}, o);
                                          }}) {
    try {
      call();
      ADD_FAILURE() << "not refused";
    } catch (const InvalidArgument& e) {
      EXPECT_EQ(e.argument(), "exchange") << e.what();
    }
  }
}

}  // namespace
}  // namespace mlstm
