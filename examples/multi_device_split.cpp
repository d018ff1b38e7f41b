// Splitting one long sequence across every device (CPU workers + OpenCL devices), sequence parallel.
//   example_multi_device_split [--small] [device spec, default "workers+all"]
#include <cmath>
#include <cstdio>

#include "example_common.hpp"
#include "mlstm/devices/opencl.hpp"

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
  return err / scale < 1e-4 ? 0 : 1;
}
