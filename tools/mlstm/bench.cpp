// bench: the constant-token sweep (kernels x sequence lengths x chunk sizes, then head dimensions and flow-graph
// devices), written to CSV and JSON after every measured row.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <iostream>
#include <sstream>

#include "commands.hpp"
#include "default_outputs.hpp"
#include "mlstm/core/atomic_file.hpp"
#include "mlstm/devices/opencl/device.hpp"
#include "mlstm/devices/opencl/resident_split.hpp"

namespace mlstm::cli {

namespace {

int bench(const BenchOptions& bo, DType dtype, bool as_json);

// How bench's files begin (the JSON's keys are sorted: "machine" first); refuse_foreign_default_outputs reads them,
// the CSV's up to the column every version has (sweep came in session 42: the rows of the head-dim and flow-graph
// sweeps, empty for the kernel rows).
constexpr std::string_view kCsvHeader = "kernel,B,NH,S,DHQK,DHHV,dtype,chunk,pass,median_ms,tokens_per_s,sweep\n";
constexpr std::string_view kCsvSignature = "kernel,B,NH,S,DHQK,DHHV,dtype,chunk,pass,median_ms,tokens_per_s";
// A CSV field: as it is, or quoted (quotes doubled) where it holds a comma, a quote or a line break.
std::string csv_text(const std::string& s) {
  if (s.find_first_of(",\"\n\r") == std::string::npos) return s;
  std::string out = "\"";
  for (const char ch : s) out += ch == '"' ? std::string("\"\"") : std::string(1, ch);
  return out + "\"";
}
constexpr std::string_view kJsonStart = "{\n  \"machine\": {";

// Every option of bench in range, and every value used (a sequence length that does not divide --tokens
// would be skipped: refused instead), before anything is allocated or measured.
void check_bench(const BenchOptions& bo, DType dtype) {
  require_range(bo.tokens, 1, kMaxTokens, "--tokens");
  require_range(bo.heads, 1, kMaxDim, "--heads");
  require_range(bo.dqk, 1, kMaxDim, "--dqk");
  require_range(bo.dhv, 1, kMaxDim, "--dhv");
  require_range(bo.repeats, 1, 1000000, "--repeats");
  auto nonempty = [](bool empty, const char* option) {
    if (empty) throw InvalidArgument(option, "needs at least one value");
  };
  nonempty(bo.seq_lens.empty(), "--seq-lens");
  nonempty(bo.chunk_sizes.empty(), "--chunk-sizes");
  nonempty(bo.kernels.empty(), "--kernels");
  refuse_repeats(bo.kernels, "--kernels");
  refuse_repeats(bo.seq_lens, "--seq-lens");
  refuse_repeats(bo.chunk_sizes, "--chunk-sizes");
  refuse_repeats(bo.head_dims, "--head-dims");
  refuse_repeats(bo.graph_devices, "--graph-devices");
  for (const auto S : bo.seq_lens) {
    require_range(S, 1, bo.tokens, "--seq-lens");
    if (bo.tokens % S != 0) {
      throw InvalidArgument("--seq-lens", std::to_string(S) + " does not divide --tokens " + std::to_string(bo.tokens));
    }
  }
  for (const auto L : bo.chunk_sizes) require_range(L, 1, kMaxChunkSize, "--chunk-sizes");
  for (const auto d : bo.head_dims) require_range(d, 1, kMaxDim, "--head-dims");
  require_range(bo.weak_seq_len, 0, kMaxTokens, "--weak-seq-len");
  if (bo.weak_seq_len > 0 && bo.graph_devices.empty()) {
    throw InvalidArgument("--weak-seq-len", "has no effect without --graph-devices");
  }
  for (const auto& spec : bo.graph_devices) {  // every spec resolved (nothing opened) before the sweep measures
    if (spec.empty()) throw InvalidArgument("--graph-devices", "an empty device spec");
    try {
      (void)named_devices(spec);
    } catch (const InvalidArgument& e) {
      rethrow_as_cli(e, {{"devices", "--graph-devices"}, {"device_spec", "--graph-devices"}});
    }
  }
  bool any_chunked = false;
  for (const auto& name : bo.kernels) {
    const KernelInfo info = [&] {
      try {
        return kernel_info(name, false);
      } catch (const InvalidArgument& e) {
        rethrow_as_cli(e, {{"--kernel", "--kernels"}});
      }
    }();
    any_chunked = any_chunked || info.form == KernelForm::chunkwise;
    if (bo.backward && !info.has_backward)
      throw InvalidArgument("--kernels", "'" + name + "' has no backward (--backward)");
    if (!info.dtypes.empty() && std::find(info.dtypes.begin(), info.dtypes.end(), dtype) == info.dtypes.end()) {
      throw InvalidArgument("--dtype", "kernel '" + name + "' does not take " + std::string(dtype_name(dtype)));
    }
  }
  if (!any_chunked && option_given(bo, "--chunk-sizes") && bo.graph_devices.empty()) {
    throw InvalidArgument(
        "--chunk-sizes", "none of --kernels is a chunkwise kernel and there is no --graph-devices: nothing has chunks");
  }
  const std::int64_t S_max = *std::max_element(bo.seq_lens.begin(), bo.seq_lens.end());
  require_fits_memory({bo.tokens, bo.heads, token_bytes(bo.dqk, bo.dhv, dtype)}, "--tokens/--heads/--dqk/--dhv");
  require_fits_memory({bo.heads, bo.dqk, bo.dhv, 4}, "--heads/--dqk/--dhv");
  for (const auto d : bo.head_dims) {
    require_fits_memory({std::max<std::int64_t>(1, bo.tokens / S_max) * S_max, bo.heads, token_bytes(d, d, dtype)},
                        "--head-dims/--tokens/--heads");
    require_fits_memory({bo.heads, d, d, 4}, "--head-dims/--heads");
  }
  check_outputs({}, {{"--csv", bo.csv}, {"--json-out", bo.json_out}});
  refuse_foreign_default_outputs(bo, bo.csv, kCsvSignature, bo.json_out, kJsonStart);
}

}  // namespace

int cmd_bench(const BenchOptions& bo, bool as_json) {
  refuse_system_options(bo);
  const DType dtype = parse_dtype(bo.dtype, "--dtype");
  check_bench(bo, dtype);
  try {
    return bench(bo, dtype, as_json);
  } catch (const InvalidArgument& e) {
    // A kernel that cannot take the swept problem names q ("parallel--opencl takes S <= 16384"): --kernels.
    rethrow_as_cli(e, {{"chunk_size", "--chunk-sizes"},
                       {"kernel", "--kernels"},
                       {"devices", "--graph-devices"},
                       {"q", "--kernels"},
                       {"v", "--kernels"}});
  }
}

namespace {

int bench(const BenchOptions& bo, DType dtype, bool as_json) {
  json results = json::array();
  std::ostringstream csv;
  csv << kCsvHeader;
  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  auto document = [&] {
    return json{
        {"machine", {{"hostname", host}, {"cpu", cpu_model()}, {"cores", sysconf(_SC_NPROCESSORS_ONLN)}}},
        {"revision", git_revision()},
        {"timestamp",
         std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count()},
        {"results", results}};
  };
  // Both files are replaced atomically after every measured row: a sweep cut short (a time limit) keeps the
  // rows measured so far, and a failed write leaves the previous complete file, never half of one.
  auto save = [&] {
    write_file_atomically(bo.csv, csv.str());
    write_file_atomically(bo.json_out, document().dump(2) + "\n");
  };
  for (const auto& kname : bo.kernels) {
    auto kernel = get_kernel(kname);
    const bool chunked = kernel_info(kname, false).form == KernelForm::chunkwise;
    for (auto S : bo.seq_lens) {
      if (S > bo.tokens || bo.tokens % S != 0) continue;
      const std::int64_t B = bo.tokens / S;
      const ForwardInputs l = synthetic_piece(B, bo.heads, S, bo.dqk, bo.dhv, dtype, 99);
      // The chunks the kernel runs: min(chunk, S) (problem.hpp kMaxChunkSize), each once; a kernel of another form
      // has none (one row, chunk 0 in the files, "-" on the screen).
      std::vector<std::int64_t> chunks;
      for (const auto L : bo.chunk_sizes) {
        const std::int64_t used = chunked ? std::min(L, S) : 0;
        if (std::find(chunks.begin(), chunks.end(), used) == chunks.end()) chunks.push_back(used);
      }
      for (auto L : chunks) {
        MlstmOptions o;
        o.chunk_size = chunked ? L : kAutoChunk;
        for (int pass = 0; pass < (bo.backward ? 2 : 1); ++pass) {
          std::vector<double> times;
          for (std::int64_t rep = 0; rep <= bo.repeats; ++rep) {
            const auto t0 = Clock::now();
            ForwardResult r = kernel->forward(l.args(), o);
            if (pass == 1) {
              BackwardArgs b;
              b.inputs = l.args();
              b.dh = r.h.view();
              (void)kernel->backward(b, o);
            }
            if (rep > 0) times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());  // rep 0: warm-up
          }
          std::sort(times.begin(), times.end());
          const double med = times[times.size() / 2];
          const char* pass_name = pass == 0 ? "fw" : "fwbw";
          csv << kname << ',' << B << ',' << bo.heads << ',' << S << ',' << bo.dqk << ',' << bo.dhv << ','
              << dtype_name(dtype) << ',' << L << ',' << pass_name << ',' << med * 1e3 << ','
              << static_cast<double>(bo.tokens) / med << ",\n";
          results.push_back({{"kernel", kname},
                             {"B", B},
                             {"NH", bo.heads},
                             {"S", S},
                             {"DHQK", bo.dqk},
                             {"DHHV", bo.dhv},
                             {"dtype", dtype_name(dtype)},
                             {"chunk", L},
                             {"pass", pass_name},
                             {"median_ms", med * 1e3},
                             {"tokens_per_s", static_cast<double>(bo.tokens) / med}});
          if (!as_json) {
            std::printf("%-30s S=%6lld B=%4lld chunk=%4s %-4s %9.2f ms %10.0f tokens/s\n", kname.c_str(),
                        static_cast<long long>(S), static_cast<long long>(B), chunked ? std::to_string(L).c_str() : "-",
                        pass_name, med * 1e3, static_cast<double>(bo.tokens) / med);
            std::fflush(stdout);
          }
          save();
        }
      }
    }
  }
  // Head-dimension sweep (first kernel, first chunk size, S = the largest sequence length).
  auto record = [&](const std::string& kernel, std::int64_t B, std::int64_t S, std::int64_t dqk, std::int64_t dhv,
                    std::int64_t L, const std::string& pass, double med, double tokens, const std::string& extra) {
    csv << kernel << ',' << B << ',' << bo.heads << ',' << S << ',' << dqk << ',' << dhv << ',' << dtype_name(dtype)
        << ',' << L << ',' << pass << ',' << med * 1e3 << ',' << tokens / med << ',' << csv_text(extra) << '\n';
    results.push_back({{"kernel", kernel},
                       {"B", B},
                       {"NH", bo.heads},
                       {"S", S},
                       {"DHQK", dqk},
                       {"DHHV", dhv},
                       {"dtype", dtype_name(dtype)},
                       {"chunk", L},
                       {"pass", pass},
                       {"median_ms", med * 1e3},
                       {"tokens_per_s", tokens / med},
                       {"sweep", extra}});
    if (!as_json) {
      std::printf("%-30s S=%6lld B=%4lld D=%4lld/%-4lld chunk=%4s %-6s %9.2f ms %10.0f tokens/s  %s\n", kernel.c_str(),
                  static_cast<long long>(S), static_cast<long long>(B), static_cast<long long>(dqk),
                  static_cast<long long>(dhv), L > 0 ? std::to_string(L).c_str() : "-", pass.c_str(), med * 1e3,
                  tokens / med, extra.c_str());
      std::fflush(stdout);  // rows show up as they are measured (a long sweep cut short keeps them)
    }
    save();
  };
  auto median_of = [&](const std::function<void()>& fn) { return median_seconds(bo.repeats, fn); };
  const std::int64_t S_max = *std::max_element(bo.seq_lens.begin(), bo.seq_lens.end());
  const std::int64_t L0 = bo.chunk_sizes.front();
  for (auto d : bo.head_dims) {
    const std::int64_t B = std::max<std::int64_t>(1, bo.tokens / S_max);
    const ForwardInputs l = synthetic_piece(B, bo.heads, S_max, d, d, dtype, 98);
    const bool chunked = kernel_info(bo.kernels.front(), false).form == KernelForm::chunkwise;
    MlstmOptions o;
    o.chunk_size = chunked ? std::min(L0, S_max) : kAutoChunk;
    auto kernel = get_kernel(bo.kernels.front());
    const double med = median_of([&] { (void)kernel->forward(l.args(), o); });
    record(bo.kernels.front(), B, S_max, d, d, o.chunk_size, "fw", med, static_cast<double>(B * S_max), "head_dim");
  }
  // Strong scaling (the same S_max tokens on every device set) and weak scaling (--weak-seq-len, else S_max, tokens per
  // device): fn(S, inputs of S tokens, the row's "sweep" text).
  auto for_scalings = [&](std::int64_t ndev,
                          const std::function<void(std::int64_t, const ForwardInputs&, const std::string&)>& fn) {
    for (const char* scaling : {"strong", "weak"}) {
      const std::int64_t S =
          std::string(scaling) == "strong" ? S_max : (bo.weak_seq_len > 0 ? bo.weak_seq_len : S_max) * ndev;
      fn(S, synthetic_piece(1, bo.heads, S, bo.dqk, bo.dhv, dtype, 97),
         std::string(scaling) + "_scaling devices=" + std::to_string(ndev));
    }
  };
  // Device-resident (opencl::ResidentSplit, issue 15), first (the graph's rows from host memory take longer): the
  // inputs uploaded once, forward and, with --backward, forward + backward (dh = v), the sequence split (state
  // summaries exchanged) and the head split, over the OpenCL devices of every --graph-devices spec (a spec with CPU
  // workers has none); strong and weak scaling as below.
  for (const auto& spec : bo.graph_devices) {
    std::vector<std::shared_ptr<opencl::Device>> resident_devices;
    try {
      for (const auto& info : opencl::select_devices(spec)) resident_devices.push_back(opencl::open_device(info));
    } catch (const InvalidArgument&) {
      continue;
    }
    const auto ndev = static_cast<std::int64_t>(resident_devices.size());
    MlstmOptions o;
    o.chunk_size = L0;
    for_scalings(ndev, [&](std::int64_t S, const ForwardInputs& l, const std::string& what) {
      for (const auto split : {opencl::SplitBy::sequence, opencl::SplitBy::heads}) {
        const bool heads = split == opencl::SplitBy::heads;
        const std::string kernel = "resident[" + spec + "]" + (heads ? " head split" : "");
        BackwardArgs b;
        b.inputs = l.args();
        b.dh = l.v.view();
        opencl::SplitOptions so;
        so.split = split;
        try {
          opencl::ResidentSplit rs(resident_devices, l.args(), o, bo.backward ? &b : nullptr, so);
          record(kernel, 1, S, bo.dqk, bo.dhv, L0, "fw", median_of([&] { rs.forward(); }), static_cast<double>(S),
                 what);
          if (bo.backward)
            record(kernel, 1, S, bo.dqk, bo.dhv, L0, "fwbw", median_of([&] {
                     rs.forward();
                     rs.backward();
                   }),
                   static_cast<double>(S), what);
        } catch (const DeviceError& e) {  // does not fit the devices' memory: said, not fatal
          std::fprintf(stderr, "mlstm bench: %s %s skipped: %s\n", kernel.c_str(), what.c_str(), e.what());
        }
      }
    });
  }
  // Device sweep through the flow graph: strong scaling (the same tokens on every device set) and weak
  // scaling (tokens proportional to the number of devices).
  for (const auto& spec : bo.graph_devices) {
    graph::FlowGraphRunner runner(spec);
    const auto ndev = static_cast<std::int64_t>(runner.devices().size());
    MlstmOptions o;
    o.chunk_size = L0;
    for_scalings(ndev, [&](std::int64_t S, const ForwardInputs& l, const std::string& what) {
      // Sequence parallel (segments over the devices) and head split (rows over the devices), forward and,
      // with --backward, forward + backward (dh = h).
      for (const bool head_split : {false, true}) {
        const std::string kernel = "graph[" + spec + "]" + (head_split ? " head split" : "");
        ForwardResult fw;
        const double med =
            median_of([&] { fw = head_split ? runner.forward_head_split(l.args(), o) : runner.forward(l.args(), o); });
        record(kernel, 1, S, bo.dqk, bo.dhv, L0, "fw", med, static_cast<double>(S), what);
        if (!bo.backward) continue;
        BackwardArgs b;
        b.inputs = l.args();
        b.dh = fw.h.view();
        const double med_bw = median_of([&] {
          (void)(head_split ? runner.forward_head_split(l.args(), o) : runner.forward(l.args(), o));
          (void)(head_split ? runner.backward_head_split(b, o) : runner.backward(b, o));
        });
        record(kernel, 1, S, bo.dqk, bo.dhv, L0, "fwbw", med_bw, static_cast<double>(S), what);
      }
    });
    // Streaming vs resident: the same S_max tokens in 8 pieces with the state carried, against one pass
    // (the strong-scaling row above).
    {
      const ForwardInputs l = synthetic_piece(1, bo.heads, S_max, bo.dqk, bo.dhv, dtype, 97);
      const std::int64_t piece = std::max<std::int64_t>(L0, S_max / 8);
      const double med = median_of([&] {
        StreamConfig cfg;
        cfg.B = 1;
        cfg.NH = bo.heads;
        cfg.DHQK = bo.dqk;
        cfg.DHHV = bo.dhv;
        cfg.options = o;
        Tensor C = Tensor::zeros({1, bo.heads, bo.dqk, bo.dhv}, DType::f32),
               n = Tensor::zeros({1, bo.heads, bo.dqk}, DType::f32), m = Tensor::zeros({1, bo.heads}, DType::f32);
        for (std::int64_t t0 = 0; t0 < S_max; t0 += piece) {
          const std::int64_t t1 = std::min(S_max, t0 + piece);
          auto slice = [&](const Tensor& t, std::int64_t inner) {
            Shape shape = t.shape();
            shape[2] = t1 - t0;
            Shape strides = contiguous_strides(t.shape());
            return ConstTensorView(t.bytes() + static_cast<std::size_t>(t0 * inner) * dtype_size(t.dtype()), t.dtype(),
                                   shape, strides);
          };
          ForwardArgs a;
          a.q = slice(l.q, bo.dqk);
          a.k = slice(l.k, bo.dqk);
          a.v = slice(l.v, bo.dhv);
          a.i = slice(l.i, 1);
          a.f = slice(l.f, 1);
          a.c0 = C.view();
          a.n0 = n.view();
          a.m0 = m.view();
          ForwardResult r = runner.forward(a, o);
          C = std::move(r.c);
          n = std::move(r.n);
          m = std::move(r.m);
        }
      });
      record("graph[" + spec + "]", 1, S_max, bo.dqk, bo.dhv, L0, "fw", med, static_cast<double>(S_max),
             "streaming pieces=" + std::to_string((S_max + piece - 1) / piece) + " devices=" + std::to_string(ndev));
    }
  }
  save();  // also when no row was measured: the files say so
  if (as_json) std::cout << document().dump() << "\n";
  return 0;
}

}  // namespace

}  // namespace mlstm::cli
