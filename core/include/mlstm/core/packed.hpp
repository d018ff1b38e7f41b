// Packed variable-length sequences (ForwardArgs::cu_seqlens): the sequences of a packed problem as problems of their
// own, and a packed call as one call per sequence. The float64 reference is defined this way (a packed call IS each
// sequence run alone), and devices whose kernels take one sequence at a time (OpenCL, for now) run packed
// problems through it; the CPU kernels take packed rows natively (cpu_kernels.hpp).
#pragma once

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <utility>
#include <vector>

#include "mlstm/core/problem.hpp"

namespace mlstm::packed {

// Tokens [first, second) of sequence j of packed args.
std::pair<std::int64_t, std::int64_t> range(const ForwardArgs& args, std::int64_t j);
// Rows [j0, j1) of a (N,...) view (states of sequences j0..j1-1), as a (j1-j0,...) view; an empty view stays empty.
template <class View>
View rows(View t, std::int64_t j0, std::int64_t j1) {
  if (t.empty()) return t;
  Shape shape = t.shape();
  shape[0] = j1 - j0;
  return View(t.select0(j0).bytes(), t.dtype(), shape, t.strides());
}

// A piece of a stream over a row: tokens [t0, t1), of packed sequence `sequence` (0 in an unpacked row), whose first
// and/or last piece it is.
struct Piece {
  std::int64_t t0 = 0, t1 = 0, sequence = 0;
  bool first = false, last = false;
  std::int64_t len() const noexcept { return t1 - t0; }
};
// The pieces of at most `most` tokens of problem p's row (args validated as p), in order: of the row, or of every
// packed sequence in turn (a piece never spans two).
std::vector<Piece> pieces(const ForwardArgs& args, const ProblemShape& p, std::int64_t most);
// The pieces of at most `most` tokens of a packed row cut anywhere, each holding (parts of) at most `most_sequences`
// sequences: `sequence` is the one at t0 and `first` whether it starts there; `last`: the piece ends the row.
std::vector<Piece> spanning_pieces(const ForwardArgs& args, std::int64_t most, std::int64_t most_sequences);
// One sequence's tokens inside a piece of a packed row: [t0, t1) relative to the piece, whether the sequence starts
// and ends there.
struct Part {
  std::int64_t sequence = 0, t0 = 0, t1 = 0;
  bool starts = true, ends = true;
};
// The parts of the sequences in `piece` (spanning_pieces), in token order.
std::vector<Part> parts(const ForwardArgs& args, const Piece& piece);

// Each `from` (rows of sequences j, j+1, ... of a (k,...) result: states or their gradients) into those rows of its
// `to` ((N,...), made like the first `from` it gets). An empty `from` is skipped.
void put_rows(std::initializer_list<std::pair<Tensor*, Tensor*>> results, std::int64_t j, std::int64_t N);

// Sequences [j0, j1) of packed args already validated, as a packed problem of their own: their tokens and states
// (views), and `offsets` (the caller's storage, which the result's cu_seqlens points into) rebased to 0.
ForwardArgs sequences(const ForwardArgs& args, std::int64_t j0, std::int64_t j1, std::vector<std::int64_t>& offsets);
// The same for a backward: dh's tokens of those sequences, and their rows of dc_last/dn_last.
BackwardArgs sequences(const BackwardArgs& args, std::int64_t j0, std::int64_t j1, std::vector<std::int64_t>& offsets);
// Sequence j (0 <= j < N) of packed args already validated: B = 1, S = its length, NH and the head dims as they
// are, and row j of c0/n0/m0 as its (1,NH,...) initial state when given. Views of the caller's memory, no copies.
ForwardArgs sequence(const ForwardArgs& args, std::int64_t j);
// The same for a backward: dh's tokens of sequence j, and row j of dc_last/dn_last.
BackwardArgs sequence(const BackwardArgs& args, std::int64_t j);

using ForwardFn = std::function<ForwardResult(const ForwardArgs&, const MlstmOptions&)>;
using BackwardFn = std::function<BackwardResult(const BackwardArgs&, const MlstmOptions&)>;

// A packed forward (args validated as problem p) as one call of `forward` per sequence, in order: h
// (1,NH,S,DHHV) and the last states (N,NH,...) assembled in the dtypes the calls return.
ForwardResult forward_each(const ForwardArgs& args, const ProblemShape& p, const MlstmOptions& options,
                           const ForwardFn& forward);
// A packed backward likewise: token gradients (1,NH,S,...) and, with initial states, dc0/dn0/dm0 (N,NH,...).
BackwardResult backward_each(const BackwardArgs& args, const ProblemShape& p, const MlstmOptions& options,
                             const BackwardFn& backward);

using BackwardIntoFn =
    std::function<BackwardResult(const BackwardArgs&, const MlstmOptions&, const GradientViews& into)>;
// The same with each sequence's token gradients written into its slice of `out` (views of the packed problem's
// gradients) by `backward` itself; returns dc0/dn0/dm0 (N,NH,...) when the calls return them.
BackwardResult backward_each_into(const BackwardArgs& args, const ProblemShape& p, const MlstmOptions& options,
                                  const GradientViews& out, const BackwardIntoFn& backward);
// Token gradients of problem p (dq, dk, dv in q's dtype, di, df in i's dtype), and views of them.
BackwardResult allocate_gradients(const ProblemShape& p);
GradientViews gradient_views(BackwardResult& r);

}  // namespace mlstm::packed
