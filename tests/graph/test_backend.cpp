// The facade: registry access and the Backend's kernel choice (train / inference, step for S == 1).
#include <gtest/gtest.h>

#include <cstring>

#include "mlstm/mlstm.hpp"
#include "mlstm/reference.hpp"
#include "test_util.hpp"

namespace mlstm {
namespace {

using testing::InputSpec;
using testing::make_inputs;
using testing::matches;

TEST(Facade, AvailableKernelsListsTheBuiltins) {
  std::vector<std::string> names;
  for (const auto& k : available_kernels()) names.push_back(k.name);
  for (const char* want : {"chunkwise--cpu_xl_chunk", "parallel--reference_f64", "cpu"}) {
    EXPECT_NE(std::find(names.begin(), names.end(), want), names.end()) << want;
  }
  EXPECT_THROW(get_kernel("chunkwise--triton_xl_chunk"), InvalidArgument);
}

TEST(Backend, TrainUsesTheChunkwiseKernelForwardAndBackward) {
  InputSpec s;
  s.B = 2;
  s.NH = 3;
  s.S = 77;
  s.DHQK = 16;
  s.DHHV = 24;
  const auto in = make_inputs(s, testing::fresh_seed());
  BackendConfig cfg;
  cfg.chunk_size = 32;
  Backend backend(cfg);
  EXPECT_EQ(backend.kernel_for(77), "chunkwise--cpu_xl_chunk");
  EXPECT_EQ(backend.kernel_for(1), "chunkwise--cpu_xl_chunk");
  const auto out = backend.forward(in.args());
  const auto ref = reference::recurrent_forward(in.args(), backend.options());
  EXPECT_TRUE(matches(out.h, ref.h, 1e-4, "backend(train)", "h", s));
  const auto g = backend.backward(in.backward_args(false));
  const auto gref =
      reference::recurrent_backward(in.backward_args(false), backend.options(), reference::StabilizerGradient::stop);
  EXPECT_TRUE(matches(g.dk, gref.dk, 1e-3, "backend(train)", "dk", s));
}

// The facade's default chunk size is automatic: its kernel's choice, bit for bit the run that names it.
TEST(Backend, TheDefaultChunkSizeIsTheKernelsChoice) {
  InputSpec s;
  s.B = 1;
  s.NH = 2;
  s.S = 300;
  s.DHQK = 16;
  s.DHHV = 16;
  const auto in = make_inputs(s, testing::fresh_seed());
  const BackendConfig automatic;
  EXPECT_EQ(automatic.chunk_size, kAutoChunk);
  const auto out = Backend(automatic).forward(in.args());
  BackendConfig named;
  named.chunk_size = get_kernel(named.chunkwise_kernel)->chunk_for(shape_hint(in.args()), Backend(automatic).options());
  EXPECT_GE(named.chunk_size, 1);
  const auto want = Backend(named).forward(in.args());
  EXPECT_EQ(0, std::memcmp(out.h.bytes(), want.h.bytes(), out.h.nbytes()));
}

TEST(Backend, InferenceUsesTheStepKernelForOneToken) {
  InputSpec s;
  s.B = 2;
  s.NH = 2;
  s.S = 1;
  s.DHQK = 8;
  s.DHHV = 12;
  s.initial_state = true;
  const auto in = make_inputs(s, testing::fresh_seed());
  BackendConfig cfg;
  cfg.mode = BackendMode::inference;
  Backend backend(cfg);
  EXPECT_EQ(backend.kernel_for(1), "cpu");
  EXPECT_EQ(backend.kernel_for(5), "chunkwise--cpu_xl_chunk");
  const auto out = backend.forward(in.args());
  ASSERT_EQ(out.h.shape(), (Shape{2, 2, 1, 12}));
  const auto ref = reference::recurrent_forward(in.args(), backend.options());
  EXPECT_TRUE(matches(out.h, ref.h, 1e-5, "backend(inference step)", "h", s));
  EXPECT_TRUE(matches(out.c, ref.c, 1e-5, "backend(inference step)", "c", s));
  EXPECT_THROW(backend.backward(in.backward_args(false)), InvalidArgument);
}

TEST(Backend, AutocastConvertsInputs) {
  InputSpec s;
  s.S = 40;
  const auto in = make_inputs(s, testing::fresh_seed());
  BackendConfig cfg;
  cfg.autocast = DType::bf16;
  const auto out = Backend(cfg).forward(in.args());
  EXPECT_EQ(out.h.dtype(), DType::bf16);
}

TEST(Backend, BadConfigNamesTheField) {
  auto field = [](BackendConfig cfg) {
    try {
      Backend b(std::move(cfg));
    } catch (const InvalidArgument& e) {
      return e.argument();
    }
    return std::string("<nothing thrown>");
  };
  auto with = [](auto set) {
    BackendConfig cfg;
    set(cfg);
    return cfg;
  };
  EXPECT_EQ(field(with([](BackendConfig& c) { c.chunkwise_kernel = "nope"; })), "chunkwise_kernel");
  EXPECT_EQ(field(with([](BackendConfig& c) { c.chunkwise_kernel = "parallel--cpu"; })), "chunkwise_kernel");
  EXPECT_EQ(field(with([](BackendConfig& c) { c.step_kernel = "chunkwise--cpu_xl_chunk"; })), "step_kernel");
  EXPECT_EQ(field(with([](BackendConfig& c) { c.chunk_size = -1; })), "chunk_size");  // 0 is automatic
  EXPECT_EQ(field(with([](BackendConfig& c) { c.eps = -1.0; })), "eps");
}

}  // namespace
}  // namespace mlstm
