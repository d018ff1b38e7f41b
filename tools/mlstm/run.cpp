// run: a long synthetic sequence streamed through the session's one engine (FlowGraphRunner::open_stream: a GPU
// through pinned staging, or the graph over every device, whichever measured faster), pieces kept in flight,
// spot-checked against the float64 reference; also the synthetic inputs bench uses.
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/task_group.h>
#include <unistd.h>

#include <CLI/Option.hpp>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <iostream>
#include <limits>

#include "commands.hpp"
#include "mlstm/devices/opencl/device.hpp"
#include "mlstm/devices/opencl/tc_routine.hpp"
#include "mlstm/reference.hpp"

namespace mlstm::cli {

namespace {

// Progress on stderr: tokens/s and ETA. Shown when stderr is a terminal or --progress is given.
class Progress {
 public:
  Progress(std::int64_t total, bool enabled) : total_(total), enabled_(enabled), start_(Clock::now()) {}
  void update(std::int64_t done) {
    if (!enabled_) return;
    const double secs = std::chrono::duration<double>(Clock::now() - start_).count();
    const double rate = secs > 0 ? static_cast<double>(done) / secs : 0.0;
    const double eta = rate > 0 ? static_cast<double>(total_ - done) / rate : 0.0;
    const int width = 30;
    const int filled =
        static_cast<int>(width * static_cast<double>(done) / static_cast<double>(std::max<std::int64_t>(total_, 1)));
    std::fprintf(stderr, "\r[%s%s] %5.1f%%  %.0f tokens/s  ETA %.1fs   ",
                 std::string(static_cast<std::size_t>(filled), '#').c_str(),
                 std::string(static_cast<std::size_t>(width - filled), '.').c_str(),
                 100.0 * static_cast<double>(done) / static_cast<double>(std::max<std::int64_t>(total_, 1)), rate, eta);
    if (done >= total_) std::fprintf(stderr, "\n");
    std::fflush(stderr);
  }

 private:
  std::int64_t total_;
  bool enabled_;
  Clock::time_point start_;
};

// Synthetic inputs of one piece of a long sequence, deterministic in (seed, element). Each element is the sum
// of the four 16-bit parts of one counter-based hash (splitmix64) of its index, centred and scaled to unit
// variance: an Irwin-Hall approximation of a normal (within +-3.46 of the mean), with no transcendental function
// per element. Written straight into the tensor's dtype, in parallel blocks: the pieces of a run come in
// milliseconds (Box-Muller through a float32 vector and a serial conversion took 0.6 s of the start-up on a
// 16-core host, 1.9 s on 2 cores).
Tensor synthetic_normal(Shape shape, float mean, DType dtype, std::uint64_t seed) {
  Tensor t(std::move(shape), dtype);
  const std::int64_t count = t.numel();
  const std::size_t es = dtype_size(dtype);
  auto mix = [](std::uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  };
  constexpr std::int64_t kBlock = 4096;
  tbb::parallel_for(
      tbb::blocked_range<std::int64_t>(0, (count + kBlock - 1) / kBlock),
      [&](const tbb::blocked_range<std::int64_t>& r) {
        std::array<float, kBlock> x;
        for (std::int64_t b = r.begin(); b < r.end(); ++b) {
          const std::int64_t first = b * kBlock, n = std::min(kBlock, count - first);
          for (std::int64_t e = 0; e < n; ++e) {
            const std::uint64_t z = mix(seed * 0x100000001b3ull + static_cast<std::uint64_t>(first + e));
            const auto sum = static_cast<float>((z & 0xffff) + ((z >> 16) & 0xffff) + ((z >> 32) & 0xffff) + (z >> 48));
            // four U[0,1) of variance 1/12 each: (sum - 2) * sqrt(3) has unit variance
            x[static_cast<std::size_t>(e)] = mean + (sum * (1.0f / 65536.0f) - 2.0f) * 1.7320508f;
          }
          convert_elements(x.data(), DType::f32, t.bytes() + static_cast<std::size_t>(first) * es, dtype,
                           static_cast<std::size_t>(n));
        }
      });
  return t;
}

}  // namespace

ForwardInputs synthetic_piece(std::int64_t B, std::int64_t NH, std::int64_t len, std::int64_t DK, std::int64_t DV,
                              DType dtype, std::uint64_t seed) {
  ForwardInputs l;
  l.q = synthetic_normal({B, NH, len, DK}, 0, dtype, seed * 5 + 0);
  l.k = synthetic_normal({B, NH, len, DK}, 0, dtype, seed * 5 + 1);
  l.v = synthetic_normal({B, NH, len, DV}, 0, dtype, seed * 5 + 2);
  l.i = synthetic_normal({B, NH, len}, 0, DType::f32, seed * 5 + 3);
  l.f = synthetic_normal({B, NH, len}, 3, DType::f32, seed * 5 + 4);
  return l;
}

ForwardInputs tile_pieces(const std::vector<ForwardInputs>& pieces, std::int64_t seq_len,
                          const std::function<Tensor(Shape, DType)>& alloc) {
  const std::size_t count = pieces.size();
  auto tile = [&](Tensor ForwardInputs::*member) {
    const Tensor& first = pieces[0].*member;
    const std::int64_t rows = first.dim(0) * first.dim(1), P = first.dim(2);
    const std::size_t es = dtype_size(first.dtype());
    const std::size_t inner = static_cast<std::size_t>(first.numel() / std::max<std::int64_t>(rows * P, 1)) * es;
    Shape shape = first.shape();
    shape[2] = seq_len;
    Tensor out = alloc ? alloc(shape, first.dtype()) : Tensor(shape, first.dtype());
    const std::int64_t tiles = (seq_len + P - 1) / P;
    // One memcpy per (row, tile), in parallel (a sequence of many GB is copied at the memory's speed).
    tbb::parallel_for(
        tbb::blocked_range<std::int64_t>(0, rows * tiles), [&](const tbb::blocked_range<std::int64_t>& r) {
          for (std::int64_t j = r.begin(); j < r.end(); ++j) {
            const std::int64_t row = j / tiles, t0 = (j % tiles) * P, len = std::min(P, seq_len - t0);
            const Tensor& src = pieces[static_cast<std::size_t>(t0 / P) % count].*member;
            std::memcpy(out.bytes() + static_cast<std::size_t>(row * seq_len + t0) * inner,
                        src.bytes() + static_cast<std::size_t>(row * P) * inner, static_cast<std::size_t>(len) * inner);
          }
        });
    return out;
  };
  ForwardInputs l;
  l.q = tile(&ForwardInputs::q);
  l.k = tile(&ForwardInputs::k);
  l.v = tile(&ForwardInputs::v);
  l.i = tile(&ForwardInputs::i);
  l.f = tile(&ForwardInputs::f);
  return l;
}

namespace {

// Tokens [0, n) of every (batch, head) row of `src` into `dst` from token `t0` on (axis 2: tokens; both contiguous,
// of one dtype and one width per token).
void copy_tokens(const Tensor& src, std::int64_t n, Tensor& dst, std::int64_t t0) {
  const std::int64_t rows = src.dim(0) * src.dim(1), len = src.dim(2), dst_len = dst.dim(2);
  const std::size_t inner =
      static_cast<std::size_t>(src.numel() / std::max<std::int64_t>(rows * len, 1)) * dtype_size(src.dtype());
  for (std::int64_t row = 0; row < rows; ++row) {
    std::memcpy(dst.bytes() + static_cast<std::size_t>(row * dst_len + t0) * inner,
                src.bytes() + static_cast<std::size_t>(row * len) * inner, static_cast<std::size_t>(n) * inner);
  }
}

// The spot check: the first `tokens` tokens of the sequence, gathered from the pieces that hold them (inputs as
// each piece is submitted, h as it comes back), then compared with the float64 reference from the zero state.
struct SpotCheck {
  std::int64_t tokens = 0;  // 0: none
  std::int64_t pieces = 0;  // the pieces they came from
  ForwardInputs inputs;
  Tensor h;
};

// Max relative error of the gathered h against the float64 reference (recurrent form) from the zero state.
double spot_check(const SpotCheck& check, const MlstmOptions& o) {
  const ForwardResult ref = reference::recurrent_forward(check.inputs.args(), o);
  const Tensor got = Tensor::copy_of(check.h.view(), DType::f64);
  double max_abs = 0, max_ref = 0;
  const auto gv = got.to_vector(), rv = ref.h.to_vector();
  for (std::size_t e = 0; e < gv.size(); ++e) {
    max_abs = std::max(max_abs, std::fabs(gv[e] - rv[e]));
    max_ref = std::max(max_ref, std::fabs(rv[e]));
  }
  return max_abs / std::max(max_ref, 1e-30);
}

// A plan as the text output shows it: its chunk the size the calls took (no chunk spans more than a call's tokens).
graph::Plan shown_plan(graph::Plan plan, std::int64_t call_tokens) {
  plan.chunk_size = size_taken(plan.chunk_size, call_tokens);
  return plan;
}

}  // namespace

int cmd_run(const RunOptions& ro, bool as_json) {
  // Every size in range before anything is allocated; the inputs of a piece (and, resident, of the whole
  // sequence) must fit in memory.
  require_range(ro.batch, 1, kMaxDim, "--batch");
  require_range(ro.heads, 1, kMaxDim, "--heads");
  require_range(ro.seq_len, 1, kMaxTokens, "--seq-len");
  if (std::int64_t tokens = 0; __builtin_mul_overflow(ro.batch, ro.seq_len, &tokens) || tokens > kMaxTokens) {
    throw InvalidArgument("--seq-len", "--batch x --seq-len must be at most 2^50 tokens");
  }
  require_range(ro.dqk, 1, kMaxDim, "--dqk");
  require_range(ro.dhv, 1, kMaxDim, "--dhv");
  require_range(ro.piece, 1, kMaxDim, "--piece");
  // At most the sequence when given (it was cut quietly); the default (2048) covers what there is.
  require_range(ro.check_tokens, 0,
                ro.check_tokens_option && ro.check_tokens_option->count() > 0
                    ? ro.seq_len
                    : std::numeric_limits<std::int64_t>::max(),
                "--check-tokens");
  check_outputs({}, {});  // run writes no file of its own; MLSTM_GRAPH_DOT (the flow graph's dump) is checked there
  const bool resident_mode = ro.mode == "resident";
  // The tokens each call of the stream takes per row: a piece, or (resident) the whole sequence.
  const std::int64_t piece_tokens = resident_mode ? ro.seq_len : std::min(ro.piece, ro.seq_len);
  // The spot check covers the first tokens of the sequence, across as many pieces as hold them: the given
  // --check-tokens, or the default 2048 cut to the first piece (a check of the first piece is cheap beside it).
  const std::int64_t check_tokens = ro.check_tokens_option && ro.check_tokens_option->count() > 0
                                        ? ro.check_tokens
                                        : std::min(ro.check_tokens, piece_tokens);
  if (resident_mode && ro.piece_option && ro.piece_option->count() > 0) {
    throw InvalidArgument("--piece", "has no effect with --mode resident (the whole sequence is one piece)");
  }
  if (ro.mode == "pipeline" && ro.backward) {
    throw InvalidArgument("--backward", "--mode pipeline runs the forward only; use --mode stream or resident");
  }
  const DType dtype = parse_dtype(ro.dtype, "--dtype");
  {
    const std::int64_t len = resident_mode ? ro.seq_len : std::min(ro.piece, ro.seq_len);
    const std::int64_t copies = resident_mode ? 1 : 4;  // the tiled sequence, or the distinct pieces
    const std::string what = std::string("--batch/--heads/") +
                             (ro.piece < ro.seq_len && !resident_mode ? "--piece" : "--seq-len") + "/--dqk/--dhv";
    require_fits_memory({ro.batch, ro.heads, len, token_bytes(ro.dqk, ro.dhv, dtype), copies}, what);
    require_fits_memory({ro.batch, ro.heads, ro.dqk, ro.dhv, 4}, "--batch/--heads/--dqk/--dhv");
    // The checked tokens' inputs, h and their float64 reference are held at once.
    require_fits_memory({ro.batch, ro.heads, check_tokens, token_bytes(ro.dqk, 2 * ro.dhv, DType::f64), 2},
                        "--check-tokens");
  }
  MlstmOptions o;
  o.chunk_size = ro.chunk_size;
  validate_options(o);
  if (ro.mode == "pipeline") {  // refused before any device opens, not at the first piece
    ProblemShape shape;
    shape.B = ro.batch;
    shape.NH = ro.heads;
    shape.S = std::min(ro.piece, ro.seq_len);
    shape.DHQK = ro.dqk;
    shape.DHHV = ro.dhv;
    shape.dtype = dtype;
    if (const std::string why = opencl::tensor_core_fit(shape, o); !why.empty()) {
      throw InvalidArgument("--mode", "pipeline runs the tensor-core kernels, which cannot take this problem: " + why);
    }
    if (ro.devices != "auto") {
      bool gpu = false;
      try {
        for (const NamedDevice& d : named_devices(ro.devices))
          gpu = gpu || (!d.workers && d.opencl_device.type == opencl::DeviceType::gpu);
      } catch (const InvalidArgument& e) {
        rethrow_as_cli(e, {{"devices", "--devices"}});
      }
      if (!gpu)
        throw InvalidArgument("--mode", "pipeline needs an OpenCL GPU; --devices '" + ro.devices + "' names none");
    }
  }
  // Every usable device: the CPU workers, plus the OpenCL GPUs when there are any (pipeline: the GPUs).
  std::string spec = ro.devices;
  if (spec.empty()) {  // an empty spec would make the session one kernel call, and the engine below its runner's
    throw InvalidArgument("--devices", "is empty: give auto, workers, an OpenCL spec (gpu:all, 0,1, cpu) or a+b");
  }
  // "auto" is the library's (the workers and every GPU), except in pipeline mode, which runs the GPUs only.
  if (spec == "auto" && ro.mode == "pipeline") {
    if (!opencl::has_gpu()) throw InvalidArgument("--mode", "pipeline needs an OpenCL GPU; none was found");
    spec = "gpu:all";
  }
  // One engine for every mode: the session's stream over `spec` (FlowGraphRunner::open_stream), which measures
  // once which devices take part: a GPU alone through pinned staging (transfers and compute overlapped), or
  // the graph over all. resident: the whole sequence as one piece.
  StreamConfig cfg;
  cfg.B = ro.batch;
  cfg.NH = ro.heads;
  cfg.DHQK = ro.dqk;
  cfg.DHHV = ro.dhv;
  cfg.options = o;
  cfg.devices = spec;
  cfg.balancing = graph::parse_balancing(ro.balancing, "--balancing");  // default: shares by measured device speed
  // A few random pieces, cycled (generating 1M tokens of fresh inputs would cost more than the mLSTM itself); the
  // carried state makes every piece's output different. They are made while the devices open (the session's
  // constructor waits 0.1-0.25 s on the OpenCL driver), so the first piece does not wait for them.
  constexpr std::size_t kDistinctPieces = 4;
  std::vector<ForwardInputs> pieces(kDistinctPieces);
  tbb::task_group making;
  making.run([&] {
    for (std::size_t p = 0; p < kDistinctPieces; ++p) {
      pieces[p] = synthetic_piece(ro.batch, ro.heads, std::min(ro.piece, ro.seq_len), ro.dqk, ro.dhv, dtype,
                                  1234567 + static_cast<std::uint64_t>(p));
    }
  });
  StreamSession session(cfg);
  making.wait();
  if (!as_json) {
    std::cout << "problem: B=" << ro.batch << " NH=" << ro.heads << " S=" << ro.seq_len << " DHQK=" << ro.dqk
              << " DHHV=" << ro.dhv << " " << dtype_name(dtype) << ", chunk "
              << (ro.chunk_size == kAutoChunk ? std::string("auto") : std::to_string(ro.chunk_size)) << ", mode "
              << (ro.mode == "auto" ? "stream" : ro.mode)
              << (ro.mode == "resident"
                      ? std::string(", resident: the whole sequence in one piece")
                      : ", streamed in pieces of " + std::to_string(piece_tokens) + " tokens carrying (C,n,m)")
              << (ro.backward ? ", forward+backward per piece (the backward sequence parallel through the graph)" : "")
              << "\n";
  }
  Progress progress(ro.seq_len, ro.progress || isatty(2));
  double max_rel = 0.0;
  SpotCheck check;  // the first check_tokens tokens of the sequence, gathered piece by piece
  check.tokens = check_tokens;
  if (check.tokens > 0) {
    check.inputs.q = Tensor({ro.batch, ro.heads, check.tokens, ro.dqk}, dtype);
    check.inputs.k = Tensor({ro.batch, ro.heads, check.tokens, ro.dqk}, dtype);
    check.inputs.v = Tensor({ro.batch, ro.heads, check.tokens, ro.dhv}, dtype);
    check.inputs.i = Tensor({ro.batch, ro.heads, check.tokens}, DType::f32);
    check.inputs.f = Tensor({ro.batch, ro.heads, check.tokens}, DType::f32);
  }
  double compute_secs = 0.0;
  const auto start = Clock::now();
  // resident: the whole sequence in memory (the same pieces, tiled), one pass through the graph.
  const bool resident = ro.mode == "resident";
  ForwardInputs full;
  if (resident) full = tile_pieces(pieces, ro.seq_len);
  const std::int64_t step = resident ? ro.seq_len : ro.piece;
  // Pieces in flight: each is submitted two pieces ahead of the one taken, but the first (backward: one at a time,
  // push).
  struct InFlight {
    std::uint64_t ticket;
    std::int64_t t0, len;
  };
  std::deque<InFlight> in_flight;
  double first_token_secs = -1.0;
  // The spot check (a float64 recurrence on the host) runs beside the stream once the last piece it covers is back.
  tbb::task_group checking;
  // A piece goes in: the inputs of its tokens the spot check covers.
  auto piece_submitted = [&](std::int64_t t0, const ForwardInputs& l) {
    if (t0 >= check.tokens) return;
    const std::int64_t n = std::min(l.q.dim(2), check.tokens - t0);
    copy_tokens(l.q, n, check.inputs.q, t0);
    copy_tokens(l.k, n, check.inputs.k, t0);
    copy_tokens(l.v, n, check.inputs.v, t0);
    copy_tokens(l.i, n, check.inputs.i, t0);
    copy_tokens(l.f, n, check.inputs.f, t0);
    ++check.pieces;
  };
  // A piece's h is back (pieces come back in order): the first-token time, its checked tokens' h, progress.
  auto piece_done = [&](std::int64_t t0, std::int64_t len, const Tensor& h) {
    if (first_token_secs < 0) first_token_secs = std::chrono::duration<double>(Clock::now() - process_start()).count();
    if (t0 < check.tokens) {
      if (check.h.empty()) check.h = Tensor({ro.batch, ro.heads, check.tokens, ro.dhv}, h.dtype());
      copy_tokens(h, std::min(len, check.tokens - t0), check.h, t0);
      if (t0 + len >= check.tokens) {
        checking.run([&max_rel, &check, options = session.config().options] { max_rel = spot_check(check, options); });
      }
    }
    progress.update(t0 + len);
  };
  auto take_oldest = [&] {
    InFlight f = std::move(in_flight.front());
    in_flight.pop_front();
    const auto c0 = Clock::now();
    Tensor h = session.take(f.ticket);
    compute_secs += std::chrono::duration<double>(Clock::now() - c0).count();
    piece_done(f.t0, f.len, h);
  };
  // The stream's plan, taken at the first piece (backward: the backward's graph plans after it, last_plan() then
  // holds that one).
  graph::Plan stream_plan;
  std::int64_t piece_index = 0;
  for (std::int64_t t0 = 0; t0 < ro.seq_len; t0 += step, ++piece_index) {
    const std::int64_t len = std::min(step, ro.seq_len - t0);
    const ForwardInputs& cycled = resident ? full : pieces[static_cast<std::size_t>(piece_index) % kDistinctPieces];
    ForwardInputs tail;
    if (len < cycled.q.dim(2)) tail = synthetic_piece(ro.batch, ro.heads, len, ro.dqk, ro.dhv, dtype, 7654321);
    const ForwardInputs& l = len < cycled.q.dim(2) ? tail : cycled;
    const ForwardArgs a = l.args();
    piece_submitted(t0, l);
    const auto c0 = Clock::now();
    if (ro.backward) {
      Tensor h = session.push(a);
      if (piece_index == 0) stream_plan = session.runner()->last_plan();  // before the backward's plan
      (void)session.backward_of_last_piece(a, h.view());                  // dh = h
      compute_secs += std::chrono::duration<double>(Clock::now() - c0).count();
      if (piece_index == 0 && !as_json) {
        std::cout << "engine: " << shown_plan(stream_plan, piece_tokens).describe() << "\n"
                  << "backward: " << shown_plan(session.runner()->last_plan(), piece_tokens).describe() << "\n";
      }
      piece_done(t0, len, h);
      continue;
    }
    in_flight.push_back({session.submit(a), t0, len});
    compute_secs += std::chrono::duration<double>(Clock::now() - c0).count();
    if (piece_index == 0) {  // the engine is chosen at the first piece
      stream_plan = session.runner()->last_plan();
      if (ro.mode == "pipeline" && !stream_plan.overlapped)
        throw InvalidArgument("--mode",
                              "pipeline needs a GPU whose tensor-core kernels take this problem "
                              "(bfloat16/float16, head dims multiples of 16, chunk 64 or 128); the stream "
                              "chose " +
                                  stream_plan.engine);
      if (!as_json) std::cout << "engine: " << shown_plan(stream_plan, piece_tokens).describe() << "\n";
    }
    // The first piece is taken at once (its h is the first token: it should not wait for the pieces after it to
    // be staged); later ones go three in flight.
    if (in_flight.size() > 2 || piece_index == 0) take_oldest();
  }
  while (!in_flight.empty()) take_oldest();
  checking.wait();
  const double secs = std::chrono::duration<double>(Clock::now() - start).count();
  const std::int64_t tokens = ro.batch * ro.seq_len;  // at most 2^50 (checked above)
  const double rate = static_cast<double>(tokens) / secs;
  const std::int64_t checked = check.tokens;
  const bool check_ok = max_rel < (dtype == DType::f32 ? 1e-4 : 2e-2);
  // The engine that ran the forward (the stream's), and with --backward the graph that ran each piece's backward.
  std::string engine = stream_plan.engine;
  std::vector<std::string> devices = stream_plan.devices;
  if (ro.backward) {
    const graph::Plan& back = session.runner()->last_plan();
    std::string over;
    for (const std::string& d : back.devices) {
      over += (over.empty() ? "" : ", ") + d;
      if (std::find(devices.begin(), devices.end(), d) == devices.end()) devices.push_back(d);
    }
    engine += "; each piece's backward sequence parallel through the graph over " + over;
  }
  if (as_json) {
    std::cout << json{{"command", "run"},
                      {"mode", ro.mode == "auto" ? "stream" : ro.mode},
                      {"engine", engine},
                      {"overlapped", stream_plan.overlapped},
                      {"first_token_seconds", first_token_secs},
                      {"tokens", tokens},
                      {"seconds", secs},
                      {"compute_seconds", compute_secs},
                      {"tokens_per_second", rate},
                      {"peak_rss_mib", peak_rss_mib()},
                      {"spot_check_tokens", checked},
                      {"spot_check_pieces", check.pieces},
                      {"spot_check_rel_error", checked > 0 ? json(max_rel) : json(nullptr)},
                      {"spot_check_ok", checked > 0 ? json(check_ok) : json(nullptr)},
                      {"devices", devices},
                      {"chunk_size", size_taken(stream_plan.chunk_size, piece_tokens)},
                      {"balancing", ro.balancing},
                      {"revision", git_revision()}}
                     .dump()
              << "\n";
  } else {
    std::printf("throughput: %.0f tokens/s (%lld tokens in %.2f s; kernels %.2f s)\n", rate,
                static_cast<long long>(tokens), secs, compute_secs);
    std::printf("peak memory: %.1f MiB\n", peak_rss_mib());
    if (checked > 0) {
      std::printf("spot check vs float64 reference (first %lld tokens, %lld piece%s): max rel error %.3g  %s\n",
                  static_cast<long long>(checked), static_cast<long long>(check.pieces), check.pieces == 1 ? "" : "s",
                  max_rel, check_ok ? "OK" : "FAILED");
    } else {
      std::printf("spot check: none (--check-tokens 0)\n");
    }
  }
  return check_ok ? 0 : 1;
}

}  // namespace mlstm::cli
