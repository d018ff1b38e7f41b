// Training steps through the flow graph, laid out as a GPU wants them: inputs, h, dh and the gradients live in the
// runner's host tensors (page-locked memory of its first GPU, which its streams read and write without a host copy;
// ordinary memory when it has none), the forward keeps the states its pieces leave (StateCheckpoints) and the
// backward of the same inputs starts from them instead of recomputing them. Each step: forward, a squared-error loss
// and its dh, backward, an SGD step on q, k and v in place. Exits 0 when the loss went down.
//
//   example_training_step_graph [--small] [DEVICES]      DEVICES: a device spec, default "workers" ("gpu:all", ...)
#include <cstdio>
#include <cstring>
#include <string>

#include "example_common.hpp"

int main(int argc, char** argv) {
  const bool small = example::small(argc, argv);
  const std::string devices = argc > 2 ? argv[2] : "workers";
  const std::int64_t B = 1, NH = 2, S = small ? 512 : 65536, D = small ? 16 : 64, steps = small ? 5 : 20;
  mlstm::graph::FlowGraphRunner runner(devices);
  std::mt19937 rng(11);
  // The runner's host tensors, filled once; the steps refill them in place.
  auto host = [&](const mlstm::Tensor& from) {
    mlstm::Tensor t = runner.host_tensor(from.shape(), from.dtype());
    std::memcpy(t.bytes(), from.bytes(), from.nbytes());
    return t;
  };
  const example::Inputs drawn = example::make(B, NH, S, D, D, rng);
  example::Inputs in;  // the same values in the runner's host tensors
  in.q = host(drawn.q);
  in.k = host(drawn.k);
  in.v = host(drawn.v);
  in.i = host(drawn.i);
  in.f = host(drawn.f);
  mlstm::Tensor &q = in.q, &k = in.k, &v = in.v;
  const mlstm::Tensor target = example::random({B, NH, S, D}, 0, rng);
  mlstm::Tensor h = runner.host_tensor({B, NH, S, D}, mlstm::DType::f32);
  mlstm::Tensor dh = runner.host_tensor({B, NH, S, D}, mlstm::DType::f32);
  mlstm::Tensor dq = runner.host_tensor(q.shape(), q.dtype()), dk = runner.host_tensor(k.shape(), k.dtype()),
                dv = runner.host_tensor(v.shape(), v.dtype()), di = runner.host_tensor(in.i.shape(), in.i.dtype()),
                df = runner.host_tensor(in.f.shape(), in.f.dtype());
  const mlstm::GradientViews grads{dq.view(), dk.view(), dv.view(), di.view(), df.view()};
  mlstm::MlstmOptions options;
  options.chunk_size = 64;
  options.return_last_states = false;
  const mlstm::ForwardArgs args = in.args();
  mlstm::StateCheckpoints kept;  // rebound by every forward
  double first = 0, last = 0;
  for (std::int64_t step = 0; step < steps; ++step) {
    (void)runner.forward_into(h.view(), args, options, 0, &kept);
    double loss = 0;  // 0.5 * |h - target|^2; dh = h - target
    for (std::int64_t e = 0; e < h.numel(); ++e) {
      const float d = h.data<float>()[e] - target.data<float>()[e];
      dh.data<float>()[e] = d;
      loss += 0.5 * d * d;
    }
    mlstm::BackwardArgs b;
    b.inputs = args;
    b.dh = dh.view();
    b.checkpoints = &kept;
    (void)runner.backward_into(grads, b, options);
    const float lr = 0.002f;
    for (auto [x, dx] : {std::pair{&q, &dq}, {&k, &dk}, {&v, &dv}})
      for (std::int64_t e = 0; e < x->numel(); ++e) x->data<float>()[e] -= lr * dx->data<float>()[e];
    std::printf("step %lld: loss %.4f (%zu kept states, %zu bytes)\n", static_cast<long long>(step), loss,
                kept.tokens().size(), kept.bytes());
    if (step == 0) first = loss;
    last = loss;
  }
  std::string ran;
  for (const auto& d : runner.last_plan().devices) ran += (ran.empty() ? "" : ", ") + d;
  std::printf("devices: %s (a GPU's stream keeps one state per piece; other devices none here)\n", ran.c_str());
  return last < first ? 0 : 1;
}
