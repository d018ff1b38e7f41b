// Shared by the examples: random inputs.
#pragma once

#include <cstring>
#include <random>
#include <string>

#include "mlstm/mlstm.hpp"

namespace example {

inline bool small(int argc, char** argv) { return argc > 1 && std::string(argv[1]) == "--small"; }

inline mlstm::Tensor random(mlstm::Shape shape, float mean, std::mt19937& rng, mlstm::DType dtype = mlstm::DType::f32) {
  std::normal_distribution<float> normal(mean, 1.0f);
  std::vector<float> x(static_cast<std::size_t>(mlstm::shape_numel(shape)));
  for (auto& e : x) e = normal(rng);
  return mlstm::Tensor::from(x, std::move(shape), dtype);
}

using Inputs = mlstm::ForwardInputs;  // the library's owned arguments

inline Inputs make(std::int64_t B, std::int64_t NH, std::int64_t S, std::int64_t DK, std::int64_t DV, std::mt19937& rng,
                   mlstm::DType dtype = mlstm::DType::f32) {
  Inputs in;
  in.q = random({B, NH, S, DK}, 0, rng, dtype);
  in.k = random({B, NH, S, DK}, 0, rng, dtype);
  in.v = random({B, NH, S, DV}, 0, rng, dtype);
  in.i = random({B, NH, S}, 0, rng);
  in.f = random({B, NH, S}, 3, rng);
  return in;
}

}  // namespace example
