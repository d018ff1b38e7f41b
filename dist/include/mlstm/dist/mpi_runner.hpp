// One sequence across MPI processes (issue 17): every rank owns a contiguous shard of the sequence (all rows,
// tokens [first, second)) and computes it on its own devices through its own flow graph (graph::FlowGraphRunner).
// The only communication is the state exchange, which enters each rank's graph through an async_node gateway
// (graph/exchange.hpp), so no TBB worker blocks inside MPI:
//
//   forward:  every rank's shard summary (the state leaving it from EMPTY, and its log decay G) -> MPI_Exscan
//             with a user-defined associative, non-commutative op (stages.hpp's combine) -> the state entering
//             every shard -> each rank's outputs. O(B*NH*DHQK*DHHV) bytes per rank, whatever the sequence length.
//   backward: the same forward exchange for the entering states, then every rank's state-gradient summary (the
//             gradient entering its shard with zero leaving it, and its decay) -> MPI_Exscan over the ranks in
//             reverse order with the affine op -> the gradient leaving every shard -> each rank's gradients.
//
// Failures: every exchange first agrees on a status (MPI_Allreduce), and every run ends with an agreement on its
// outcome, so a rank that fails (bad shard, device error, out of memory) makes every rank's call throw the same
// RankFailed ("rank 2: ..."), and no rank waits for a collective that another rank will never enter.
//
//   MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
//   mlstm::dist::MpiRunner runner(MPI_COMM_WORLD, "workers");
//   options.chunk_size = 128;  // shards are whole chunks: a size every rank agrees on (not kAutoChunk)
//   auto [t0, t1] = mlstm::dist::shard_of(S, options.chunk_size, runner.rank(), runner.size());
//   ForwardResult mine = runner.forward(sequence_slice(args, t0, t1), options);  // h of tokens [t0, t1)
//
// MPI must be initialised with at least MPI_THREAD_SERIALIZED (the gateway's thread makes the exchange's calls
// while the calling thread waits in the graph). The runner duplicates the communicator.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "mlstm/core/error.hpp"
#include "mlstm/graph/runner.hpp"

namespace mlstm::dist {

// Tokens [first, second) of rank `rank` of `ranks` for a sequence of S tokens: whole chunks of `chunk_size`, the
// chunks spread as evenly as possible, the earlier ranks taking one more where they do not divide (the last shard
// ragged). With fewer chunks than ranks the LAST ranks get no tokens; rank 0 has tokens whenever S > 0.
std::pair<std::int64_t, std::int64_t> shard_of(std::int64_t S, std::int64_t chunk_size, int rank, int ranks);

// What every rank's call throws when any rank failed: the first failing rank's message ("rank 1: --q: ...") and
// the exit code that rank's error asks for (2 for the user's input, InvalidArgument; 1 otherwise).
// what() is "rank <r>: <that rank's message>"; argument() the InvalidArgument's argument there ("" for others).
class RankFailed : public Error {
 public:
  RankFailed(int rank, int exit_code, std::string argument, std::string message)
      : Error("rank " + std::to_string(rank) + ": " + message),
        rank_(rank),
        exit_code_(exit_code),
        argument_(std::move(argument)),
        message_(std::move(message)) {}
  int rank() const noexcept { return rank_; }
  int exit_code() const noexcept { return exit_code_; }
  const std::string& argument() const noexcept { return argument_; }
  const std::string& message() const noexcept { return message_; }  // that rank's message, without "rank <r>: "

 private:
  int rank_;
  int exit_code_;
  std::string argument_, message_;
};

// Runs fn on this rank, then agrees with every rank of `comm`: RankFailed on every rank when fn threw on any (the
// first failing rank's message and exit code). A collective: every rank of `comm` calls it. For work around the
// runs (opening devices, reading a rank's slice of the inputs, writing its outputs), so that a rank's failure
// there reaches the others instead of leaving them waiting in the next collective.
void collectively(MPI_Comm comm, const std::function<void()>& fn);
// Every rank's `mine`, in rank order, on every rank (MPI_Allgatherv).
std::vector<std::string> all_gather(MPI_Comm comm, const std::string& mine);
// The largest `mine` over the ranks of `comm`, on every rank.
double max_over_ranks(MPI_Comm comm, double mine);

// The exchanges alone, on synthetic summaries of `rows` rows of DHQK x DHHV (the code path of every run): the
// median seconds, over `repeats` after one untimed warm-up, of one forward exchange (state summaries) and one
// backward exchange (state-gradient summaries), each the largest over the ranks. Collective. For the benchmark of
// the exchange cost against the state size (benchmarks/mpi/bench_mpi.cpp).
struct ExchangeCost {
  double forward_seconds = 0, backward_seconds = 0;
  std::uint64_t bytes = 0;  // one rank's summary
};
ExchangeCost measure_exchange(MPI_Comm comm, std::int64_t rows, std::int64_t dhqk, std::int64_t dhhv, int repeats);

// The last run's exchanges on this rank.
struct ExchangeStats {
  int exchanges = 0;        // collective exchanges of states or gradients (1 per forward, 2 per backward)
  double seconds = 0;       // wall time inside them (status agreement + MPI_Exscan), this rank
  std::uint64_t bytes = 0;  // bytes of one rank's summary per exchange (what MPI_Exscan moves per step)
};

class MpiStateExchange;

class MpiRunner {
 public:
  // `comm` is duplicated (MPI_Comm_dup, a collective: every rank constructs its runner). InvalidArgument
  // ("comm") when MPI is not initialised or gives less than MPI_THREAD_SERIALIZED.
  MpiRunner(MPI_Comm comm, const std::string& device_spec);
  MpiRunner(MPI_Comm comm, std::vector<std::shared_ptr<ComputeDevice>> devices);
  ~MpiRunner();
  MpiRunner(const MpiRunner&) = delete;
  MpiRunner& operator=(const MpiRunner&) = delete;

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }
  MPI_Comm comm() const noexcept { return comm_; }
  // This rank's flow graph (balancing, plans, logs, DOT of its last run).
  graph::FlowGraphRunner& local() noexcept { return *graph_; }

  // The forward of this rank's shard: `shard` holds tokens [first, second) of every row (any length, the same B,
  // NH and head dims on every rank; an empty shard, S = 0, takes part in the exchange only). The initial state
  // (c0 / n0 / m0) belongs to rank 0 only (InvalidArgument "c0" on another rank). Returns h of the shard and, with
  // options.return_last_states, the state leaving the shard (on the last rank: the sequence's last state).
  // Collective: every rank calls it with the same options; RankFailed on every rank when any rank failed.
  ForwardResult forward(const ForwardArgs& shard, const MlstmOptions& options, std::int64_t segment_tokens = 0);
  // forward() with h written into the caller's (B,NH,shard S,DHHV) view (FlowGraphRunner::forward_into).
  ForwardResult forward_into(TensorView h, const ForwardArgs& shard, const MlstmOptions& options,
                             std::int64_t segment_tokens = 0);
  // The gradients of this rank's shard: dh of the shard; dc_last / dn_last (the gradient of the sequence's last
  // state) belong to the last rank only (InvalidArgument "dc_last" elsewhere). dc0 / dn0 / dm0 come out on rank 0.
  BackwardResult backward(const BackwardArgs& shard, const MlstmOptions& options, std::int64_t segment_tokens = 0);
  BackwardResult backward_into(const GradientViews& out, const BackwardArgs& shard, const MlstmOptions& options,
                               std::int64_t segment_tokens = 0);

  // dist::collectively over the runner's communicator.
  void collectively(const std::function<void()>& fn) { dist::collectively(comm_, fn); }
  const ExchangeStats& last_exchange() const noexcept;

 private:
  // Runs fn (a run of `gate` that makes `exchanges` exchanges), takes part in the exchanges it did not reach, then agrees on
  // the outcome (RankFailed on every rank when any failed).
  template <class Result>
  Result run(int exchanges, GateVariant gate, const std::function<Result()>& fn);
  BackwardResult run_backward(const GradientViews* out, const BackwardArgs& shard, const MlstmOptions& options,
                              std::int64_t segment_tokens);
  ForwardResult empty_forward(const ForwardArgs& shard, const MlstmOptions& options);
  BackwardResult empty_backward(const BackwardArgs& shard, const MlstmOptions& options);
  MPI_Comm comm_ = MPI_COMM_NULL, reversed_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  std::shared_ptr<MpiStateExchange> exchange_;
  std::unique_ptr<graph::FlowGraphRunner> graph_;
};

}  // namespace mlstm::dist
