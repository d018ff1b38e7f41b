#include "mlstm/dist/mpi_runner.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

#include "mlstm/core/env.hpp"
#include "mlstm/core/problem.hpp"
#include "mlstm/stages.hpp"

namespace mlstm::dist {

std::pair<std::int64_t, std::int64_t> shard_of(std::int64_t S, std::int64_t chunk_size, int rank, int ranks) {
  if (S < 0) throw InvalidArgument("S", "a sequence has no negative length");
  if (chunk_size < 1)
    throw InvalidArgument("chunk_size",
                          "must be at least 1 (an automatic one, 0, is resolved first: every rank the "
                          "same, e.g. rank 0's FlowGraphRunner::with_chunk)");
  if (ranks < 1 || rank < 0 || rank >= ranks) throw InvalidArgument("rank", "must be in [0, ranks)");
  // base chunks each, one more for the first `extra` ranks: the empty shards (fewer chunks than ranks) come last,
  // so rank 0, which holds the initial state, always has tokens when the sequence has.
  const std::int64_t chunks = S / chunk_size + (S % chunk_size != 0);
  const std::int64_t base = chunks / ranks, extra = chunks % ranks;
  const auto cut = [&](std::int64_t r) { return std::min(S, (r * base + std::min(r, extra)) * chunk_size); };
  return {cut(rank), cut(rank + 1)};
}

namespace {

// Thrown inside a rank when another rank reported a failure at an exchange: this rank's own work did not fail.
class RemoteFailure : public Error {
 public:
  RemoteFailure() : Error("another rank failed") {}
};

void check_mpi(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  throw Error(std::string("MPI: ") + what + ": " + std::string(text, static_cast<std::size_t>(len)));
}

// ---- the exchanged elements: one per row, self-describing (the ops are plain C functions) -----------------
// forward: [gate, K, V, m, G, n (K), C (K*V)]   backward: [K, V, decay, dn (K), dC (K*V)]
constexpr std::int64_t kForwardHead = 5, kBackwardHead = 3;

std::int64_t forward_stride(std::int64_t K, std::int64_t V) { return kForwardHead + K + K * V; }
std::int64_t backward_stride(std::int64_t K, std::int64_t V) { return kBackwardHead + K + K * V; }

// inout = in (the earlier shards) followed by inout (the later ones): the state leaving both, and G summed.
extern "C" void forward_op(void* in, void* inout, int* len, MPI_Datatype*) {
  const auto* a = static_cast<const float*>(in);
  auto* b = static_cast<float*>(inout);
  for (int r = 0; r < *len; ++r) {
    const auto gate = static_cast<GateVariant>(static_cast<int>(a[0]));
    const auto K = static_cast<std::int64_t>(a[1]), V = static_cast<std::int64_t>(a[2]);
    const std::int64_t stride = forward_stride(K, V);
    const float* ar = a + r * stride;
    float* br = b + r * stride;
    const stages::ConstStateRef earlier(ar + kForwardHead + K, ar + kForwardHead, ar + 3);
    stages::StateRef later{br + kForwardHead + K, br + kForwardHead, br + 3};
    stages::combine(earlier, br[4], later, gate, K, V, later);  // `out` may be `local`
    br[4] += ar[4];
  }
}

// Reverse order: in = the later shards' map X -> L + D X, inout = the earlier ones'; inout becomes the earlier map
// after the later one.
extern "C" void backward_op(void* in, void* inout, int* len, MPI_Datatype*) {
  const auto* a = static_cast<const float*>(in);
  auto* b = static_cast<float*>(inout);
  for (int r = 0; r < *len; ++r) {
    const auto K = static_cast<std::int64_t>(a[0]), V = static_cast<std::int64_t>(a[1]);
    const std::int64_t stride = backward_stride(K, V);
    const float* ar = a + r * stride;
    float* br = b + r * stride;
    const float D = br[2];
    if (D != 0.f)
      for (std::int64_t e = kBackwardHead; e < stride; ++e) br[e] += D * ar[e];
    br[2] = D * ar[2];
  }
}

// A datatype of one row element of `floats` float32s.
struct RowType {
  MPI_Datatype type = MPI_DATATYPE_NULL;
  std::uint64_t bytes = 0;  // of one record
  explicit RowType(std::int64_t floats) : bytes(static_cast<std::uint64_t>(floats) * sizeof(float)) {
    if (floats > std::numeric_limits<int>::max())
      throw InvalidArgument("DHQK", "a row's state is too large for one MPI element (DHQK * DHHV < 2^31)");
    check_mpi(MPI_Type_contiguous(static_cast<int>(floats), MPI_FLOAT, &type), "MPI_Type_contiguous");
    check_mpi(MPI_Type_commit(&type), "MPI_Type_commit");
  }
  ~RowType() {
    if (type != MPI_DATATYPE_NULL) MPI_Type_free(&type);
  }
  RowType(const RowType&) = delete;
  RowType& operator=(const RowType&) = delete;
};

struct Op {
  MPI_Op op = MPI_OP_NULL;
  explicit Op(MPI_User_function* fn) { check_mpi(MPI_Op_create(fn, 0 /* not commutative */, &op), "MPI_Op_create"); }
  ~Op() {
    if (op != MPI_OP_NULL) MPI_Op_free(&op);
  }
  Op(const Op&) = delete;
  Op& operator=(const Op&) = delete;
};

State copy_state(const State& s) { return State{s.C, s.n, s.m}; }

}  // namespace

// The exchange of one MpiRunner: the graph's gateway calls entering_state() / leaving_gradient(); the runner
// tells it how many exchanges a run makes and has it take part in the ones its graph never reached (with a
// failure status), so every rank makes the same collective calls in the same order.
class MpiStateExchange : public graph::StateExchange {
 public:
  MpiStateExchange(MPI_Comm comm, MPI_Comm reversed, int rank, int size)
      : comm_(comm), reversed_(reversed), rank_(rank), size_(size) {}

  void begin(int exchanges, GateVariant gate) {
    expected_ = exchanges;
    done_ = 0;
    gate_ = gate;
    stats_ = {};
  }
  // Takes part in the run's exchanges that were not made (status: failed; they end there on every rank).
  void skip_remaining() {
    while (done_ < expected_) {
      try {
        agree_status(false);
      } catch (const RemoteFailure&) {  // expected: this rank's own status was the failure
      }
    }
  }
  const ExchangeStats& stats() const noexcept { return stats_; }

  State entering_state(const graph::ShardSummary& mine) override {
    const auto t0 = std::chrono::steady_clock::now();
    agree_status(true);
    if (size_ == 1) return copy_state(*mine.initial);
    const Shape& cs = mine.local->C.shape();
    const std::int64_t rows = cs[0] * cs[1], K = cs[2], V = cs[3], stride = forward_stride(K, V);
    const RowType row(stride);  // refuses a record too large for MPI before anything is allocated
    float* send = buffer(send_, rows * stride);
    float* recv = buffer(recv_, rows * stride);
    for (std::int64_t r = 0; r < rows; ++r) {
      float* e = send + r * stride;
      e[0] = static_cast<float>(static_cast<int>(gate_));
      e[1] = static_cast<float>(K);
      e[2] = static_cast<float>(V);
      e[4] = mine.G.data<float>()[r];
      const State& local = *mine.local;
      const stages::ConstStateRef lr(local.C.data<float>() + r * K * V, local.n.data<float>() + r * K,
                                     local.m.data<float>() + r);
      stages::StateRef out{e + kForwardHead + K, e + kForwardHead, e + 3};
      if (rank_ == 0) {
        // Rank 0's element is the state leaving it from the sequence's initial state (nothing comes before it).
        const State& init = *mine.initial;
        const stages::ConstStateRef ir(init.C.data<float>() + r * K * V, init.n.data<float>() + r * K,
                                       init.m.data<float>() + r);
        stages::combine(ir, e[4], lr, gate_, K, V, out);
      } else {
        std::copy_n(lr.C, K * V, out.C);
        std::copy_n(lr.n, K, out.n);
        *out.m = *lr.m;
      }
    }
    exscan(send, recv, rows, row, &forward_op, comm_, t0);
    if (rank_ == 0) return copy_state(*mine.initial);
    State s{Tensor({cs[0], cs[1], K, V}, DType::f32), Tensor({cs[0], cs[1], K}, DType::f32),
            Tensor({cs[0], cs[1]}, DType::f32)};
    for (std::int64_t r = 0; r < rows; ++r) {
      const float* e = recv + r * stride;
      s.m.data<float>()[r] = e[3];
      std::copy_n(e + kForwardHead, K, s.n.data<float>() + r * K);
      std::copy_n(e + kForwardHead + K, K * V, s.C.data<float>() + r * K * V);
    }
    return s;
  }

  std::pair<Tensor, Tensor> leaving_gradient(const graph::ShardGradientSummary& mine) override {
    const auto t0 = std::chrono::steady_clock::now();
    agree_status(true);
    const bool last = rank_ == size_ - 1;
    if (size_ == 1) return {mine.dc_last, mine.dn_last};
    const Shape& cs = mine.dC.shape();
    const std::int64_t rows = cs[0] * cs[1], K = cs[2], V = cs[3], stride = backward_stride(K, V);
    const RowType row(stride);
    float* send = buffer(send_, rows * stride);
    float* recv = buffer(recv_, rows * stride);
    for (std::int64_t r = 0; r < rows; ++r) {
      float* e = send + r * stride;
      e[0] = static_cast<float>(K);
      e[1] = static_cast<float>(V);
      const float D = mine.decay.data<float>()[r];
      const float* lC = mine.dC.data<float>() + r * K * V;
      const float* ln = mine.dn.data<float>() + r * K;
      if (last) {
        // The last rank's element is the gradient entering it from the sequence's dc_last / dn_last: a constant map.
        const float* xC = mine.dc_last.data<float>() + r * K * V;
        const float* xn = mine.dn_last.data<float>() + r * K;
        e[2] = 0.f;
        for (std::int64_t j = 0; j < K; ++j) e[kBackwardHead + j] = ln[j] + (D != 0.f ? D * xn[j] : 0.f);
        for (std::int64_t j = 0; j < K * V; ++j) e[kBackwardHead + K + j] = lC[j] + (D != 0.f ? D * xC[j] : 0.f);
      } else {
        e[2] = D;
        std::copy_n(ln, K, e + kBackwardHead);
        std::copy_n(lC, K * V, e + kBackwardHead + K);
      }
    }
    exscan(send, recv, rows, row, &backward_op, reversed_, t0);
    if (last) return {mine.dc_last, mine.dn_last};
    Tensor dC({cs[0], cs[1], K, V}, DType::f32), dn({cs[0], cs[1], K}, DType::f32);
    for (std::int64_t r = 0; r < rows; ++r) {
      const float* e = recv + r * stride;
      std::copy_n(e + kBackwardHead, K, dn.data<float>() + r * K);
      std::copy_n(e + kBackwardHead + K, K * V, dC.data<float>() + r * K * V);
    }
    return {std::move(dC), std::move(dn)};
  }

 private:
  // MPI_Exscan of `rows` records of type `row` under `fn` over `comm`; the time since t0 and the bytes counted.
  void exscan(const float* send, float* recv, std::int64_t rows, const RowType& row, MPI_User_function* fn,
              MPI_Comm comm, std::chrono::steady_clock::time_point t0) {
    const Op op(fn);
    check_mpi(MPI_Exscan(send, recv, static_cast<int>(rows), row.type, op.op, comm), "MPI_Exscan");
    stats_.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    stats_.bytes = static_cast<std::uint64_t>(rows) * row.bytes;
  }
  // Every exchange starts with every rank's status; a failure anywhere ends it on every rank (RemoteFailure).
  void agree_status(bool ok) {
    if (done_ >= expected_) throw Error("MpiStateExchange: more exchanges than the run announced");
    ++done_;
    ++stats_.exchanges;
    int mine = ok ? 0 : 1, any = 0;
    check_mpi(MPI_Allreduce(&mine, &any, 1, MPI_INT, MPI_MAX, comm_), "MPI_Allreduce (status)");
    if (any != 0) throw RemoteFailure();
  }
  // The exchange's buffers, kept from run to run: a fresh 4 MiB buffer costs more in page faults than the
  // exchange itself (measured: 2-6 ms of 5-15 ms at 64 rows of 128 x 128).
  static float* buffer(std::vector<float>& v, std::int64_t floats) {
    if (v.size() < static_cast<std::size_t>(floats)) v.resize(static_cast<std::size_t>(floats));
    return v.data();
  }
  std::vector<float> send_, recv_;
  MPI_Comm comm_, reversed_;
  int rank_, size_;
  int expected_ = 0, done_ = 0;
  GateVariant gate_ = GateVariant::exp;
  ExchangeStats stats_;
};

namespace {

MPI_Comm duplicate(MPI_Comm comm, int& rank, int& size) {
  int initialised = 0, finalised = 0;
  MPI_Initialized(&initialised);
  MPI_Finalized(&finalised);
  if (!initialised || finalised) throw InvalidArgument("comm", "MPI is not initialised");
  int provided = 0;
  MPI_Query_thread(&provided);
  if (provided < MPI_THREAD_SERIALIZED) {
    throw InvalidArgument("comm",
                          "MPI must be initialised with MPI_THREAD_SERIALIZED or more (MPI_Init_thread): the "
                          "flow graph's gateway thread makes the exchange's calls");
  }
  MPI_Comm dup = MPI_COMM_NULL;
  check_mpi(MPI_Comm_dup(comm, &dup), "MPI_Comm_dup");
  MPI_Comm_rank(dup, &rank);
  MPI_Comm_size(dup, &size);
  return dup;
}

}  // namespace

MpiRunner::MpiRunner(MPI_Comm comm, const std::string& device_spec) : MpiRunner(comm, devices_from_spec(device_spec)) {}

MpiRunner::MpiRunner(MPI_Comm comm, std::vector<std::shared_ptr<ComputeDevice>> devices) {
  comm_ = duplicate(comm, rank_, size_);
  MPI_Comm reversed = MPI_COMM_NULL;
  check_mpi(MPI_Comm_split(comm_, 0, size_ - 1 - rank_, &reversed), "MPI_Comm_split");
  exchange_ = std::make_shared<MpiStateExchange>(comm_, reversed, rank_, size_);
  reversed_ = reversed;
  graph_ = std::make_unique<graph::FlowGraphRunner>(std::move(devices));
  graph_->set_exchange(exchange_);
}

MpiRunner::~MpiRunner() {
  int finalised = 0;
  MPI_Finalized(&finalised);
  if (finalised) return;
  if (reversed_ != MPI_COMM_NULL) MPI_Comm_free(&reversed_);
  if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

const ExchangeStats& MpiRunner::last_exchange() const noexcept { return exchange_->stats(); }

namespace {

// The outcome of a step on every rank: returns when no rank failed, else throws RankFailed everywhere.
void agree(MPI_Comm comm, std::exception_ptr error) {
  int rank = 0, size = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  int code = 0;
  std::string argument, message;
  if (error) {
    try {
      std::rethrow_exception(error);
    } catch (const RemoteFailure&) {
      // not this rank's failure: the failing rank's message comes below
    } catch (const RankFailed& e) {  // a nested agreement's outcome: passed on as it is
      code = e.exit_code();
      argument = e.argument();
      message = e.message();
    } catch (const InvalidArgument& e) {
      code = 2;
      argument = e.argument();
      message = e.what();
    } catch (const std::exception& e) {
      code = 1;
      message = e.what();
    } catch (...) {
      code = 1;
      message = "unknown error";
    }
  }
  int mine = code != 0 ? rank : size, first = size;
  check_mpi(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm), "MPI_Allreduce (outcome)");
  if (first == size) {
    if (error) std::rethrow_exception(error);  // a RemoteFailure with no failing rank cannot happen; never hidden
    return;
  }
  // The first failing rank tells every rank its exit code, argument and message.
  int head[3] = {code, static_cast<int>(argument.size()), static_cast<int>(message.size())};
  check_mpi(MPI_Bcast(head, 3, MPI_INT, first, comm), "MPI_Bcast (failure)");
  argument.resize(static_cast<std::size_t>(head[1]));
  message.resize(static_cast<std::size_t>(head[2]));
  if (head[1] > 0) check_mpi(MPI_Bcast(argument.data(), head[1], MPI_CHAR, first, comm), "MPI_Bcast (failure)");
  if (head[2] > 0) check_mpi(MPI_Bcast(message.data(), head[2], MPI_CHAR, first, comm), "MPI_Bcast (failure)");
  throw RankFailed(first, head[0], argument, message);
}

}  // namespace

void collectively(MPI_Comm comm, const std::function<void()>& fn) {
  std::exception_ptr error;
  try {
    fn();
  } catch (...) {
    error = std::current_exception();
  }
  agree(comm, error);
}

std::vector<std::string> all_gather(MPI_Comm comm, const std::string& mine) {
  int size = 1;
  MPI_Comm_size(comm, &size);
  const int len = static_cast<int>(mine.size());
  std::vector<int> lens(static_cast<std::size_t>(size)), at(static_cast<std::size_t>(size));
  check_mpi(MPI_Allgather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, comm), "MPI_Allgather");
  int total = 0;
  for (int r = 0; r < size; ++r) {
    at[static_cast<std::size_t>(r)] = total;
    total += lens[static_cast<std::size_t>(r)];
  }
  std::string all(static_cast<std::size_t>(total), '\0');
  check_mpi(MPI_Allgatherv(mine.data(), len, MPI_CHAR, all.data(), lens.data(), at.data(), MPI_CHAR, comm),
            "MPI_Allgatherv");
  std::vector<std::string> out;
  for (int r = 0; r < size; ++r)
    out.push_back(all.substr(static_cast<std::size_t>(at[static_cast<std::size_t>(r)]),
                             static_cast<std::size_t>(lens[static_cast<std::size_t>(r)])));
  return out;
}

double max_over_ranks(MPI_Comm comm, double mine) {
  double out = mine;
  check_mpi(MPI_Allreduce(&mine, &out, 1, MPI_DOUBLE, MPI_MAX, comm), "MPI_Allreduce (max)");
  return out;
}

namespace {

// Test hook: MLSTM_MPI_FAIL_RANK=<rank> makes that rank's runs fail as a device would (before its graph).
void check_injected_rank_failure(int rank) {
  if (env::index("MLSTM_MPI_FAIL_RANK", "a rank") == rank)
    throw DeviceError(DeviceError::Kind::lost, "MLSTM_MPI_FAIL_RANK", "injected device failure");
}

std::int64_t tokens_of(ConstTensorView q) { return q.dims() >= 3 ? q.dim(2) : -1; }

}  // namespace

template <class Result>
Result MpiRunner::run(int exchanges, GateVariant gate, const std::function<Result()>& fn) {
  exchange_->begin(exchanges, gate);
  Result result;
  std::exception_ptr error;
  try {
    result = fn();
  } catch (...) {
    error = std::current_exception();
  }
  exchange_->skip_remaining();
  agree(comm_, error);
  return result;
}

ForwardResult MpiRunner::forward(const ForwardArgs& shard, const MlstmOptions& options, std::int64_t segment_tokens) {
  return forward_into({}, shard, options, segment_tokens);
}

ForwardResult MpiRunner::forward_into(TensorView h, const ForwardArgs& shard, const MlstmOptions& options,
                                      std::int64_t segment_tokens) {
  return run<ForwardResult>(1, options.gate, [&] {
    check_injected_rank_failure(rank_);
    if (rank_ != 0 && shard.has_initial_state())
      throw InvalidArgument("c0", "the initial state belongs to the first shard (rank 0)");
    if (tokens_of(shard.q) == 0) return empty_forward(shard, options);
    return h.empty() ? graph_->forward(shard, options, segment_tokens)
                     : graph_->forward_into(h, shard, options, segment_tokens);
  });
}

BackwardResult MpiRunner::backward(const BackwardArgs& shard, const MlstmOptions& options,
                                   std::int64_t segment_tokens) {
  return run_backward(nullptr, shard, options, segment_tokens);
}

BackwardResult MpiRunner::backward_into(const GradientViews& out, const BackwardArgs& shard,
                                        const MlstmOptions& options, std::int64_t segment_tokens) {
  return run_backward(&out, shard, options, segment_tokens);
}

BackwardResult MpiRunner::run_backward(const GradientViews* out, const BackwardArgs& shard, const MlstmOptions& options,
                                       std::int64_t segment_tokens) {
  return run<BackwardResult>(2, options.gate, [&] {
    check_injected_rank_failure(rank_);
    if (rank_ != 0 && shard.inputs.has_initial_state())
      throw InvalidArgument("c0", "the initial state belongs to the first shard (rank 0)");
    if (rank_ != size_ - 1 && (!shard.dc_last.empty() || !shard.dn_last.empty()))
      throw InvalidArgument("dc_last", "the gradient of the last state belongs to the last shard (rank " +
                                           std::to_string(size_ - 1) + ")");
    if (tokens_of(shard.inputs.q) == 0) return empty_backward(shard, options);
    return out ? graph_->backward_into(*out, shard, options, segment_tokens)
               : graph_->backward(shard, options, segment_tokens);
  });
}

// An empty shard (more ranks than chunks): no graph; it takes part in the exchanges with the identity (the EMPTY
// state, G = 0; a zero gradient, decay 1) and hands on what it receives.
ForwardResult MpiRunner::empty_forward(const ForwardArgs& shard, const MlstmOptions& options) {
  if (rank_ == 0) throw InvalidArgument("q", "rank 0's shard is empty");
  const std::int64_t B = shard.q.dim(0), NH = shard.q.dim(1), K = shard.q.dim(3), V = shard.v.dim(3);
  graph::ShardSummary mine;
  mine.initial = std::make_shared<const State>(State::zeros(B, NH, K, V));
  State empty = State::zeros(B, NH, K, V);
  if (options.gate == GateVariant::exp)
    empty.m = Tensor::full({B, NH}, DType::f32, -std::numeric_limits<double>::infinity());
  mine.local = std::make_shared<const State>(std::move(empty));
  mine.G = Tensor::zeros({B, NH}, DType::f32);
  State entering = exchange_->entering_state(mine);
  ForwardResult r;
  r.h = Tensor({B, NH, 0, V}, shard.q.dtype());
  if (options.return_last_states) {
    r.c = std::move(entering.C);
    r.n = std::move(entering.n);
    r.m = std::move(entering.m);
  }
  return r;
}

BackwardResult MpiRunner::empty_backward(const BackwardArgs& shard, const MlstmOptions& options) {
  const ForwardArgs& a = shard.inputs;
  ForwardResult fw = empty_forward(a, options);  // the entering states' exchange
  const std::int64_t B = a.q.dim(0), NH = a.q.dim(1), K = a.q.dim(3), V = a.v.dim(3);
  graph::ShardGradientSummary mine;
  mine.dC = Tensor::zeros({B, NH, K, V}, DType::f32);
  mine.dn = Tensor::zeros({B, NH, K}, DType::f32);
  mine.decay = Tensor::full({B, NH}, DType::f32, 1.0);
  mine.dc_last =
      shard.dc_last.empty() ? Tensor::zeros({B, NH, K, V}, DType::f32) : Tensor::copy_of(shard.dc_last, DType::f32);
  mine.dn_last =
      shard.dn_last.empty() ? Tensor::zeros({B, NH, K}, DType::f32) : Tensor::copy_of(shard.dn_last, DType::f32);
  exchange_->leaving_gradient(mine);
  BackwardResult r;
  r.dq = Tensor({B, NH, 0, K}, a.q.dtype());
  r.dk = Tensor({B, NH, 0, K}, a.q.dtype());
  r.dv = Tensor({B, NH, 0, V}, a.q.dtype());
  r.di = Tensor({B, NH, 0}, a.i.dtype());  // the gate gradients come in the gates' dtype (ProblemShape::gate_dtype)
  r.df = Tensor({B, NH, 0}, a.i.dtype());
  return r;
}

ExchangeCost measure_exchange(MPI_Comm comm, std::int64_t rows, std::int64_t dhqk, std::int64_t dhhv, int repeats) {
  if (rows < 1 || dhqk < 1 || dhhv < 1 || repeats < 1)
    throw InvalidArgument("rows", "the exchange benchmark needs rows, head dims and repeats of at least 1");
  int rank = 0, size = 1;
  MPI_Comm dup = duplicate(comm, rank, size), reversed = MPI_COMM_NULL;
  check_mpi(MPI_Comm_split(dup, 0, size - 1 - rank, &reversed), "MPI_Comm_split");
  MpiStateExchange exchange(dup, reversed, rank, size);
  graph::ShardSummary fw;
  fw.initial = std::make_shared<const State>(State::zeros(1, rows, dhqk, dhhv));
  State local = State::zeros(1, rows, dhqk, dhhv);
  for (std::int64_t e = 0; e < shape_numel(local.C.shape()); ++e)
    local.C.data<float>()[e] = 0.01f * static_cast<float>(e % 97);
  fw.local = std::make_shared<const State>(std::move(local));
  fw.G = Tensor::full({1, rows}, DType::f32, -0.5);
  graph::ShardGradientSummary bw;
  bw.dC = fw.local->C;
  bw.dn = fw.local->n;
  bw.decay = Tensor::full({1, rows}, DType::f32, 0.5);
  bw.dc_last = Tensor::zeros({1, rows, dhqk, dhhv}, DType::f32);
  bw.dn_last = Tensor::zeros({1, rows, dhqk}, DType::f32);
  std::vector<double> f, b;
  for (int r = 0; r <= repeats; ++r) {
    exchange.begin(2, GateVariant::exp);
    MPI_Barrier(dup);
    auto t0 = std::chrono::steady_clock::now();
    (void)exchange.entering_state(fw);
    const double tf = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    MPI_Barrier(dup);
    t0 = std::chrono::steady_clock::now();
    (void)exchange.leaving_gradient(bw);
    const double tb = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (r == 0) continue;  // warm-up
    f.push_back(max_over_ranks(dup, tf));
    b.push_back(max_over_ranks(dup, tb));
  }
  ExchangeCost cost;
  cost.bytes = exchange.stats().bytes;
  std::sort(f.begin(), f.end());
  std::sort(b.begin(), b.end());
  cost.forward_seconds = f[f.size() / 2];
  cost.backward_seconds = b[b.size() / 2];
  MPI_Comm_free(&reversed);
  MPI_Comm_free(&dup);
  return cost;
}

}  // namespace mlstm::dist
