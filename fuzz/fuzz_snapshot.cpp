// libFuzzer target: the stream snapshot reader (StreamSession::restore_bytes). The first input byte picks
// the mode: even = the bytes as they are (almost always refused by the checksum), odd = the rest with a
// valid FNV-1a checksum appended, so the fuzzer reaches the header and size checks behind it. Any input must
// give a session of the configured dimensions or an mlstm::Error.
#include <cstddef>
#include <cstdint>
#include <string>

#include "mlstm/core/error.hpp"
#include "mlstm/graph/stream.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  std::string bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (data[0] & 1) {
    const std::uint64_t sum = mlstm::StreamSession::checksum(bytes);
    bytes.append(reinterpret_cast<const char*>(&sum), sizeof sum);
  }
  mlstm::StreamConfig config;  // default options and kernel, as make_seeds.cpp writes them
  config.B = 1;
  config.NH = 2;
  config.DHQK = 4;
  config.DHHV = 3;
  config.options.gate = (data[0] & 2) ? mlstm::GateVariant::sigmoid : mlstm::GateVariant::exp;
  try {
    const mlstm::StreamSession s = mlstm::StreamSession::restore_bytes(bytes, config, "fuzz");
    if (s.state().C.shape() != mlstm::Shape{1, 2, 4, 3} || s.state().m.numel() != 2) __builtin_trap();
  } catch (const mlstm::Error&) {
    // refused with a clear error: fine
  }
  return 0;
}
