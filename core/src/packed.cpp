#include "mlstm/core/packed.hpp"

#include <cstring>

#include "mlstm/core/error.hpp"

namespace mlstm::packed {

namespace {

// Tokens [t0, t1) of a (1,NH,S,...) or (1,NH,S) view.
template <class View>
View tokens_of(View t, std::int64_t t0, std::int64_t t1) {
  return sequence_slice(t, t0, t1);
}

// `from` (1,...) into row j of `to` (N,...), both contiguous of one dtype.
void put_row(const Tensor& from, Tensor& to, std::int64_t j) {
  std::memcpy(to.bytes() + static_cast<std::size_t>(j) * from.nbytes(), from.bytes(), from.nbytes());
}

// A (N,...) tensor like `first` (1,...) of a call's result.
Tensor rows_like(const Tensor& first, std::int64_t N) {
  if (first.empty()) return {};
  Shape shape = first.shape();
  shape[0] = N;
  return Tensor(shape, first.dtype());
}

// dc0/dn0/dm0 of sequence j's result `r` into rows j of `out` ((N,...), allocated on the first sequence).
void put_state_gradients(BackwardResult& r, BackwardResult& out, std::int64_t j, std::int64_t N) {
  for (auto [from, to] : {std::pair{&r.dc0, &out.dc0}, {&r.dn0, &out.dn0}, {&r.dm0, &out.dm0}}) {
    if (from->empty()) continue;
    if (to->empty()) *to = rows_like(*from, N);
    put_row(*from, *to, j);
  }
}

// A (1,NH,S,...) tensor like `first` (1,NH,len,...) of a call's result.
Tensor tokens_like(const Tensor& first, std::int64_t S) {
  if (first.empty()) return {};
  Shape shape = first.shape();
  shape[2] = S;
  return Tensor(shape, first.dtype());
}

void put_tokens(const Tensor& from, Tensor& to, std::int64_t t0) {
  if (from.empty()) return;
  const std::int64_t len = from.dim(2);
  copy_piece_rows(gate_rows(from.view()), gate_rows(tokens_of(to.view(), t0, t0 + len)));
}

}  // namespace

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

BackwardArgs sequence(const BackwardArgs& args, std::int64_t j) {
  BackwardArgs b;
  b.inputs = sequence(args.inputs, j);
  const auto [t0, t1] = range(args.inputs, j);
  b.dh = tokens_of(args.dh, t0, t1);
  b.dc_last = rows(args.dc_last, j, j + 1);
  b.dn_last = rows(args.dn_last, j, j + 1);
  return b;
}

ForwardResult forward_each(const ForwardArgs& args, const ProblemShape& p, const MlstmOptions& options,
                           const ForwardFn& forward) {
  ForwardResult out;
  for (std::int64_t j = 0; j < p.N; ++j) {
    ForwardResult r = forward(sequence(args, j), options);
    if (j == 0) {
      out.h = tokens_like(r.h, p.S);
      out.c = rows_like(r.c, p.N);
      out.n = rows_like(r.n, p.N);
      out.m = rows_like(r.m, p.N);
    }
    put_tokens(r.h, out.h, range(args, j).first);
    for (auto [from, to] : {std::pair{&r.c, &out.c}, {&r.n, &out.n}, {&r.m, &out.m}})
      if (!from->empty()) put_row(*from, *to, j);
  }
  return out;
}

BackwardResult backward_each(const BackwardArgs& args, const ProblemShape& p, const MlstmOptions& options,
                             const BackwardFn& backward) {
  BackwardResult out;
  for (std::int64_t j = 0; j < p.N; ++j) {
    BackwardResult r = backward(sequence(args, j), options);
    if (j == 0) {
      for (auto [from, to] :
           {std::pair{&r.dq, &out.dq}, {&r.dk, &out.dk}, {&r.dv, &out.dv}, {&r.di, &out.di}, {&r.df, &out.df}})
        *to = tokens_like(*from, p.S);
    }
    const std::int64_t t0 = range(args.inputs, j).first;
    for (auto [from, to] :
         {std::pair{&r.dq, &out.dq}, {&r.dk, &out.dk}, {&r.dv, &out.dv}, {&r.di, &out.di}, {&r.df, &out.df}})
      put_tokens(*from, *to, t0);
    put_state_gradients(r, out, j, p.N);
  }
  return out;
}

BackwardResult backward_each_into(const BackwardArgs& args, const ProblemShape& p, const MlstmOptions& options,
                                  const GradientViews& out, const BackwardIntoFn& backward) {
  BackwardResult states;
  for (std::int64_t j = 0; j < p.N; ++j) {
    const auto [t0, t1] = range(args.inputs, j);
    BackwardResult r = backward(sequence(args, j), options, out.slice(t0, t1));
    put_state_gradients(r, states, j, p.N);
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
