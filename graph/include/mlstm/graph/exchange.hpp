// A shard of a longer sequence whose other shards run elsewhere (other processes: mlstm::dist's MPI runner).
// A FlowGraphRunner given a StateExchange (set_exchange) treats its problem as one shard: its graph computes the
// shard's summary from its segments' local states, hands it to the exchange through an async_node gateway
// (the exchange runs on a thread of its own, so no TBB worker blocks in it), and continues from the state the
// exchange returns. The backward does the same with the shard's state-gradient summary.
//
//   forward:  segments' local states --> fold (in order) --> [gateway: entering_state()] --> state recurrence
//             from the returned state --> outputs
//   backward: ... local state gradients --> reverse fold --> [gateway: leaving_gradient()] --> reverse
//             recurrence from the returned gradient --> every segment's gradients
#pragma once

#include "mlstm/core/tensor.hpp"
#include "mlstm/devices/compute_device.hpp"

namespace mlstm::graph {

// What a shard's forward hands to the exchange.
struct ShardSummary {
  StateHandle initial;  // the shard problem's initial state (its c0 / n0 / m0; zeros with m = 0 when not given)
  StateHandle local;    // the state leaving the shard when it is entered in the EMPTY state (m = -inf)
  Tensor G;             // (B,NH) float32: the sum of logsigmoid(f) over the shard
};

// What a shard's backward hands to the exchange.
struct ShardGradientSummary {
  Tensor dC, dn;            // the gradient of the state entering the shard, with a ZERO gradient leaving it
  Tensor decay;             // (B,NH) float32: how a gradient leaving the shard reaches its entering state
  Tensor dc_last, dn_last;  // the shard problem's own gradient of its last state (zeros when not given)
};

class StateExchange {
 public:
  virtual ~StateExchange() = default;
  // The state entering this shard, given its summary. Called once per forward and once per backward (the
  // backward's entering states), on the gateway's own thread.
  virtual State entering_state(const ShardSummary& mine) = 0;
  // The gradient of the state leaving this shard (dC, dn), given its gradient summary. Once per backward.
  virtual std::pair<Tensor, Tensor> leaving_gradient(const ShardGradientSummary& mine) = 0;
};

}  // namespace mlstm::graph
