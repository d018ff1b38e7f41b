// libFuzzer target: the .npy parser (npy::parse) on arbitrary bytes, also as bfloat16, and the offsets reader
// (npy::parse_offsets, --cu-seqlens). Any input must give a tensor (offsets) whose size matches its header or an
// mlstm::Error; a crash, a sanitizer report or another exception is a bug.
#include <cstddef>
#include <cstdint>
#include <string>

#include "mlstm/core/error.hpp"
#include "mlstm/core/npy.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  for (int as_bf16 = 0; as_bf16 < 2; ++as_bf16) {
    try {
      const mlstm::Tensor t =
          as_bf16 ? mlstm::npy::parse(bytes, "fuzz", mlstm::DType::bf16) : mlstm::npy::parse(bytes, "fuzz");
      if (t.nbytes() > size) __builtin_trap();  // a tensor larger than its file: the header was not checked
      // Round trip: what we parsed serialises and parses back to the same bytes.
      const std::string again = mlstm::npy::serialize(t.view());
      const mlstm::Tensor u =
          mlstm::npy::parse(again, "fuzz", as_bf16 ? std::optional(mlstm::DType::bf16) : std::nullopt);
      if (u.shape() != t.shape() || u.nbytes() != t.nbytes()) __builtin_trap();
    } catch (const mlstm::Error&) {
      // refused with a clear error: fine
    }
  }
  try {
    const auto offsets = mlstm::npy::parse_offsets(bytes, "fuzz");
    if (offsets.size() * sizeof(std::int64_t) > size) __builtin_trap();
  } catch (const mlstm::Error&) {
  }
  return 0;
}
