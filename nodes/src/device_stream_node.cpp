#include "mlstm/nodes/device_stream_node.hpp"

#include <spdlog/spdlog.h>

namespace mlstm::nodes {

DeviceStreamNode::DeviceStreamNode(tbb::flow::graph& g, std::shared_ptr<opencl::Device> device,
                                   opencl::DeviceStream::Config config)
    : stream_(std::make_unique<opencl::DeviceStream>(std::move(device), config)) {
  // serial: one piece is enqueued at a time, in arrival order (the state carries from piece to piece).
  node_ = std::make_unique<Node>(g, tbb::flow::serial,
                                 [this](const StreamPiece& piece, Node::gateway_type& gw) { submit(piece, gw); });
  completer_ = std::thread([this] { complete_loop(); });
}

DeviceStreamNode::~DeviceStreamNode() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  ready_.notify_all();
  if (completer_.joinable()) completer_.join();
}

std::exception_ptr DeviceStreamNode::error() const {
  std::lock_guard lock(mutex_);
  return error_;
}

void DeviceStreamNode::submit(const StreamPiece& piece, Node::gateway_type& gateway) {
  {
    std::lock_guard lock(mutex_);
    if (error_) return;  // the device failed earlier: drop
    gateway_ = &gateway;
  }
  gateway.reserve_wait();  // the graph waits for this piece's output
  try {
    const std::uint64_t ticket = stream_->push(piece.args);
    {
      std::lock_guard lock(mutex_);
      pending_.push_back({piece.index, ticket, piece.keep});
    }
    ready_.notify_one();
  } catch (...) {
    {
      std::lock_guard lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
    gateway.release_wait();
  }
}

void DeviceStreamNode::complete_loop() {
  for (;;) {
    Pending p;
    Node::gateway_type* gw = nullptr;
    {
      std::unique_lock lock(mutex_);
      ready_.wait(lock, [&] { return stopping_ || !pending_.empty(); });
      if (pending_.empty()) return;  // stopping, nothing left
      p = std::move(pending_.front());
      pending_.pop_front();
      gw = gateway_;
    }
    // take() only reads this piece's download event and staging: safe beside push() on the node's thread
    // because a slot is reused only after retire(), which waits for the same event (see DeviceStream).
    try {
      StreamOutput out{p.index, stream_->take(p.ticket)};
      gw->try_put(out);
    } catch (...) {
      std::lock_guard lock(mutex_);
      if (!error_) error_ = std::current_exception();
      spdlog::error("mlstm-flow: device stream failed at piece {}", p.index);
    }
    gw->release_wait();
  }
}

}  // namespace mlstm::nodes
