#include "mlstm/core/packed.hpp"

#include <cstring>

#include "mlstm/core/error.hpp"

namespace mlstm::packed {

namespace {

// Row j of a (N,...) tensor as a (1,...) view.
ConstTensorView row_of(ConstTensorView t, std::int64_t j) {
  if (t.empty()) return t;
  Shape shape = t.shape();
  shape[0] = 1;
  return ConstTensorView(t.select0(j).bytes(), t.dtype(), shape, t.strides());
}

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

ForwardArgs sequence(const ForwardArgs& args, std::int64_t j) {
  const std::int64_t t0 = args.cu_seqlens[static_cast<std::size_t>(j)],
                     t1 = args.cu_seqlens[static_cast<std::size_t>(j + 1)];
  ForwardArgs a;
  a.q = tokens_of(args.q, t0, t1);
  a.k = tokens_of(args.k, t0, t1);
  a.v = tokens_of(args.v, t0, t1);
  a.i = tokens_of(args.i, t0, t1);
  a.f = tokens_of(args.f, t0, t1);
  a.c0 = row_of(args.c0, j);
  a.n0 = row_of(args.n0, j);
  a.m0 = row_of(args.m0, j);
  return a;
}

BackwardArgs sequence(const BackwardArgs& args, std::int64_t j) {
  BackwardArgs b;
  b.inputs = sequence(args.inputs, j);
  b.dh = tokens_of(args.dh, args.inputs.cu_seqlens[static_cast<std::size_t>(j)],
                   args.inputs.cu_seqlens[static_cast<std::size_t>(j + 1)]);
  b.dc_last = row_of(args.dc_last, j);
  b.dn_last = row_of(args.dn_last, j);
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
    put_tokens(r.h, out.h, args.cu_seqlens[static_cast<std::size_t>(j)]);
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
      for (auto [from, to] : {std::pair{&r.dc0, &out.dc0}, {&r.dn0, &out.dn0}, {&r.dm0, &out.dm0}})
        *to = rows_like(*from, p.N);
    }
    const std::int64_t t0 = args.inputs.cu_seqlens[static_cast<std::size_t>(j)];
    for (auto [from, to] :
         {std::pair{&r.dq, &out.dq}, {&r.dk, &out.dk}, {&r.dv, &out.dv}, {&r.di, &out.di}, {&r.df, &out.df}})
      put_tokens(*from, *to, t0);
    for (auto [from, to] : {std::pair{&r.dc0, &out.dc0}, {&r.dn0, &out.dn0}, {&r.dm0, &out.dm0}})
      if (!from->empty()) put_row(*from, *to, j);
  }
  return out;
}

BackwardResult backward_each_into(const BackwardArgs& args, const ProblemShape& p, const MlstmOptions& options,
                                  const GradientViews& out, const BackwardIntoFn& backward) {
  BackwardResult states;
  for (std::int64_t j = 0; j < p.N; ++j) {
    const std::int64_t t0 = args.inputs.cu_seqlens[static_cast<std::size_t>(j)],
                       t1 = args.inputs.cu_seqlens[static_cast<std::size_t>(j + 1)];
    BackwardResult r = backward(sequence(args, j), options, out.slice(t0, t1));
    if (j == 0) {
      for (auto [from, to] : {std::pair{&r.dc0, &states.dc0}, {&r.dn0, &states.dn0}, {&r.dm0, &states.dm0}})
        *to = rows_like(*from, p.N);
    }
    for (auto [from, to] : {std::pair{&r.dc0, &states.dc0}, {&r.dn0, &states.dn0}, {&r.dm0, &states.dm0}})
      if (!from->empty()) put_row(*from, *to, j);
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
