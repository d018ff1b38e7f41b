#include "mlstm/core/packed.hpp"

#include <algorithm>
#include <cstring>
#include <initializer_list>

#include "mlstm/core/error.hpp"

namespace mlstm::packed {

namespace {

using Results = std::initializer_list<std::pair<Tensor*, Tensor*>>;

// Each `from` (a (1,NH,len,...) or (1,NH,len) result of the sequence at token t0) into its `to` ((1,NH,S,...), made
// like the first `from` it gets).
void put_tokens(Results results, std::int64_t t0, std::int64_t S) {
  for (auto [from, to] : results) {
    if (from->empty()) continue;
    if (to->empty()) {
      Shape shape = from->shape();
      shape[2] = S;
      *to = Tensor(shape, from->dtype());
    }
    copy_piece_rows(gate_rows(from->view()), gate_rows(sequence_slice(to->view(), t0, t0 + from->dim(2))));
  }
}

}  // namespace

void put_rows(Results results, std::int64_t j, std::int64_t N) {
  for (auto [from, to] : results) {
    if (from->empty()) continue;
    if (to->empty()) {
      Shape shape = from->shape();
      shape[0] = N;
      *to = Tensor(shape, from->dtype());
    }
    const std::size_t row = from->nbytes() / static_cast<std::size_t>(from->dim(0));
    std::memcpy(to->bytes() + static_cast<std::size_t>(j) * row, from->bytes(), from->nbytes());
  }
}

std::vector<Piece> pieces(const ForwardArgs& args, const ProblemShape& p, std::int64_t most) {
  std::vector<Piece> out;
  auto cut = [&](std::int64_t s0, std::int64_t s1, std::int64_t sequence) {
    for (std::int64_t t0 = s0; t0 < s1; t0 += most)
      out.push_back({t0, std::min(s1, t0 + most), sequence, t0 == s0, t0 + most >= s1});
  };
  if (!p.packed()) {
    cut(0, p.S, 0);
    return out;
  }
  for (std::int64_t j = 0; j < p.N; ++j) cut(range(args, j).first, range(args, j).second, j);
  return out;
}

std::vector<Piece> spanning_pieces(const ForwardArgs& args, std::int64_t most, std::int64_t most_sequences) {
  if (most < 1 || most_sequences < 1) throw InvalidArgument("most", "pieces need at least one token and sequence");
  std::vector<Piece> out;
  const auto& cu = args.cu_seqlens;
  const std::int64_t S = cu.back();
  std::size_t j = 0;  // the sequence at t
  for (std::int64_t t = 0; t < S;) {
    const std::int64_t end = std::min(S, t + most);
    const std::size_t first_sequence = j;
    std::int64_t pos = t;
    for (std::int64_t held = 0; pos < end && held < most_sequences; ++held) {
      pos = std::min(cu[j + 1], end);
      if (pos == cu[j + 1]) ++j;
    }
    out.push_back({t, pos, static_cast<std::int64_t>(first_sequence), t == cu[first_sequence], pos == S});
    t = pos;
  }
  return out;
}

std::vector<Part> parts(const ForwardArgs& args, const Piece& piece) {
  std::vector<Part> out;
  for (std::int64_t j = piece.sequence, t = piece.t0; t < piece.t1; ++j) {
    const auto [s0, s1] = range(args, j);
    const std::int64_t end = std::min(s1, piece.t1);
    out.push_back({j, t - piece.t0, end - piece.t0, s0 == t, s1 <= piece.t1});
    t = end;
  }
  return out;
}

std::pair<std::int64_t, std::int64_t> range(const ForwardArgs& args, std::int64_t j) {
  return {args.cu_seqlens[static_cast<std::size_t>(j)], args.cu_seqlens[static_cast<std::size_t>(j + 1)]};
}

ForwardArgs sequences(const ForwardArgs& args, std::int64_t j0, std::int64_t j1, std::vector<std::int64_t>& offsets) {
  const std::int64_t t0 = range(args, j0).first, t1 = range(args, j1 - 1).second;
  offsets.clear();
  for (std::int64_t j = j0; j <= j1; ++j) offsets.push_back(args.cu_seqlens[static_cast<std::size_t>(j)] - t0);
  ForwardArgs whole = args;
  whole.cu_seqlens = {};
  ForwardArgs a = sequence_slice(whole, t0, t1);
  a.c0 = rows(args.c0, j0, j1);
  a.n0 = rows(args.n0, j0, j1);
  a.m0 = rows(args.m0, j0, j1);
  a.cu_seqlens = offsets;
  return a;
}

ForwardArgs sequence(const ForwardArgs& args, std::int64_t j) {
  std::vector<std::int64_t> offsets;
  ForwardArgs a = sequences(args, j, j + 1, offsets);
  a.cu_seqlens = {};  // one sequence: not packed
  return a;
}

BackwardArgs sequences(const BackwardArgs& args, std::int64_t j0, std::int64_t j1, std::vector<std::int64_t>& offsets) {
  BackwardArgs b;
  b.inputs = sequences(args.inputs, j0, j1, offsets);
  b.dh = sequence_slice(args.dh, range(args.inputs, j0).first, range(args.inputs, j1 - 1).second);
  b.dc_last = rows(args.dc_last, j0, j1);
  b.dn_last = rows(args.dn_last, j0, j1);
  return b;
}

BackwardArgs sequence(const BackwardArgs& args, std::int64_t j) {
  std::vector<std::int64_t> offsets;
  BackwardArgs b = sequences(args, j, j + 1, offsets);
  b.inputs.cu_seqlens = {};  // one sequence: not packed
  return b;
}

ForwardResult forward_each(const ForwardArgs& args, const ProblemShape& p, const MlstmOptions& options,
                           const ForwardFn& forward) {
  ForwardResult out;
  for (std::int64_t j = 0; j < p.N; ++j) {
    ForwardResult r = forward(sequence(args, j), options);
    put_tokens({{&r.h, &out.h}}, range(args, j).first, p.S);
    put_rows({{&r.c, &out.c}, {&r.n, &out.n}, {&r.m, &out.m}}, j, p.N);
  }
  return out;
}

BackwardResult backward_each(const BackwardArgs& args, const ProblemShape& p, const MlstmOptions& options,
                             const BackwardFn& backward) {
  BackwardResult out;
  for (std::int64_t j = 0; j < p.N; ++j) {
    BackwardResult r = backward(sequence(args, j), options);
    put_tokens({{&r.dq, &out.dq}, {&r.dk, &out.dk}, {&r.dv, &out.dv}, {&r.di, &out.di}, {&r.df, &out.df}},
               range(args.inputs, j).first, p.S);
    put_rows({{&r.dc0, &out.dc0}, {&r.dn0, &out.dn0}, {&r.dm0, &out.dm0}}, j, p.N);
  }
  return out;
}

BackwardResult backward_each_into(const BackwardArgs& args, const ProblemShape& p, const MlstmOptions& options,
                                  const GradientViews& out, const BackwardIntoFn& backward) {
  BackwardResult states;
  for (std::int64_t j = 0; j < p.N; ++j) {
    const auto [t0, t1] = range(args.inputs, j);
    BackwardResult r = backward(sequence(args, j), options, out.slice(t0, t1));
    put_rows({{&r.dc0, &states.dc0}, {&r.dn0, &states.dn0}, {&r.dm0, &states.dm0}}, j, p.N);
  }
  return states;
}

BackwardResult allocate_gradients(const ProblemShape& p) {
  BackwardResult r;
  r.dq = Tensor({p.B, p.NH, p.S, p.DHQK}, p.dtype);
  r.dk = Tensor({p.B, p.NH, p.S, p.DHQK}, p.dtype);
  r.dv = Tensor({p.B, p.NH, p.S, p.DHHV}, p.dtype);
  r.di = Tensor({p.B, p.NH, p.S}, p.gate_dtype);
  r.df = Tensor({p.B, p.NH, p.S}, p.gate_dtype);
  return r;
}

GradientViews gradient_views(BackwardResult& r) {
  return {r.dq.view(), r.dk.view(), r.dv.view(), r.di.view(), r.df.view()};
}

}  // namespace mlstm::packed
