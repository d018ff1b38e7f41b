#include "packed_tables.hpp"

namespace mlstm::opencl::detail {

PackedChunks packed_chunks(std::span<const std::int64_t> bounds, int L) {
  PackedChunks out;
  int c = 0;
  const auto segments = static_cast<int>(bounds.size()) - 1;
  for (int k = 0; k < segments; ++k) {
    const int first = c;
    for (std::int64_t t = bounds[static_cast<std::size_t>(k)]; t < bounds[static_cast<std::size_t>(k) + 1];
         t += L, ++c) {
      out.ctab.push_back(static_cast<int>(t));
      out.ctab.push_back(c + k);  // a stabiliser slot leaving every segment
    }
    out.segments.emplace_back(first, c);
  }
  out.ctab.push_back(static_cast<int>(bounds.back()));
  out.ctab.push_back(c + segments);
  return out;
}

std::vector<int> PackedChunks::segment_table(const std::function<int(int)>& init) const {
  std::vector<int> out;
  for (int k = 0; k < static_cast<int>(segments.size()); ++k)
    for (const int x :
         {segments[static_cast<std::size_t>(k)].first, segments[static_cast<std::size_t>(k)].second, init(k), k})
      out.push_back(x);
  return out;
}

PackedCallTables packed_call_tables(std::span<const std::int64_t> offsets, int L, bool initial_states,
                                    bool last_state_gradients) {
  const PackedChunks t = packed_chunks(offsets, L);
  PackedCallTables out;
  out.ctab = t.ctab;
  out.stab = t.segment_table([&](int j) { return initial_states ? j : -1; });
  out.stab_bw = t.segment_table([&](int j) { return last_state_gradients ? j : -1; });
  out.chunks = t.chunks();
  return out;
}

}  // namespace mlstm::opencl::detail
