// The chunk and segment tables of packed sequences (ForwardArgs::cu_seqlens) for the OpenCL kernels built with
// -DPACKED=1, tensor-core and portable alike (private to the OpenCL layer).
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <utility>
#include <vector>

namespace mlstm::opencl::detail {

// The packed kernels' tables (tensor cores: tc_common.cl CHUNK_START, tc_states.cl PACKED; portable:
// mlstm_chunkwise.cl "Chunks of a row") over consecutive segments of a row or piece, segment k covering tokens
// [bounds[k], bounds[k + 1]) (bounds from 0, increasing): the chunk table (chunks of L tokens restarting at every
// segment; chunk c's stabiliser slot c + its segment) and each segment's chunks.
struct PackedChunks {
  std::vector<int> ctab;                      // 2 NC + 2 entries
  std::vector<std::pair<int, int>> segments;  // first chunk, end chunk
  int chunks() const { return static_cast<int>(ctab.size() / 2) - 1; }
  // The segment table: {first chunk, end chunk, initial-state row init(k) (-1: zero), last-state row k} per segment.
  std::vector<int> segment_table(const std::function<int(int)>& init) const;
};
PackedChunks packed_chunks(std::span<const std::int64_t> bounds, int L);

// The tables of one packed call (a row of sequences at `offsets`, chunks of L): the chunk table, the forward's segment
// table (each sequence's initial-state row, or -1 without initial states) and the backward's (its last-state
// gradient's row, or -1 without them). Shared by the tensor-core and portable routines, which keep them while their
// uploads may read them.
struct PackedCallTables {
  std::vector<int> ctab, stab, stab_bw;
  int chunks = 0;
};
PackedCallTables packed_call_tables(std::span<const std::int64_t> offsets, int L, bool initial_states,
                                    bool last_state_gradients);

}  // namespace mlstm::opencl::detail
