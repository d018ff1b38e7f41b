// Splitting one long sequence across every device (CPU workers + OpenCL devices), sequence parallel,
// forward and backward.
//   example_multi_device_split [--small] [device spec, default "workers+all"]
#include <cmath>
#include <cstdio>

#include "example_common.hpp"
#include "mlstm/devices/opencl/device.hpp"

int main(int argc, char** argv) {
  const bool small = example::small(argc, argv);
  std::string spec = argc > 2 ? argv[2] : (mlstm::opencl::list_devices().empty() ? "workers" : "workers+all");
  const std::int64_t S = small ? 2048 : 65536, D = small ? 32 : 128;
  std::mt19937 rng(2);
  const auto in = example::make(1, 4, S, D, D, rng);
  mlstm::MlstmOptions o;
  o.chunk_size = 64;
  mlstm::graph::FlowGraphRunner runner(spec);
  const auto plan = runner.plan(mlstm::validate_forward(in.args(), o), o);
  std::printf("%s\n", plan.describe().c_str());
  const auto out = runner.forward(in.args(), o);
  for (const auto& line : runner.last_log()) std::printf("  %s\n", line.c_str());
  const auto ref = mlstm::get_kernel("chunkwise--cpu_xl_chunk")->forward(in.args(), o);
  double err = 0, scale = 0;
  const auto a = out.h.to_vector(), b = ref.h.to_vector();
  for (std::size_t e = 0; e < a.size(); ++e) {
    err = std::max(err, std::fabs(a[e] - b[e]));
    scale = std::max(scale, std::fabs(b[e]));
  }
  std::printf("graph vs one call: max rel error %.3g\n", err / scale);
  // Gradients the same way: entering states from the forward combine, the gradient leaving every segment from
  // a reverse combine of the segments' local state gradients, then every segment's gradients in parallel.
  mlstm::BackwardArgs bw;
  bw.inputs = in.args();
  bw.dh = out.h.view();  // the gradient of sum(h^2) / 2
  const auto grads = runner.backward(bw, o);
  const auto ref_grads = mlstm::get_kernel("chunkwise--cpu_xl_chunk")->backward(bw, o);
  double gerr = 0, gscale = 0;
  for (auto [x, y] : {std::pair{&grads.dq, &ref_grads.dq},
                      {&grads.dk, &ref_grads.dk},
                      {&grads.dv, &ref_grads.dv},
                      {&grads.df, &ref_grads.df}}) {
    const auto u = x->to_vector(), w = y->to_vector();
    for (std::size_t e = 0; e < u.size(); ++e) {
      gerr = std::max(gerr, std::fabs(u[e] - w[e]));
      gscale = std::max(gscale, std::fabs(w[e]));
    }
  }
  std::printf("graph backward vs one call: max rel error %.3g\n", gerr / gscale);
  return err / scale < 1e-4 && gerr / gscale < 1e-3 ? 0 : 1;
}
