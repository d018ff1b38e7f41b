// forward (whole arrays in memory; with --stream-tokens handed to forward_stream.cpp), backward and step:
// the subcommands on .npy files.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <iostream>

#include "commands.hpp"
#include "mlstm/core/npy.hpp"

namespace mlstm::cli {

InputHeaders read_input_headers(const InputFiles& in) {
  const auto dt = as_dtype(in);
  InputHeaders h;
  std::pair<Shape, DType> q = npy::read_header(in.q, "--q", dt), k = npy::read_header(in.k, "--k", dt),
                          v = npy::read_header(in.v, "--v", dt), i = npy::read_header(in.i, "--i", dt, false),
                          f = npy::read_header(in.f, "--f", dt, false);
  if (q.first.size() != 4) throw InvalidArgument("--q", "expected (B,NH,S,DHQK), got " + shape_to_string(q.first));
  h.q = q.first;
  h.dtype = q.second;
  h.B = h.q[0];
  h.NH = h.q[1];
  h.S = h.q[2];
  h.DK = h.q[3];
  auto expect = [&](const std::pair<Shape, DType>& got, const Shape& want, const char* option, const char* layout) {
    if (got.first.size() != want.size()) {
      throw InvalidArgument(option, std::string("expected ") + layout + ", got " + shape_to_string(got.first));
    }
    for (std::size_t d = 0; d < want.size(); ++d) {
      if (want[d] >= 0 && got.first[d] != want[d]) {
        const char* dim = d == 0 ? "B" : d == 1 ? "NH" : d == 2 ? "S" : "the head dimension";
        throw InvalidArgument(option, std::string("expected ") + layout + " with " + dim + " = " +
                                          std::to_string(want[d]) + " as in --q, got " + shape_to_string(got.first));
      }
    }
  };
  expect(k, h.q, "--k", "(B,NH,S,DHQK)");
  expect(v, {h.B, h.NH, h.S, -1}, "--v", "(B,NH,S,DHHV)");
  expect(i, {h.B, h.NH, h.S}, "--i", "(B,NH,S)");
  expect(f, {h.B, h.NH, h.S}, "--f", "(B,NH,S)");
  h.k = k.first;
  h.v = v.first;
  h.i = i.first;
  h.f = f.first;
  h.DV = h.v[3];
  for (const auto* t : {&q, &k, &v, &i, &f}) {
    h.bytes += static_cast<std::uint64_t>(shape_numel(t->first)) * dtype_size(t->second);
  }
  return h;
}

std::uint64_t input_and_h_bytes_per_token(const InputHeaders& hdr) {
  return static_cast<std::uint64_t>(hdr.B * hdr.NH) *
         static_cast<std::uint64_t>(token_bytes(hdr.DK, hdr.DV, hdr.dtype) +
                                    hdr.DV * static_cast<std::int64_t>(dtype_size(hdr.dtype)));
}

std::uint64_t memory_limit_of(const ForwardStreaming& st) {
  if (st.memory_limit > 0) return static_cast<std::uint64_t>(st.memory_limit);
  const auto pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? static_cast<std::uint64_t>(pages) * static_cast<std::uint64_t>(page)
                               : std::uint64_t{1} << 34;
}

std::string mib_text(std::uint64_t bytes) {
  char text[48];
  if (bytes < (std::uint64_t{1} << 20)) {  // below a MiB in bytes (a limit of 100 read "0.0 MiB")
    std::snprintf(text, sizeof text, "%llu bytes", static_cast<unsigned long long>(bytes));
  } else {
    std::snprintf(text, sizeof text, "%.1f MiB", static_cast<double>(bytes) / static_cast<double>(1 << 20));
  }
  return text;
}

std::int64_t longest_sequence(std::int64_t S, const std::vector<std::int64_t>& cu_seqlens) {
  if (cu_seqlens.size() < 2) return S;
  std::int64_t longest = 0;
  for (std::size_t j = 1; j < cu_seqlens.size(); ++j) longest = std::max(longest, cu_seqlens[j] - cu_seqlens[j - 1]);
  return longest;
}

std::vector<std::string> kernel_devices(const InputFiles& in) {
  if (!in.devices.empty()) {
    const auto named = opencl::select_devices(in.devices);
    if (named.size() == 1) return {"opencl:" + std::to_string(named[0].index) + " " + named[0].name};
    return {in.devices};  // refused before any run (a kernel runs on one device)
  }
  return {kernel_info(in.kernel, false).device_kind == "opencl" ? "opencl (default device)" : "cpu"};
}

int cmd_forward(const InputFiles& in, const ForwardOutputs& out, const ForwardStreaming& st, bool as_json) {
  const KernelInfo info = kernel_info(in.kernel, false);
  const MlstmOptions o = options_of(in, info);
  check_outputs(input_paths(in), output_paths(out));
  if (st.resume && st.tokens == 0) {
    throw InvalidArgument("--resume", "continues a --stream-tokens run; give the same --stream-tokens");
  }
  const InputHeaders hdr = read_input_headers(in);
  const std::uint64_t limit = memory_limit_of(st);
  const std::uint64_t h_bytes =
      static_cast<std::uint64_t>(hdr.B * hdr.NH) * static_cast<std::uint64_t>(hdr.S * hdr.DV) * dtype_size(hdr.dtype);
  if (st.tokens > 0) {
    require_range(st.tokens, 1, kMaxTokens, "--stream-tokens");
    // About three slices are in flight (read, compute, write): inputs and h of each.
    const std::uint64_t per_token = input_and_h_bytes_per_token(hdr);
    const std::uint64_t slice_tokens =
        static_cast<std::uint64_t>(std::min(st.tokens, std::max<std::int64_t>(hdr.S, 1)));
    if (3 * slice_tokens * per_token > limit) {
      throw InvalidArgument("--stream-tokens", std::to_string(st.tokens) + " tokens per slice need about " +
                                                   mib_text(3 * slice_tokens * per_token) +
                                                   " in flight (three slices), more than the memory limit of " +
                                                   mib_text(limit) + "; pick fewer");
    }
    return cmd_forward_streamed(in, out, st, o, hdr, as_json);
  }
  // Whole arrays: inputs and h in memory at once. Larger than the limit is refused, never streamed behind the
  // user's back (the slice size decides the bits of h: it is the user's choice).
  if (hdr.bytes + h_bytes > limit) {
    throw InvalidArgument("--stream-tokens", "the inputs and h need " + mib_text(hdr.bytes + h_bytes) +
                                                 " in memory, more than the limit of " + mib_text(limit) +
                                                 (st.memory_limit > 0 ? " (--memory-limit)" : " (this machine)") +
                                                 "; stream the files in slices with --stream-tokens N");
  }
  const ForwardInputs l = load_inputs(in);
  ForwardResult r;
  try {
    if (in.check_finite) check_finite(l.args());
    Engine engine(in);
    const auto t0 = Clock::now();
    r = engine.forward(l.args(), o);
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    // The size the calls took: no chunk spans more tokens than a row (or packed sequence) has.
    const std::int64_t chunk = size_taken(engine.chunk_for(l.args(), o), longest_sequence(hdr.S, l.cu_seqlens));
    OutputFiles files;
    files.add("--out", out.h, r.h);
    files.add("--out-c", out.c, r.c);
    files.add("--out-n", out.n, r.n);
    files.add("--out-m", out.m, r.m);
    files.commit();
    if (as_json) {
      std::cout << json{{"command", "forward"},
                        {"kernel", runs_one_kernel(in) ? in.kernel : "flow-graph"},
                        {"devices", engine.devices()},
                        {"balancing", engine.balancing()},
                        {"shape_h", r.h.shape()},
                        {"packed_sequences", l.cu_seqlens.empty() ? 0 : l.cu_seqlens.size() - 1},
                        {"chunk_size", chunk},
                        {"dtype", dtype_name(r.h.dtype())},
                        {"seconds", secs},
                        {"input_mib", static_cast<double>(hdr.bytes) / static_cast<double>(1 << 20)},
                        {"peak_rss_mib", peak_rss_mib()}}
                       .dump()
                << "\n";
    } else {
      std::cout << "forward: " << engine.what(in) << ", chunk " << chunk << ", h " << shape_to_string(r.h.shape())
                << " " << dtype_name(r.h.dtype()) << " -> " << out.h << " (" << secs * 1e3 << " ms)\n";
    }
  } catch (const InvalidArgument& e) {
    rethrow_as_cli(e);
  }
  return 0;
}

void check_backward_files(const InputFiles& in, const BackwardFiles& bf) {
  // Gradients of the initial state exist only for a given initial state: refused up front, not skipped.
  for (const auto& [option, path] :
       {std::pair{"--out-dc0", bf.out_dc0}, {"--out-dn0", bf.out_dn0}, {"--out-dm0", bf.out_dm0}}) {
    if (!path.empty() && in.c0.empty()) {
      throw InvalidArgument(option,
                            "needs the initial state (--c0, --n0, --m0): without one there is no gradient of it");
    }
  }
  // A backward that writes nothing computes for nothing: refused, as every option without effect is.
  if (bf.out_dq.empty() && bf.out_dk.empty() && bf.out_dv.empty() && bf.out_di.empty() && bf.out_df.empty() &&
      bf.out_dc0.empty() && bf.out_dn0.empty() && bf.out_dm0.empty()) {
    throw InvalidArgument("--out-dq",
                          "backward writes nothing: give one or more of --out-dq, --out-dk, --out-dv, "
                          "--out-di, --out-df, --out-dc0, --out-dn0, --out-dm0");
  }
  std::vector<NamedPath> inputs = input_paths(in);
  const std::vector<NamedPath> gradients = gradient_input_paths(bf);
  inputs.insert(inputs.end(), gradients.begin(), gradients.end());
  check_outputs(inputs, gradient_output_paths(bf));
}

std::vector<NamedPath> output_paths(const ForwardOutputs& out) {
  return {{"--out", out.h}, {"--out-c", out.c}, {"--out-n", out.n}, {"--out-m", out.m}};
}

std::vector<NamedPath> gradient_input_paths(const BackwardFiles& bf) {
  return {{"--dh", bf.dh}, {"--dc", bf.dc}, {"--dn", bf.dn}};
}

std::vector<NamedPath> gradient_output_paths(const BackwardFiles& bf) {
  return {{"--out-dq", bf.out_dq}, {"--out-dk", bf.out_dk},   {"--out-dv", bf.out_dv},   {"--out-di", bf.out_di},
          {"--out-df", bf.out_df}, {"--out-dc0", bf.out_dc0}, {"--out-dn0", bf.out_dn0}, {"--out-dm0", bf.out_dm0}};
}

int cmd_backward(const InputFiles& in, const BackwardFiles& bf, bool as_json) {
  const KernelInfo info = kernel_info(in.kernel, false);
  if (!info.has_backward) throw InvalidArgument("--kernel", "'" + in.kernel + "' has no backward; see `mlstm kernels`");
  const MlstmOptions o = options_of(in, info);
  check_backward_files(in, bf);
  BackwardInputs l;
  static_cast<ForwardInputs&>(l) = load_inputs(in);
  l.dh = npy::read_any(bf.dh, "--dh", as_dtype(in));
  l.dc_last = read_optional(bf.dc, "--dc", as_dtype(in));
  l.dn_last = read_optional(bf.dn, "--dn", as_dtype(in));
  try {
    if (in.check_finite) {
      check_finite(l.args());
      check_finite(l.dh.view(), "dh");
      check_finite(l.dc_last.view(), "dc_last");
      check_finite(l.dn_last.view(), "dn_last");
    }
    const BackwardArgs b = l.backward_args();
    Engine engine(in);
    const auto t0 = Clock::now();
    const BackwardResult g = engine.backward(b, o);
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    // The size the calls took: no chunk spans more tokens than a row (or packed sequence) has.
    const std::int64_t chunk = size_taken(engine.chunk_for(b.inputs, o), longest_sequence(l.q.dim(2), l.cu_seqlens));
    OutputFiles files;
    files.add("--out-dq", bf.out_dq, g.dq);
    files.add("--out-dk", bf.out_dk, g.dk);
    files.add("--out-dv", bf.out_dv, g.dv);
    files.add("--out-di", bf.out_di, g.di);
    files.add("--out-df", bf.out_df, g.df);
    files.add("--out-dc0", bf.out_dc0, g.dc0);
    files.add("--out-dn0", bf.out_dn0, g.dn0);
    files.add("--out-dm0", bf.out_dm0, g.dm0);
    files.commit();
    if (as_json) {
      std::cout << json{{"command", "backward"},
                        {"kernel", runs_one_kernel(in) ? in.kernel : "flow-graph"},
                        {"devices", engine.devices()},
                        {"balancing", engine.balancing()},
                        {"seconds", secs},
                        {"initial_state_gradients", !g.dc0.empty()},
                        {"chunk_size", chunk},
                        {"packed_sequences", l.cu_seqlens.empty() ? 0 : l.cu_seqlens.size() - 1}}
                       .dump()
                << "\n";
    } else {
      std::cout << "backward: " << engine.what(in) << ", chunk " << chunk << " (" << secs * 1e3 << " ms)\n";
    }
  } catch (const InvalidArgument& e) {
    rethrow_as_cli(e);
  }
  return 0;
}

int cmd_step(const InputFiles& in, const StepFiles& sf, bool as_json) {
  const KernelInfo info = kernel_info(in.kernel, true);
  const MlstmOptions o = options_of(in, info);
  check_outputs({{"--q", in.q},
                 {"--k", in.k},
                 {"--v", in.v},
                 {"--i", in.i},
                 {"--f", in.f},
                 {"--c", sf.c},
                 {"--n", sf.n},
                 {"--m", sf.m}},
                {{"--out", sf.out_h}, {"--out-c", sf.out_c}, {"--out-n", sf.out_n}, {"--out-m", sf.out_m}});
  const auto dt = as_dtype(in);
  const Tensor q = npy::read(in.q, "--q", dt), k = npy::read(in.k, "--k", dt), v = npy::read(in.v, "--v", dt);
  const Tensor i = npy::read_any(in.i, "--i", dt), f = npy::read_any(in.f, "--f", dt);
  const Tensor c = read_optional(sf.c, "--c", dt), n = read_optional(sf.n, "--n", dt),
               m = read_optional(sf.m, "--m", dt);
  try {
    StepArgs a;
    a.q = q.view();
    a.k = k.view();
    a.v = v.view();
    a.i = i.view();
    a.f = f.view();
    if (!c.empty()) a.c = c.view();
    if (!n.empty()) a.n = n.view();
    if (!m.empty()) a.m = m.view();
    if (in.check_finite) {
      for (auto [t, name] :
           {std::pair{a.q, "q"}, {a.k, "k"}, {a.v, "v"}, {a.i, "i"}, {a.f, "f"}, {a.c, "c"}, {a.n, "n"}, {a.m, "m"}}) {
        check_finite(t, name);
      }
    }
    if (!in.devices.empty() && opencl::select_devices(in.devices).size() != 1) {
      throw InvalidArgument("--devices", "a step runs on one device; '" + in.devices + "' names several");
    }
    const StepResult r = get_step_kernel(in.kernel, KernelTarget{in.devices})->step(a, o);
    OutputFiles files;
    files.add("--out", sf.out_h, r.h);
    files.add("--out-c", sf.out_c, r.c);
    files.add("--out-n", sf.out_n, r.n);
    files.add("--out-m", sf.out_m, r.m);
    files.commit();
    if (as_json) {
      std::cout << json{{"command", "step"}, {"kernel", in.kernel}, {"shape_h", r.h.shape()}}.dump() << "\n";
    } else {
      std::cout << "step: " << in.kernel << ", h " << shape_to_string(r.h.shape()) << "\n";
    }
  } catch (const InvalidArgument& e) {
    rethrow_as_cli(e);
  }
  return 0;
}

}  // namespace mlstm::cli
