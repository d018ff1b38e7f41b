// Large memory copies that bypass the caches. A plain memcpy of a block that is not read again soon (a piece
// going into pinned staging for the GPU's DMA, an h coming back into the user's array) reads each destination
// line before writing it (read for ownership), so it moves three bytes over the memory bus per byte copied.
// Non-temporal stores write whole lines without reading them: two bytes per byte. When the host's memory
// bandwidth is shared with the DMA engines (host streaming), that third byte is what the copies wait for.
#pragma once

#include <cstddef>

namespace mlstm {

// Blocks of at least this many bytes are copied with non-temporal stores; smaller ones with memcpy (they stay
// in cache, where the reader finds them).
inline constexpr std::size_t kStreamingCopyFrom = std::size_t{256} << 10;

// memcpy(dst, src, bytes), with non-temporal stores for blocks of kStreamingCopyFrom bytes or more (on x86-64;
// memcpy elsewhere). The ranges must not overlap. The stores are fenced before it returns.
void copy_bytes(void* dst, const void* src, std::size_t bytes) noexcept;

}  // namespace mlstm
