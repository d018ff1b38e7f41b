// Builds against an installed mlstm-flow (find_package(mlstm_flow)); runs a small forward on the CPU
// kernel and checks it against the float64 reference.
#include <cmath>
#include <cstdio>
#include <random>

#include "mlstm/mlstm.hpp"
#include "mlstm/reference.hpp"

int main() {
  const std::int64_t B = 1, NH = 2, S = 100, D = 16;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  auto random = [&](mlstm::Shape shape, float mean) {
    std::vector<float> v(static_cast<std::size_t>(mlstm::shape_numel(shape)));
    for (auto& x : v) x = mean + normal(rng);
    return mlstm::Tensor::from(v, shape);
  };
  auto q = random({B, NH, S, D}, 0), k = random({B, NH, S, D}, 0), v = random({B, NH, S, D}, 0);
  auto i = random({B, NH, S}, 0), f = random({B, NH, S}, 3);
  mlstm::ForwardArgs args;
  args.q = q.view();
  args.k = k.view();
  args.v = v.view();
  args.i = i.view();
  args.f = f.view();
  mlstm::MlstmOptions options;
  options.chunk_size = 32;
  auto kernel = mlstm::get_kernel("chunkwise--cpu_xl_chunk");
  auto out = kernel->forward(args, options);
  auto ref = mlstm::reference::recurrent_forward(args, options);
  auto got = out.h.to_vector(), want = ref.h.to_vector();
  double err = 0, scale = 0;
  for (std::size_t e = 0; e < got.size(); ++e) {
    err = std::max(err, std::fabs(got[e] - want[e]));
    scale = std::max(scale, std::fabs(want[e]));
  }
  std::printf("%zu kernels available; rel err %.3g\n", mlstm::available_kernels().size(), err / scale);
  if (!(err / scale < 1e-4)) return 1;
  std::printf("consumer ok\n");
  return 0;
}
