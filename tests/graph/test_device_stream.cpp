// DeviceStreamNode: pieces of one sequence through an OpenCL device inside a tbb::flow::graph (async_node),
// overlapped; the outputs in piece order equal one call over the whole sequence. On PoCL the tensor-core
// kernels run emulated.
#include <gtest/gtest.h>

#include <map>
#include <mutex>

#include "mlstm/devices/opencl/device.hpp"
#include "mlstm/devices/opencl/tc_routine.hpp"
#include "mlstm/nodes/device_stream_node.hpp"
#include "mlstm/reference.hpp"
#include "test_util.hpp"

namespace mlstm {
namespace {

Tensor cut(const Tensor& t, std::int64_t a, std::int64_t b) {
  if (t.dims() == 3)
    return testing::slice_seq(t.reshaped({t.dim(0), t.dim(1), t.dim(2), 1}), a, b)
        .reshaped({t.dim(0), t.dim(1), b - a});
  return testing::slice_seq(t, a, b);
}

struct OwnedPiece {
  Tensor q, k, v, i, f;
};

TEST(DeviceStreamNode, PiecesThroughAnAsyncNodeEqualOneCall) {
  if (opencl::list_devices().empty()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)";
  auto dev = opencl::open_device(opencl::select_devices("0").front());
  testing::InputSpec s;
  s.B = 2;
  s.NH = 1;
  s.S = 333;
  s.DHQK = 16;
  s.DHHV = 32;
  s.dtype = DType::bf16;
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  MlstmOptions o;
  const auto ref = reference::recurrent_forward(in.args(), o);

  opencl::DeviceStream::Config cfg;
  cfg.B = 2;
  cfg.NH = 1;
  cfg.DHQK = 16;
  cfg.DHHV = 32;
  cfg.max_piece = 64;
  cfg.dtype = DType::bf16;
  cfg.emulate = !opencl::tensor_core_support(dev->info()).available;
  tbb::flow::graph g;
  std::map<std::uint64_t, Tensor> outputs;
  std::mutex mutex;
  std::vector<std::uint64_t> order;
  {
    nodes::DeviceStreamNode gpu(g, dev, cfg);
    tbb::flow::function_node<nodes::StreamOutput> sink(g, tbb::flow::serial, [&](const nodes::StreamOutput& out) {
      std::lock_guard lock(mutex);
      order.push_back(out.index);
      outputs.emplace(out.index, out.h);
      return tbb::flow::continue_msg{};
    });
    tbb::flow::make_edge(gpu.node(), sink);
    std::uint64_t index = 0;
    for (std::int64_t t0 = 0; t0 < s.S; t0 += 50, ++index) {  // pieces of 50 tokens, the last shorter
      const std::int64_t t1 = std::min<std::int64_t>(s.S, t0 + 50);
      auto owned = std::make_shared<OwnedPiece>(
          OwnedPiece{cut(in.q, t0, t1), cut(in.k, t0, t1), cut(in.v, t0, t1), cut(in.i, t0, t1), cut(in.f, t0, t1)});
      nodes::StreamPiece piece;
      piece.index = index;
      piece.args.q = owned->q.view();
      piece.args.k = owned->k.view();
      piece.args.v = owned->v.view();
      piece.args.i = owned->i.view();
      piece.args.f = owned->f.view();
      piece.keep = owned;
      gpu.node().try_put(piece);
    }
    g.wait_for_all();
    EXPECT_FALSE(gpu.error());
    EXPECT_EQ(gpu.stream().tokens(), s.S);
  }
  ASSERT_EQ(outputs.size(), 7u);
  for (std::size_t j = 0; j < order.size(); ++j) EXPECT_EQ(order[j], j) << "outputs leave in piece order";
  Tensor h = outputs[0];
  for (std::uint64_t j = 1; j < outputs.size(); ++j) h = testing::concat_seq(h, outputs[j]);
  // As in the tensor-core tests: the 16-bit states put h at ill-conditioned tokens off by up to kappa times
  // their rounding (2.2e-2 in 1 of ~60 suite runs), so h is compared away from those tokens, finite everywhere.
  EXPECT_TRUE(testing::all_finite(h, "DeviceStreamNode", "h", s));
  const auto ill_conditioned = testing::near_normaliser_kink(in, o, s);
  EXPECT_TRUE(testing::matches(testing::replace_tokens(h, ref.h, ill_conditioned), ref.h, 2e-2, "DeviceStreamNode",
                               "h (tokens away from the normaliser's kink)", s));
}

// A piece that does not match the stream is an error of the node (reported, graph still finishes).
TEST(DeviceStreamNode, BadPieceIsReportedNotFatal) {
  if (opencl::list_devices().empty()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)";
  auto dev = opencl::open_device(opencl::select_devices("0").front());
  opencl::DeviceStream::Config cfg;
  cfg.B = 1;
  cfg.NH = 1;
  cfg.DHQK = 16;
  cfg.DHHV = 16;
  cfg.max_piece = 64;
  cfg.dtype = DType::bf16;
  cfg.emulate = !opencl::tensor_core_support(dev->info()).available;
  tbb::flow::graph g;
  nodes::DeviceStreamNode gpu(g, dev, cfg);
  testing::InputSpec s;
  s.B = 1;
  s.NH = 1;
  s.S = 100;
  s.DHQK = 16;
  s.DHHV = 16;
  s.dtype = DType::bf16;  // 100 > max_piece
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  gpu.node().try_put(nodes::StreamPiece{0, in.args(), nullptr});
  g.wait_for_all();
  ASSERT_TRUE(gpu.error());
  try {
    std::rethrow_exception(gpu.error());
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "len");
  }
}

}  // namespace
}  // namespace mlstm
