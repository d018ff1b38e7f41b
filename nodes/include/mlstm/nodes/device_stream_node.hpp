// A oneTBB flow-graph node that streams pieces of one sequence through an OpenCL device (DeviceStream:
// state on the device, transfers overlapped with compute). It is an async_node: the TBB thread that
// delivers a piece only enqueues its transfers and kernels and returns; a completion thread waits for the
// piece's h and puts it into the graph through the node's gateway, so no TBB worker blocks on the device
// and pieces are in flight on the PCIe links and the GPU at the same time.
//
//   tbb::flow::graph g;
//   mlstm::nodes::DeviceStreamNode gpu(g, device, config);          // config: opencl::DeviceStream::Config
//   tbb::flow::function_node<mlstm::nodes::StreamPiece> source(...);  // or any sender of StreamPiece
//   tbb::flow::make_edge(source, gpu.node());
//   tbb::flow::make_edge(gpu.node(), sink);                          // receives StreamOutput, in piece order
//   ... source.try_put(piece) ...; g.wait_for_all();
//
// Pieces must arrive in sequence order (the state carries from one to the next): put them from one
// thread, or put a sequencer_node<StreamPiece> (by index) in front. Outputs leave in the same order.
#pragma once

#include <tbb/flow_graph.h>

#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>

#include "mlstm/devices/opencl/stream.hpp"

namespace mlstm::nodes {

// One piece of the stream: q, k, v (B,NH,len,D), i, f (B,NH,len); the producer keeps the tensors alive
// until the piece's StreamOutput arrives (or hands ownership through `keep`).
struct StreamPiece {
  std::uint64_t index = 0;
  ForwardArgs args;
  std::shared_ptr<const void> keep;  // optional owner of the tensors behind args
};

struct StreamOutput {
  std::uint64_t index = 0;
  Tensor h;  // (B,NH,len,DHHV) in the stream's dtype
};

class DeviceStreamNode {
 public:
  using Node = tbb::flow::async_node<StreamPiece, StreamOutput>;

  DeviceStreamNode(tbb::flow::graph& g, std::shared_ptr<opencl::Device> device, opencl::DeviceStream::Config config);
  ~DeviceStreamNode();  // call g.wait_for_all() first; joins the completion thread
  DeviceStreamNode(const DeviceStreamNode&) = delete;
  DeviceStreamNode& operator=(const DeviceStreamNode&) = delete;

  Node& node() noexcept { return *node_; }
  opencl::DeviceStream& stream() noexcept { return *stream_; }
  // The first error of the device (the graph keeps running; pieces after an error are dropped).
  std::exception_ptr error() const;

 private:
  struct Pending {
    std::uint64_t index, ticket;
    std::shared_ptr<const void> keep;
  };
  void submit(const StreamPiece& piece, Node::gateway_type& gateway);
  void complete_loop();

  std::unique_ptr<opencl::DeviceStream> stream_;
  std::unique_ptr<Node> node_;
  Node::gateway_type* gateway_ = nullptr;
  mutable std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<Pending> pending_;
  std::exception_ptr error_;
  bool stopping_ = false;
  std::thread completer_;
};

}  // namespace mlstm::nodes
