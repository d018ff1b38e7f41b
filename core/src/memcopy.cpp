#include "mlstm/core/memcopy.hpp"

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define MLSTM_STREAMING_STORES 1
#endif

namespace mlstm {

void copy_bytes(void* dst, const void* src, std::size_t bytes) noexcept {
#ifdef MLSTM_STREAMING_STORES
  if (bytes >= kStreamingCopyFrom) {
    auto* d = static_cast<unsigned char*>(dst);
    const auto* s = static_cast<const unsigned char*>(src);
    // The head up to a 64-byte line boundary of the destination, with memcpy.
    const std::size_t head = (64 - (reinterpret_cast<std::uintptr_t>(d) & 63)) & 63;
    std::memcpy(d, s, head);
    d += head;
    s += head;
    bytes -= head;
    // Whole lines: unaligned loads (the source may sit anywhere), aligned non-temporal stores (SSE2, part of
    // every x86-64: the write-combining buffers fill whole lines whatever the store width).
    const std::size_t lines = bytes / 64;
    for (std::size_t l = 0; l < lines; ++l, d += 64, s += 64) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 32));
      const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(d), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + 48), e);
    }
    _mm_sfence();  // the stores are visible before whatever follows (an enqueued DMA, another thread's read)
    std::memcpy(d, s, bytes % 64);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

}  // namespace mlstm
