// A training-style loop: forward, a loss, backward, and a plain SGD step on q, k, v through the Backend.
#include <cstdio>

#include "example_common.hpp"

int main(int argc, char** argv) {
  const bool small = example::small(argc, argv);
  const std::int64_t S = small ? 256 : 4096, D = small ? 16 : 64, steps = small ? 5 : 20;
  std::mt19937 rng(4);
  auto in = example::make(2, 2, S, D, D, rng);
  const mlstm::Tensor target = example::random({2, 2, S, D}, 0, rng);
  mlstm::BackendConfig cfg;
  cfg.chunk_size = 64;
  mlstm::Backend backend(cfg);
  double first = 0, last = 0;
  for (std::int64_t step = 0; step < steps; ++step) {
    const auto out = backend.forward(in.args());
    // loss = 0.5 * |h - target|^2 ; dh = h - target
    mlstm::Tensor dh(out.h.shape(), mlstm::DType::f32);
    double loss = 0;
    for (std::int64_t e = 0; e < dh.numel(); ++e) {
      const float d = out.h.data<float>()[e] - target.data<float>()[e];
      dh.data<float>()[e] = d;
      loss += 0.5 * d * d;
    }
    mlstm::BackwardArgs b;
    b.inputs = in.args();
    b.dh = dh.view();
    const auto g = backend.backward(b);
    const float lr = 0.002f;
    for (auto [x, dx] : {std::pair{&in.q, &g.dq}, {&in.k, &g.dk}, {&in.v, &g.dv}}) {
      for (std::int64_t e = 0; e < x->numel(); ++e) x->data<float>()[e] -= lr * dx->data<float>()[e];
    }
    std::printf("step %lld: loss %.4f\n", static_cast<long long>(step), loss);
    if (step == 0) first = loss;
    last = loss;
  }
  return last < first ? 0 : 1;
}
