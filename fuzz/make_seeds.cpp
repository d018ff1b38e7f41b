// Writes the seed corpora of the fuzz targets: valid .npy files of every dtype and rank, and valid
// snapshots (both gates) of the fuzzers' stream configuration, in the fuzz_snapshot input format. The
// snapshots come from StreamSession::snapshot, so they are always the current format version (2: with
// normalize, eps, chunk size, state dtype and kernel name); the configuration here (default options and
// kernel) must stay the one fuzz_snapshot.cpp restores with, or every seed stops at a field mismatch.
//   make_seeds <corpus dir>   -> <dir>/npy/*.npy, <dir>/snapshot/*
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "mlstm/core/npy.hpp"
#include "mlstm/graph/stream.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: make_seeds <corpus dir>\n";
    return 2;
  }
  const std::filesystem::path dir = argv[1];
  std::filesystem::create_directories(dir / "npy");
  std::filesystem::create_directories(dir / "snapshot");
  int n = 0;
  for (auto dt : {mlstm::DType::f64, mlstm::DType::f32, mlstm::DType::f16, mlstm::DType::bf16})
    for (const mlstm::Shape& shape :
         {mlstm::Shape{3}, mlstm::Shape{2, 3}, mlstm::Shape{1, 2, 3, 4}, mlstm::Shape{0, 5}}) {
      mlstm::Tensor t = mlstm::Tensor::full(shape, dt, 1.5);
      mlstm::npy::write((dir / "npy" / ("seed" + std::to_string(n++) + ".npy")).string(), t.view());
    }
  for (int gate = 0; gate < 2; ++gate) {
    mlstm::StreamConfig c;
    c.B = 1;
    c.NH = 2;
    c.DHQK = 4;
    c.DHHV = 3;
    c.options.gate = gate ? mlstm::GateVariant::sigmoid : mlstm::GateVariant::exp;
    mlstm::StreamSession s(c);
    const auto tmp = dir / "snapshot" / "tmp.snap";
    s.snapshot(tmp.string());
    std::ifstream in(tmp, std::ios::binary);
    std::ostringstream ss;
    ss << in.rdbuf();
    std::string body = ss.str();
    std::filesystem::remove(tmp);
    // fuzz_snapshot format: mode byte, then the image; odd mode appends the checksum itself.
    std::ofstream(dir / "snapshot" / ("as_is_" + std::to_string(gate)), std::ios::binary)
        << static_cast<char>(gate ? 2 : 0) << body;
    std::ofstream(dir / "snapshot" / ("fixed_" + std::to_string(gate)), std::ios::binary)
        << static_cast<char>(gate ? 3 : 1) << body.substr(0, body.size() - 8);
  }
  std::cout << "seeds written to " << dir << "\n";
  return 0;
}
