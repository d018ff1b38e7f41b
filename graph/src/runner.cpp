#include "mlstm/graph/runner.hpp"

#include <spdlog/spdlog.h>
#include <tbb/flow_graph.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>
#include <type_traits>

#include "graph_builder.hpp"
#include "mlstm/core/atomic_file.hpp"
#include "mlstm/core/env.hpp"
#include "mlstm/core/error.hpp"
#include "mlstm/core/trace.hpp"

namespace mlstm::graph {

std::string_view pass_name(Pass pass) noexcept {
  switch (pass) {
    case Pass::forward:
      return "forward";
    case Pass::backward:
      return "backward";
    case Pass::forward_head_split:
      return "forward head split";
    case Pass::backward_head_split:
      return "backward head split";
    case Pass::stream:
      return "stream";
  }
  return "?";
}

std::string_view balancing_name(Balancing balancing) noexcept {
  switch (balancing) {
    case Balancing::pull:
      return "pull";
    case Balancing::calibrated:
      return "calibrated";
    case Balancing::fastest:
      return "fastest";
  }
  return "?";
}

Balancing parse_balancing(std::string_view name, const std::string& argument) {
  for (const Balancing b : {Balancing::pull, Balancing::calibrated, Balancing::fastest})
    if (name == balancing_name(b)) return b;
  throw InvalidArgument(argument, "'" + std::string(name) + "': expected 'pull', 'calibrated' or 'fastest'");
}

std::string Plan::describe() const {
  std::ostringstream os;
  const bool head_split = pass == Pass::forward_head_split || pass == Pass::backward_head_split;
  if (pass == Pass::stream) {
    os << "plan: stream, pieces of " << S << " tokens, chunk=" << chunk_size << ", devices:";
    for (const auto& d : devices) os << " [" << d << "]";
    os << "\n  " << engine;
    for (const auto& m : measured) os << "\n  measured: " << m;
    return os.str();
  }
  os << "plan: " << pass_name(pass) << ", S=" << S << " chunk=" << chunk_size;
  if (!head_split) os << " segment=" << segment_tokens << " tokens, " << segments.size() << " segments";
  os << ", devices:";
  for (std::size_t d = 0; d < devices.size(); ++d) {
    os << " [" << devices[d];
    if (d < speeds.size()) os << " " << static_cast<long long>(speeds[d]) << " tokens/s";
    os << "]";
  }
  if (head_split) {
    const char* what = pass == Pass::forward_head_split ? "forward" : "backward";
    for (std::size_t d = 0; d < rows.size(); ++d)
      os << "\n  rows [" << rows[d].first << ", " << rows[d].second << "): " << what << " on " << devices[d];
    return os.str();
  }
  if (packed_sequences > 0) {
    os << "\n  packed: " << packed_sequences << " sequences, cut at their boundaries into segments of whole sequences";
    for (std::size_t j = 0; j < segments.size(); ++j) {
      const auto& s = segments[j];
      os << "\n  segment " << s.index << " [" << s.t0 << ", " << s.t1 << "): sequences [" << sequences[j].first << ", "
         << sequences[j].second << ") -> the first free device (pulled)";
    }
    os << "\n  each segment one packed " << (pass == Pass::backward ? "backward" : "forward")
       << " call; no local-state pass and no combine (the sequences are independent)";
    for (const std::int64_t j : spread_sequences)
      os << "\n  then sequence " << j << ", longer than two segments: sequence parallel over every device";
    return os.str();
  }
  const bool one = segments.size() == 1;
  for (const auto& s : segments) {
    os << "\n  segment " << s.index << " [" << s.t0 << ", " << s.t1 << ") -> ";
    if (s.device >= 0)
      os << devices[static_cast<std::size_t>(s.device)];
    else
      os << "the first free device (pulled); its later passes stay there";
  }
  if (pass == Pass::forward && one) {
    os << "\n  one segment: its outputs and the final state from the initial state; no local-state pass";
  } else if (pass == Pass::backward && one) {
    os << "\n  one segment: one backward call from the initial state";
  } else {
    const char* how = speeds.empty() ? "pulled by free devices" : "on the devices above";
    os << "\n  phase 1: local states of every segment from the EMPTY state, " << how
       << "\n  phase 2: in-order combine -> the state entering every segment";
    if (pass == Pass::forward) {
      os << "\n  phase 3: outputs of every segment from its entering state, on its local state's device";
    } else {
      os << "\n  phase 3: local state gradients of segments 1.., on their local state's device"
         << "\n  phase 4: reverse combine -> the gradient leaving every segment"
         << "\n  phase 5: gradients of every segment, on its local state's device";
    }
  }
  for (const auto& m : measured) os << "\n  measured: " << m;
  return os.str();
}

namespace {

// A plan's devices, length and chunk, and its segment length: `segment_tokens`, or when 0 the whole sequence for one
// device (splitting would only add the local-state pass) and about 4 segments per device for several; a segment
// longer than the sequence is the sequence (and rounding or doubling a huge request would overflow).
Plan plan_start(const ProblemShape& shape, const MlstmOptions& options, const std::vector<std::string>& devices,
                std::int64_t segment_tokens) {
  if (devices.empty()) throw InvalidArgument("devices", "the plan needs at least one device");
  if (segment_tokens < 0) throw InvalidArgument("segment_tokens", "must be >= 0");
  Plan p;
  p.devices = devices;
  p.S = shape.S;
  p.chunk_size = options.chunk_size;
  if (segment_tokens == 0) {
    const std::int64_t want = devices.size() == 1 ? 1 : static_cast<std::int64_t>(devices.size()) * 4;
    segment_tokens = (shape.S + want - 1) / want;
  }
  p.segment_tokens = std::clamp<std::int64_t>(segment_tokens, 1, std::max<std::int64_t>(1, shape.S));
  return p;
}

}  // namespace

Plan make_plan(const ProblemShape& shape, const MlstmOptions& options, const std::vector<std::string>& devices,
               std::int64_t segment_tokens) {
  Plan p = plan_start(shape, options, devices, segment_tokens);
  const std::int64_t L = chunk_of(options);
  p.segment_tokens = std::max<std::int64_t>(L, (p.segment_tokens + L - 1) / L * L);  // whole chunks
  int index = 0;
  for (std::int64_t t0 = 0; t0 < shape.S; t0 += p.segment_tokens) {
    p.segments.push_back({index++, t0, std::min(shape.S, t0 + p.segment_tokens)});
  }
  return p;
}

Plan make_packed_plan(const ProblemShape& shape, const MlstmOptions& options, const std::vector<std::string>& devices,
                      std::span<const std::int64_t> offsets, std::int64_t segment_tokens) {
  Plan p = plan_start(shape, options, devices, segment_tokens);
  p.packed_sequences = static_cast<std::int64_t>(offsets.size()) - 1;
  // With several devices, a sequence longer than two segments is cut across all of them (sequence parallel: local
  // states, the combine, outputs), so one long sequence among short ones does not leave the other devices idle.
  const bool spread = devices.size() > 1;
  auto length = [&](std::size_t j) { return offsets[j + 1] - offsets[j]; };
  auto spread_out = [&](std::size_t j) { return spread && length(j) > 2 * p.segment_tokens; };
  // The others: runs of whole sequences, at least one per segment, until a segment holds segment_tokens.
  int index = 0;
  std::size_t j0 = 0;
  while (j0 + 1 < offsets.size()) {
    if (spread_out(j0)) {
      p.spread_sequences.push_back(static_cast<std::int64_t>(j0++));
      continue;
    }
    std::size_t j1 = j0 + 1;
    while (j1 + 1 < offsets.size() && !spread_out(j1) && offsets[j1] - offsets[j0] < p.segment_tokens) ++j1;
    p.segments.push_back({index++, offsets[j0], offsets[j1], -1});
    p.sequences.push_back({static_cast<std::int64_t>(j0), static_cast<std::int64_t>(j1)});
    j0 = j1;
  }
  return p;
}

Plan make_calibrated_plan(const ProblemShape& shape, const MlstmOptions& options,
                          const std::vector<std::string>& devices, const std::vector<double>& speeds,
                          std::int64_t segment_tokens) {
  if (devices.empty() || speeds.size() != devices.size()) {
    throw InvalidArgument("speeds", "one speed per device expected");
  }
  const std::int64_t L = chunk_of(options);
  const std::int64_t chunks = (shape.S + L - 1) / L;
  // Chunks per device proportional to speed; a device whose share is under one chunk gets none.
  std::vector<double> w = speeds;
  double total = 0;
  for (auto x : w) total += std::max(x, 0.0);
  if (!(total > 0)) throw InvalidArgument("speeds", "no device has a positive speed");
  std::vector<std::int64_t> share(w.size(), 0);
  for (bool changed = true; changed;) {
    changed = false;
    total = 0;
    for (auto x : w) total += x;
    for (std::size_t d = 0; d < w.size(); ++d) {
      share[d] = w[d] > 0 ? static_cast<std::int64_t>(static_cast<double>(chunks) * w[d] / total) : 0;
      if (w[d] > 0 && share[d] < 1 && w[d] / total * static_cast<double>(chunks) < 0.5) {
        w[d] = 0;  // too slow to get a chunk: left out
        changed = true;
      }
    }
  }
  std::int64_t given = 0;
  for (auto c : share) given += c;
  const auto fastest = static_cast<std::size_t>(std::max_element(w.begin(), w.end()) - w.begin());
  share[fastest] += chunks - given;  // rounding leftovers to the fastest
  Plan p;
  p.devices = devices;
  p.speeds = speeds;
  p.S = shape.S;
  p.chunk_size = L;
  int index = 0;
  std::int64_t t = 0;
  for (std::size_t d = 0; d < share.size(); ++d) {
    if (share[d] <= 0) continue;
    const std::int64_t end = std::min(shape.S, t + share[d] * L);
    const auto sharing = std::count_if(share.begin(), share.end(), [](std::int64_t c) { return c > 0; });
    const std::int64_t seg = segment_tokens > 0
                                 ? (std::min(segment_tokens, std::max<std::int64_t>(1, shape.S)) + L - 1) / L * L
                             : sharing == 1 ? std::max<std::int64_t>(L, end - t)  // one device: one segment
                                            : std::max<std::int64_t>(L, ((end - t) / 2 + L - 1) / L * L);
    p.segment_tokens = std::max(p.segment_tokens, seg);
    for (std::int64_t t0 = t; t0 < end; t0 += seg)
      p.segments.push_back({index++, t0, std::min(end, t0 + seg), static_cast<int>(d)});
    t = end;
  }
  return p;
}

FlowGraphRunner::FlowGraphRunner(std::vector<std::shared_ptr<ComputeDevice>> devices) : devices_(std::move(devices)) {
  if (devices_.empty()) throw InvalidArgument("devices", "the flow graph needs at least one device");
}

FlowGraphRunner::FlowGraphRunner(const std::string& device_spec) : FlowGraphRunner(devices_from_spec(device_spec)) {}

Tensor FlowGraphRunner::host_tensor(Shape shape, DType dtype) const {
  for (const auto& d : devices_) {
    Tensor t = d->host_tensor(shape, dtype);
    if (!t.empty()) return t;
  }
  return Tensor(std::move(shape), dtype);
}

MlstmOptions FlowGraphRunner::with_chunk(const MlstmOptions& options, const ProblemShape& shape) const {
  return mlstm::with_chunk(options, devices_, shape);
}

Plan FlowGraphRunner::plan(const ProblemShape& shape, const MlstmOptions& options, std::int64_t segment_tokens,
                           Pass pass) const {
  if (shape.packed()) {
    throw InvalidArgument("cu_seqlens",
                          "a packed problem's segments follow its offsets: make_packed_plan() plans "
                          "them, last_plan() shows the plan of a run");
  }
  return plan_run(pass, shape, with_chunk(options, shape), segment_tokens).plan;
}

namespace {

std::filesystem::path calibration_file() {
  const auto xdg = env::get("XDG_CACHE_HOME");
  std::filesystem::path dir =
      xdg ? std::filesystem::path(*xdg) : std::filesystem::path(env::get("HOME").value_or("/tmp")) / ".cache";
  return dir / "mlstm-flow" / "calibration.json";
}

}  // namespace

std::vector<double> FlowGraphRunner::calibrate(const ProblemShape& shape, const MlstmOptions& options) {
  return calibrate(devices_, shape, with_chunk(options, shape));
}

namespace {

// The calibration cache (calibration_file()), a JSON object; a missing or damaged file reads as empty (it is
// remeasured), and a failed write is logged (a cache: remeasured next time). Callers hold calibration_mutex().
std::mutex& calibration_mutex() {
  static std::mutex mutex;
  return mutex;
}

nlohmann::json read_calibration() {
  nlohmann::json cache = nlohmann::json::object();
  if (std::ifstream in(calibration_file()); in) {
    try {
      in >> cache;
    } catch (const std::exception&) {
      cache = nlohmann::json::object();
    }
  }
  return cache.is_object() ? cache : nlohmann::json::object();
}

void write_calibration(const nlohmann::json& cache) {
  const auto path = calibration_file();
  std::error_code ec;
  std::filesystem::create_directories(path.parent_path(), ec);
  try {
    write_file_atomically(path.string(), cache.dump(2));  // concurrent runs each rename a whole file
  } catch (const Error& e) {
    spdlog::warn("mlstm-flow: calibration cache not saved: {}", e.what());
  }
}

// A tokens/s rate read back from the cache, trusted only when it could have been measured: a number, finite,
// positive and under kMostTokensPerSecond (no device streams a quadrillion tokens a second). An entry that fails
// (negated, zeroed, overflowed by hand or by a damaged disk) is treated as absent: measured again and rewritten.
constexpr double kMostTokensPerSecond = 1e15;

bool plausible_rate(const nlohmann::json& value) {
  if (!value.is_number()) return false;
  const double rate = value.get<double>();
  return std::isfinite(rate) && rate > 0 && rate < kMostTokensPerSecond;
}

// Inputs of a calibration run: (B, NH, S) with q = k = 0.1, v = 0.2, i = 0, f = 3.
ForwardInputs calibration_inputs(const ProblemShape& shape, std::int64_t B, std::int64_t NH, std::int64_t S) {
  ForwardInputs in;
  in.q = Tensor::full({B, NH, S, shape.DHQK}, shape.dtype, 0.1);
  in.k = in.q;
  in.v = Tensor::full({B, NH, S, shape.DHHV}, shape.dtype, 0.2);
  in.i = Tensor::full({B, NH, S}, DType::f32, 0.0);
  in.f = Tensor::full({B, NH, S}, DType::f32, 3.0);
  return in;
}

std::string problem_key(const ProblemShape& shape, const MlstmOptions& options) {
  return std::to_string(shape.DHQK) + "x" + std::to_string(shape.DHHV) + "|" + std::string(dtype_name(shape.dtype)) +
         "|L" + std::to_string(options.chunk_size) + "|" + std::string(gate_name(options.gate));
}

}  // namespace

std::vector<double> FlowGraphRunner::calibrate(const std::vector<std::shared_ptr<ComputeDevice>>& devices,
                                               const ProblemShape& shape, const MlstmOptions& options) {
  std::lock_guard lock(calibration_mutex());
  nlohmann::json cache = read_calibration();
  const std::int64_t rows = std::min<std::int64_t>(shape.rows(), 4);
  const std::int64_t S =
      4 * std::min(options.chunk_size, std::max<std::int64_t>(shape.S, 1));  // not more than the data
  std::vector<double> speeds;
  bool dirty = false;
  for (const auto& d : devices) {
    const std::string key = d->name() + "|" + problem_key(shape, options);
    if (cache.contains(key)) {
      if (plausible_rate(cache[key])) {
        speeds.push_back(cache[key].get<double>());
        continue;
      }
      spdlog::info("mlstm-flow: calibration cache entry {} is damaged ({}): measured again", key, cache[key].dump());
    }
    const ForwardInputs in = calibration_inputs(shape, 1, rows, S);
    const ForwardArgs a = in.args();
    d->forward(a, options);  // warm-up: program builds, first touch
    double best = 1e30;
    for (int rep = 0; rep < 2; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      d->forward(a, options);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    const double speed = static_cast<double>(S) / std::max(best, 1e-9);
    spdlog::info("mlstm-flow: calibration {} -> {:.0f} tokens/s", key, speed);
    cache[key] = speed;
    speeds.push_back(speed);
    dirty = true;
  }
  if (dirty) write_calibration(cache);
  return speeds;
}

namespace {

// The forward graph per piece: each piece one FlowGraphRunner::forward from the carried state (sequence
// parallel over `devices`), synchronous.
std::unique_ptr<SequenceStream> graph_stream(std::vector<std::shared_ptr<ComputeDevice>> devices, Balancing balancing,
                                             const ProblemShape& shape, const MlstmOptions& options, State initial) {
  auto runner = std::make_shared<FlowGraphRunner>(std::move(devices));
  runner->set_balancing(balancing);
  return std::make_unique<ForwardCallStream>(
      [runner](const ForwardArgs& a, const MlstmOptions& o) { return runner->forward(a, o); }, shape, options,
      std::move(initial));
}

// Tokens/s of a stream over `pieces` copies of `piece` after one warm-up piece, two pieces in flight.
double measure_stream(SequenceStream& stream, const ForwardArgs& piece, int pieces) {
  (void)stream.take(stream.submit(piece));
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::uint64_t> tickets;
  std::size_t taken = 0;
  for (int p = 0; p < pieces; ++p) {
    tickets.push_back(stream.submit(piece));
    if (tickets.size() - taken > 2) (void)stream.take(tickets[taken++]);
  }
  while (taken < tickets.size()) (void)stream.take(tickets[taken++]);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return static_cast<double>(pieces) * static_cast<double>(piece.q.dim(2)) / std::max(secs, 1e-9);
}

std::string rate_text(double tokens_per_second) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.0f tokens/s", tokens_per_second);
  return buf;
}

// The stream measurement behind open_stream and Balancing::fastest: tokens/s of each device streaming alone and
// (several devices) of the forward graph over all of them per piece, measured once on pieces like `piece` and
// cached with the calibration. Returns the index of the fastest candidate (devices.size() = the graph) and
// appends one line per candidate to `measured`.
std::size_t fastest_candidate(const std::vector<std::shared_ptr<ComputeDevice>>& devices, Balancing graph_balancing,
                              const ProblemShape& piece, const MlstmOptions& options,
                              std::vector<std::string>& measured) {
  if (devices.size() <= 1) return 0;
  std::string key = "stream|";
  for (const auto& d : devices) key += d->name() + "+";
  key += "|" + problem_key(piece, options) + "|rows" + std::to_string(piece.rows()) + "|S" + std::to_string(piece.S);
  std::vector<double> rates(devices.size() + 1, 0.0);
  nlohmann::json entry;
  {
    std::lock_guard lock(calibration_mutex());
    nlohmann::json cache = read_calibration();
    if (cache.contains(key)) entry = cache[key];
  }
  const bool trusted =
      entry.is_array() && entry.size() == rates.size() &&
      std::all_of(entry.begin(), entry.end(), [](const nlohmann::json& r) { return plausible_rate(r); });
  if (!entry.is_null() && !trusted)
    spdlog::info("mlstm-flow: calibration cache entry {} is damaged ({}): measured again", key, entry.dump());
  if (trusted) {
    for (std::size_t c = 0; c < rates.size(); ++c) rates[c] = entry[c].get<double>();
  } else {  // measured without the lock: the graph's run may calibrate its shares (which takes it)
    const ForwardInputs in = calibration_inputs(piece, piece.B, piece.NH, piece.S);
    const ForwardArgs full = in.args();
    for (std::size_t c = 0; c < rates.size(); ++c) {
      const bool graph = c == devices.size();
      std::unique_ptr<SequenceStream> s = graph ? graph_stream(devices, graph_balancing, piece, options, State{})
                                                : devices[c]->open_stream(piece, options);
      // A stream of one forward() call per piece runs at about the same rate on shorter pieces: measure
      // those on at most 8 chunks (a CPU worker would take seconds on a long piece).
      const std::int64_t len = graph || s->overlapped() ? piece.S : std::min(piece.S, 8 * options.chunk_size);
      rates[c] = measure_stream(*s, sequence_slice(full, 0, len), 3);
    }
    std::lock_guard lock(calibration_mutex());
    nlohmann::json cache = read_calibration();
    cache[key] = rates;
    write_calibration(cache);
  }
  for (std::size_t c = 0; c < rates.size(); ++c)
    measured.push_back((c == devices.size() ? std::string("the graph over all") : devices[c]->name()) + ": " +
                       rate_text(rates[c]));
  return static_cast<std::size_t>(std::max_element(rates.begin(), rates.end()) - rates.begin());
}

}  // namespace

std::unique_ptr<SequenceStream> FlowGraphRunner::open_stream(const ProblemShape& piece, const MlstmOptions& given,
                                                             State initial) {
  const MlstmOptions options = with_chunk(given, piece);
  const ScopedTrace trace("stream engine chosen");
  refuse_exchange("a stream (open_stream)");
  if (piece.S <= 0)
    throw InvalidArgument(
        "q", "a stream's piece needs at least one token; the piece's q has S = " + std::to_string(piece.S));
  std::vector<std::string> left_out;
  const auto devices = capable_devices({DeviceStage::last_state, DeviceStage::forward}, piece, options, left_out);
  Plan plan;
  plan.pass = Pass::stream;
  plan.S = piece.S;
  plan.chunk_size = options.chunk_size;
  const Balancing graph_balancing = balancing_ == Balancing::fastest ? Balancing::pull : balancing_;
  const std::size_t best = fastest_candidate(devices, graph_balancing, piece, options, plan.measured);
  std::unique_ptr<SequenceStream> stream;
  if (best == devices.size()) {
    for (const auto& d : devices) plan.devices.push_back(d->name());
    plan.engine = "every piece sequence parallel through the forward graph over these devices";
    stream = graph_stream(devices, graph_balancing, piece, options, std::move(initial));
  } else {
    const auto& d = devices[best];
    plan.devices.push_back(d->name());
    for (std::size_t c = 0; c < devices.size(); ++c)
      if (c != best) left_out.push_back(devices[c]->name() + " (stream: " + d->name() + " alone is faster)");
    stream = d->open_stream(piece, options, std::move(initial));
    plan.overlapped = stream->overlapped();
    plan.engine = plan.overlapped ? "pinned staging on " + d->name() +
                                        ": uploads, kernels and downloads of consecutive pieces overlapped, the "
                                        "state on the device"
                                  : "one forward() call per piece on " + d->name() + ", the state carried";
  }
  plan.left_out = std::move(left_out);
  last_plan_ = plan;
  if (env::flag("MLSTM_PLAN_DEBUG")) spdlog::warn("{}", plan.describe());
  return stream;
}

namespace {

// One residency scope per device for the run's inputs (ComputeDevice::keep_inputs_resident).
std::vector<std::unique_ptr<ComputeDevice::InputResidency>> keep_inputs_resident(
    const std::vector<std::shared_ptr<ComputeDevice>>& devices, const std::vector<ConstTensorView>& inputs) {
  std::vector<std::unique_ptr<ComputeDevice::InputResidency>> out;
  for (const auto& d : devices) out.push_back(d->keep_inputs_resident(inputs));
  return out;
}

// Test hook: MLSTM_FAULT_INJECT_ORDER=entries makes the state recurrence's entries leave in swapped pairs
// (1, 0, 3, 2, ...), the order oneTBB is free to give them (see EnteringStateStage).
bool entries_reordered() { return env::one_of("MLSTM_FAULT_INJECT_ORDER", {"entries"}).has_value(); }

// The device a segment's message goes to: the plan's, or the one that computed its local state (set by the
// state recurrence). Every segment has one by then; -1 is left only by a custom graph without a pool.
std::size_t device_of(const nodes::Segment& s) {
  return s.device < 0 ? std::size_t{0} : static_cast<std::size_t>(s.device);
}

// Passes on the messages whose segment belongs to device `device` (one such node per device behind a
// stage, so routing is made of edges the graph description records, not of puts into other nodes).
template <class Msg>
using RouteNode = tbb::flow::multifunction_node<Msg, std::tuple<Msg>>;
template <class Msg>
struct RouteBody {
  std::size_t device;
  void operator()(const Msg& m, typename RouteNode<Msg>::output_ports_type& out) const {
    if (device_of(m.segment) == device) std::get<0>(out).try_put(m);
  }
};

// The segments a device's nodes get, for node names: "segments 0-3, 7", "pulled segments" (pull).
std::string share_of(const Plan& p, std::size_t d) {
  std::vector<int> mine;
  for (const auto& s : p.segments) {
    if (s.device < 0) return p.segments.size() == 1 ? "segment 0" : "pulled segments";
    if (static_cast<std::size_t>(s.device) == d) mine.push_back(s.index);
  }
  if (mine.empty()) return "no segments";
  std::string out = mine.size() == 1 ? "segment " : "segments ";
  for (std::size_t i = 0; i < mine.size();) {
    std::size_t j = i;
    while (j + 1 < mine.size() && mine[j + 1] == mine[j] + 1) ++j;
    if (i > 0) out += ", ";
    out += std::to_string(mine[i]);
    if (j > i) {
      out += '-';
      out += std::to_string(mine[j]);
    }
    i = j + 1;
  }
  return out;
}

// The threads async_node gateways hand a StateExchange's calls to (exchange.hpp): a call may block (MPI), so it
// never runs on a TBB worker. start() holds the graph open (reserve_wait) until the call's result is put into its
// gateway; a call that throws puts nothing, and finish() (after wait_for_all) joins every call and rethrows the
// first error. One thread per call, kept under the mutex: a call's result can drive the graph on to the next
// gateway's start() on another worker before the first start() has returned (the backward's two exchanges), so
// no start() may touch another call's thread (assigning over a joinable std::thread terminates the process).
class ExchangeThread {
 public:
  ExchangeThread() = default;
  ExchangeThread(const ExchangeThread&) = delete;
  ExchangeThread& operator=(const ExchangeThread&) = delete;
  ~ExchangeThread() { join_all(); }
  template <class Gateway, class Call>
  void start(Gateway& gateway, Call call) {
    gateway.reserve_wait();
    const std::lock_guard lock(mutex_);
    threads_.emplace_back([this, &gateway, call = std::move(call)]() mutable {
      try {
        gateway.try_put(call());
      } catch (...) {
        const std::lock_guard error_lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
      gateway.release_wait();
    });
  }
  // Joins every call; rethrows the first error of any.
  void finish() {
    join_all();
    const std::lock_guard lock(mutex_);
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void join_all() {
    std::vector<std::thread> threads;
    {
      const std::lock_guard lock(mutex_);
      threads.swap(threads_);
    }
    for (auto& t : threads) t.join();
  }
  std::mutex mutex_;
  std::vector<std::thread> threads_;
  std::exception_ptr error_;
};

// Phases 1 and 2 of the sequence-parallel forward, shared by forward() and backward(): per device a
// local-state node fed from a segment queue (one queue per device when calibrated, else one shared queue),
// then the in-order sequencer and the serial state recurrence, whose entries (every segment's entering state)
// leave through a second sequencer in segment order. That second sequencer is needed: a serial
// function_node runs its bodies in input order, but oneTBB spawns the next body before it passes the current
// output on (function_input::apply_body_impl_bypass), so entry s+1 can reach a successor before entry s.
// The backward records the entries and reads segment s-1's entry once segment s's gradient is done; with
// entries out of order it read one not yet recorded (a wrong segment, 1 in some hundred runs under load).
// The last entry is marked is_last and carries the final state (SegmentEntry::leaving).
class EnteringStateStage {
 public:
  using Devices = std::vector<std::shared_ptr<ComputeDevice>>;
  using Entries = tbb::flow::broadcast_node<nodes::SegmentEntry>;
  // `exchange` (optional): the problem is one shard of a longer sequence (exchange.hpp); the recurrence starts from
  // the state the exchange returns for the shard's summary, through an async_node gateway run by `thread`.
  EnteringStateStage(GraphBuilder& b, const Plan& plan, bool pulled,
                     const std::shared_ptr<nodes::SegmentProblem>& problem,
                     const std::shared_ptr<std::vector<nodes::Segment>>& segments, const Devices& devices,
                     const std::shared_ptr<nodes::DevicePool>& pool,
                     const std::shared_ptr<StateExchange>& exchange = nullptr, ExchangeThread* thread = nullptr)
      : running_(std::make_shared<nodes::SegmentEntry>(problem->initial_entry())),
        in_order_(b.add<tbb::flow::sequencer_node<nodes::SegmentSummary>>(
            "local states in segment order",
            [](const nodes::SegmentSummary& s) { return static_cast<std::size_t>(s.index); })),
        recurrence_(b.add<Recurrence>("combine (state recurrence)", tbb::flow::serial,
                                      nodes::StateRecurrenceBody{problem, segments, running_})),
        entries_in_order_(b.add<tbb::flow::sequencer_node<nodes::SegmentEntry>>(
            "entering states in segment order",
            [](const nodes::SegmentEntry& e) { return static_cast<std::size_t>(e.index); })),
        entries_(b.add<Entries>("entering states to every consumer")) {
    if (pulled) {
      queues_.push_back(&b.add<tbb::flow::queue_node<nodes::Segment>>("segments (pulled by the first free device)"));
    } else {
      for (std::size_t d = 0; d < devices.size(); ++d)
        queues_.push_back(&b.add<tbb::flow::queue_node<nodes::Segment>>("segments for " + devices[d]->name() + " (" +
                                                                        share_of(plan, d) + ")"));
    }
    for (std::size_t d = 0; d < devices.size(); ++d) {
      auto& local = b.add<LocalNode>("local_state on " + devices[d]->name() + " (" + share_of(plan, d) + ")",
                                     tbb::flow::serial, nodes::LocalStateBody{problem, devices[d], pool, d});
      b.edge(*queues_[pulled ? 0 : d], local);
      b.edge(local, in_order_);
    }
    if (exchange) {
      connect_exchange(b, problem, segments->size(), exchange, *thread);
    } else {
      b.edge(in_order_, recurrence_);
    }
    if (entries_reordered()) {
      auto& swap = b.add<SwapPairs>("swap entry pairs (MLSTM_FAULT_INJECT_ORDER=entries)", tbb::flow::serial,
                                    SwapPairsBody{segments->size()});
      b.edge(recurrence_, swap);
      b.edge(swap, tbb::flow::output_port<0>(swap), entries_in_order_);
    } else {
      b.edge(recurrence_, entries_in_order_);
    }
    // A sequencer hands each message to ONE successor; the entries go to several (routes, final state).
    b.edge(entries_in_order_, entries_);
  }
  // Every segment's entering state, in segment order.
  Entries& entries() { return entries_; }
  void put(const nodes::Segment& s) { queues_[queues_.size() == 1 ? 0 : device_of(s)]->try_put(s); }

 private:
  using LocalNode = tbb::flow::function_node<nodes::Segment, nodes::SegmentSummary, tbb::flow::rejecting>;
  using Recurrence = tbb::flow::function_node<nodes::SegmentSummary, nodes::SegmentEntry>;
  using SwapPairs = tbb::flow::multifunction_node<nodes::SegmentEntry, std::tuple<nodes::SegmentEntry>>;
  // MLSTM_FAULT_INJECT_ORDER=entries: holds entries until both of a pair (2j, 2j+1) are in, then passes on
  // 2j+1 before 2j (an odd count's last entry alone).
  struct SwapPairsBody {
    std::size_t count;
    std::shared_ptr<std::map<int, nodes::SegmentEntry>> held = std::make_shared<std::map<int, nodes::SegmentEntry>>();
    void operator()(const nodes::SegmentEntry& e, SwapPairs::output_ports_type& out) const {
      (*held)[e.index] = e;
      const int first = e.index / 2 * 2;
      if (held->count(first) && held->count(first + 1)) {
        std::get<0>(out).try_put((*held)[first + 1]);
        std::get<0>(out).try_put((*held)[first]);
        held->erase(first);
        held->erase(first + 1);
      } else if (static_cast<std::size_t>(first) + 1 == count && held->count(first)) {
        std::get<0>(out).try_put((*held)[first]);
        held->erase(first);
      }
    }
  };
  using Fold = tbb::flow::multifunction_node<nodes::SegmentSummary, std::tuple<ShardSummary>>;
  using Gateway = tbb::flow::async_node<ShardSummary, StateHandle>;
  using Release = tbb::flow::multifunction_node<StateHandle, std::tuple<nodes::SegmentSummary>>;
  // in order: fold the local states into the shard's summary (from EMPTY) -> gateway (the exchange) -> set the
  // recurrence's running state to the returned one and hand it the kept summaries, in order again.
  void connect_exchange(GraphBuilder& b, const std::shared_ptr<nodes::SegmentProblem>& problem, std::size_t count,
                        const std::shared_ptr<StateExchange>& exchange, ExchangeThread& thread) {
    struct Kept {
      std::vector<nodes::SegmentSummary> summaries;
      StateHandle folded;
      Tensor G;
    };
    auto kept = std::make_shared<Kept>();
    auto& fold =
        b.add<Fold>("fold local states into the shard's summary", tbb::flow::serial,
                    [problem, kept, count](const nodes::SegmentSummary& s, Fold::output_ports_type& out) {
                      if (!kept->folded) {
                        kept->folded = problem->empty_entry().state;
                        kept->G = Tensor::zeros({problem->shape().B, problem->shape().NH}, DType::f32);
                      }
                      kept->folded = nodes::combine(*problem, *kept->folded, s);
                      for (std::int64_t r = 0; r < problem->shape().rows(); ++r)
                        kept->G.data<float>()[r] += s.G.data<float>()[r];
                      kept->summaries.push_back(s);
                      if (kept->summaries.size() == count)
                        std::get<0>(out).try_put(ShardSummary{problem->initial_entry().state, kept->folded, kept->G});
                    });
    auto& gateway = b.add<Gateway>(
        "state exchange (gateway)", tbb::flow::serial,
        [exchange, &thread](const ShardSummary& s, Gateway::gateway_type& gw) {
          thread.start(gw, [exchange, s] { return std::make_shared<const State>(exchange->entering_state(s)); });
        });
    auto running = running_;
    auto& release = b.add<Release>("shard entering state to the recurrence", tbb::flow::serial,
                                   [kept, running](const StateHandle& entering, Release::output_ports_type& out) {
                                     running->state = entering;
                                     for (const auto& s : kept->summaries) std::get<0>(out).try_put(s);
                                   });
    auto& again = b.add<tbb::flow::sequencer_node<nodes::SegmentSummary>>(
        "local states in segment order (after the exchange)",
        [](const nodes::SegmentSummary& s) { return static_cast<std::size_t>(s.index); });
    b.edge(in_order_, fold);
    b.edge(fold, tbb::flow::output_port<0>(fold), gateway);
    b.edge(gateway, release);
    b.edge(release, tbb::flow::output_port<0>(release), again);
    b.edge(again, recurrence_);
  }
  std::shared_ptr<nodes::SegmentEntry> running_;
  std::vector<tbb::flow::queue_node<nodes::Segment>*> queues_;
  tbb::flow::sequencer_node<nodes::SegmentSummary>& in_order_;
  Recurrence& recurrence_;
  tbb::flow::sequencer_node<nodes::SegmentEntry>& entries_in_order_;
  Entries& entries_;
};

// The graph's way out for the final state: filters a stage's messages down to the final state.
using FinalStateNode = tbb::flow::overwrite_node<StateHandle>;
template <class Msg>
using FinalStateFilter = tbb::flow::multifunction_node<Msg, std::tuple<StateHandle>>;
template <class Msg>
struct FinalStateFilterBody {
  void operator()(const Msg& m, typename FinalStateFilter<Msg>::output_ports_type& out) const {
    if constexpr (std::is_same_v<Msg, nodes::SegmentEntry>) {
      if (m.is_last) std::get<0>(out).try_put(m.leaving);
    } else {
      if (m.leaving) std::get<0>(out).try_put(m.leaving);
    }
  }
};

// A shard's backward (exchange.hpp): the local state gradients, last segment first, fold into the shard's
// gradient summary (from a zero gradient leaving it: running = decay * running + local); the gateway hands it to
// the exchange; the release starts the reverse recurrence from the gradient the exchange returns (port 0: the
// last segment's backward entry; port 1: the kept local gradients of segments last .. 1, in that order, through
// a sequencer to the recurrence). Returns the release node (its port 0 goes to the backward routes).
using GradientRelease =
    tbb::flow::multifunction_node<std::pair<Tensor, Tensor>,
                                  std::tuple<nodes::SegmentGradientEntry, nodes::SegmentStateGradient>>;
GradientRelease& connect_gradient_exchange(
    GraphBuilder& b, const std::shared_ptr<nodes::SegmentGradientProblem>& problem,
    tbb::flow::sequencer_node<nodes::SegmentStateGradient>& reverse_order,
    tbb::flow::function_node<nodes::SegmentStateGradient, nodes::SegmentGradientEntry>& recurrence,
    const std::shared_ptr<nodes::SegmentGradientEntry>& running, const std::shared_ptr<StateExchange>& exchange,
    ExchangeThread& thread) {
  using Fold = tbb::flow::multifunction_node<nodes::SegmentStateGradient, std::tuple<ShardGradientSummary>>;
  using Gateway = tbb::flow::async_node<ShardGradientSummary, std::pair<Tensor, Tensor>>;
  struct Kept {
    std::vector<nodes::SegmentStateGradient> locals;  // last segment first
    Tensor dC, dn, decay;
  };
  auto kept = std::make_shared<Kept>();
  const std::size_t count = problem->segments().size();
  auto& fold =
      b.add<Fold>("fold local state gradients into the shard's summary", tbb::flow::serial,
                  [problem, kept](const nodes::SegmentStateGradient& local, Fold::output_ports_type& out) {
                    const auto& p = problem->shape();
                    if (kept->dC.empty()) {
                      kept->dC = Tensor::zeros({p.B, p.NH, p.DHQK, p.DHHV}, DType::f32);
                      kept->dn = Tensor::zeros({p.B, p.NH, p.DHQK}, DType::f32);
                      kept->decay = Tensor::full({p.B, p.NH}, DType::f32, 1.0);
                    }
                    const Tensor d = problem->decay(local.index);
                    nodes::decay_and_add(kept->dC, kept->dn, d, local.dC, local.dn);
                    for (std::int64_t r = 0; r < p.rows(); ++r) kept->decay.data<float>()[r] *= d.data<float>()[r];
                    kept->locals.push_back(local);
                    if (local.index == 0) {
                      const nodes::SegmentGradientEntry last = problem->last_entry();
                      std::get<0>(out).try_put(ShardGradientSummary{kept->dC, kept->dn, kept->decay, last.dC, last.dn});
                    }
                  });
  auto& gateway = b.add<Gateway>("state-gradient exchange (gateway)", tbb::flow::serial,
                                 [exchange, &thread](const ShardGradientSummary& s, Gateway::gateway_type& gw) {
                                   thread.start(gw, [exchange, s] { return exchange->leaving_gradient(s); });
                                 });
  auto& release = b.add<GradientRelease>(
      "shard leaving gradient to the reverse recurrence", tbb::flow::serial,
      [problem, kept, running](const std::pair<Tensor, Tensor>& leaving, GradientRelease::output_ports_type& out) {
        *running = problem->last_entry();
        running->dC = leaving.first;
        running->dn = leaving.second;
        std::get<0>(out).try_put(*running);
        for (const auto& local : kept->locals)
          if (local.index >= 1) std::get<1>(out).try_put(local);
      });
  const std::size_t nseg = count;
  auto& again = b.add<tbb::flow::sequencer_node<nodes::SegmentStateGradient>>(
      "local state gradients, last segment first (after the exchange)",
      [nseg](const nodes::SegmentStateGradient& s) { return nseg - 1 - static_cast<std::size_t>(s.index); });
  b.edge(reverse_order, fold);
  b.edge(fold, tbb::flow::output_port<0>(fold), gateway);
  b.edge(gateway, release);
  b.edge(release, tbb::flow::output_port<1>(release), again);
  b.edge(again, recurrence);
  return release;
}

}  // namespace

void FlowGraphRunner::refuse_exchange(const std::string& what) const {
  if (exchange_) throw InvalidArgument("exchange", what + " cannot run as one shard of a longer sequence");
}

ForwardResult FlowGraphRunner::forward(const ForwardArgs& args, const MlstmOptions& options,
                                       std::int64_t segment_tokens, StateCheckpoints* keep) {
  return run_forward(args, options, segment_tokens, {}, keep);
}

ForwardResult FlowGraphRunner::forward_into(TensorView h, const ForwardArgs& args, const MlstmOptions& options,
                                            std::int64_t segment_tokens, StateCheckpoints* keep) {
  if (h.empty()) throw InvalidArgument("h", "forward_into needs the tensor to write h into");
  check_outputs_apart({{h, "h"}}, named_inputs(args));
  return run_forward(args, options, segment_tokens, h, keep);
}

ForwardResult FlowGraphRunner::run_forward(const ForwardArgs& args, const MlstmOptions& given,
                                           std::int64_t segment_tokens, TensorView h_out, StateCheckpoints* keep) {
  const MlstmOptions options = with_chunk(given, shape_hint(args));
  using namespace tbb::flow;
  if (args.packed()) {
    const ProblemShape shape = validate_forward(args, options);
    refuse_exchange("packed sequences (cu_seqlens)");
    if (keep) throw InvalidArgument("keep", "states are not kept for packed sequences (cu_seqlens)");
    if (!h_out.empty()) {
      check_output_rows(h_out, {shape.B, shape.NH, shape.S, shape.DHHV}, shape.dtype, "h");
      check_outputs_apart({{h_out, "h"}}, named_inputs(args));
    }
    return run_packed_forward(args, shape, options, segment_tokens, h_out);
  }
  auto problem = std::make_shared<nodes::SegmentProblem>(args, options, true, h_out);
  if (keep) {
    keep->bind(args, problem->shape(), options);
    problem->keep_states(keep);
  }
  // Named members, not a structured binding: clang before 16 refuses to capture bindings in lambdas.
  const PlannedRun planned = plan_run(Pass::forward, problem->shape(), options, segment_tokens);
  const auto& devices = planned.devices;
  const Plan& p = planned.plan;
  last_plan_ = p;
  if (env::flag("MLSTM_PLAN_DEBUG")) spdlog::warn("{}", p.describe());
  auto segments = std::make_shared<std::vector<nodes::Segment>>(p.segments);
  // A shard of a longer sequence (exchange_) always computes its summary: its entering state comes from the
  // exchange.
  const bool one_segment = p.segments.size() == 1 && !exchange_;
  // One segment: its entering state is the initial state, so no local-state pass; the output run also
  // returns the state leaving the sequence.
  problem->keep_final_state(one_segment && options.return_last_states);

  // Every device keeps the inputs it uploads for a segment's local state for that segment's outputs. (One
  // segment has one pass: a GPU streams it through pinned staging instead.)
  const auto residency = one_segment ? decltype(keep_inputs_resident(devices, {}))()
                                     : keep_inputs_resident(devices, {args.q, args.k, args.v, args.i, args.f});

  // Local states: pull (one shared queue) or calibrated (one queue per device). Outputs: one queue per device;
  // a segment's outputs run where its local state ran (the plan's device, or the one that pulled it).
  ExchangeThread exchange_thread;
  tbb::flow::graph g;
  GraphBuilder b(g, exchange_ ? "forward (one shard)" : "forward");
  auto pool = std::make_shared<nodes::DevicePool>(devices);
  auto& final_state = b.add<FinalStateNode>("final_state");
  std::vector<queue_node<nodes::SegmentEntry>*> entry_queues(devices.size(), nullptr);
  std::unique_ptr<EnteringStateStage> entering;
  if (!one_segment) {
    entering = std::make_unique<EnteringStateStage>(b, p, balancing_ != Balancing::calibrated, problem, segments,
                                                    devices, pool, exchange_, &exchange_thread);
    auto& last = b.add<FinalStateFilter<nodes::SegmentEntry>>("final state of the combine", unlimited,
                                                              FinalStateFilterBody<nodes::SegmentEntry>{});
    b.edge(entering->entries(), last);
    b.edge(last, output_port<0>(last), final_state);
  }
  for (std::size_t d = 0; d < devices.size(); ++d) {
    if (one_segment && d != device_of(p.segments.front())) continue;  // the one segment's device only
    const std::string where = devices[d]->name() + " (" + share_of(p, d) + ")";
    entry_queues[d] = &b.add<queue_node<nodes::SegmentEntry>>("entering states for " + where);
    auto& outputs = b.add<function_node<nodes::SegmentEntry, nodes::SegmentOutput, rejecting>>(
        "outputs on " + where, serial, nodes::SegmentOutputStateBody{{problem, devices[d], pool, d}});
    b.edge(*entry_queues[d], outputs);
    if (one_segment) {
      auto& last = b.add<FinalStateFilter<nodes::SegmentOutput>>("final state of the outputs", unlimited,
                                                                 FinalStateFilterBody<nodes::SegmentOutput>{});
      b.edge(outputs, last);
      b.edge(last, output_port<0>(last), final_state);
    } else {
      auto& route = b.add<RouteNode<nodes::SegmentEntry>>("route to " + devices[d]->name(), unlimited,
                                                          RouteBody<nodes::SegmentEntry>{d});
      b.edge(entering->entries(), route);
      b.edge(route, output_port<0>(route), *entry_queues[d]);
    }
  }
  built(b.description());
  if (one_segment) {
    nodes::SegmentEntry first = problem->initial_entry();
    first.segment = p.segments.front();
    entry_queues[device_of(first.segment)]->try_put(first);
  } else {
    for (const auto& s : p.segments) entering->put(s);
  }
  g.wait_for_all();
  exchange_thread.finish();

  finish_log(problem->log, pool->failures());
  ForwardResult out;
  out.h = std::move(problem->h());
  if (options.return_last_states) {
    StateHandle last;
    if (!final_state.try_get(last) || !last) throw Error("FlowGraphRunner: the final state did not leave the graph");
    // The last state is shared and immutable (messages may still hold it): the result gets its own copy.
    out.c = last->C;
    out.n = last->n;
    out.m = last->m;
  }
  return out;
}

namespace {

// (B,NH,...) contiguous view as rows [r0, r1) of (1, B*NH, ...).
ConstTensorView rows_of(ConstTensorView t, std::int64_t r0, std::int64_t r1, const std::string& name) {
  if (!t.empty() && !t.is_contiguous()) throw InvalidArgument(name, "the head split needs contiguous inputs");
  return head_rows(t, r0, r1);
}

ForwardArgs rows_of(const ForwardArgs& a, std::int64_t r0, std::int64_t r1) {
  ForwardArgs s;
  s.q = rows_of(a.q, r0, r1, "q");
  s.k = rows_of(a.k, r0, r1, "k");
  s.v = rows_of(a.v, r0, r1, "v");
  s.i = rows_of(a.i, r0, r1, "i");
  s.f = rows_of(a.f, r0, r1, "f");
  s.c0 = rows_of(a.c0, r0, r1, "c0");
  s.n0 = rows_of(a.n0, r0, r1, "n0");
  s.m0 = rows_of(a.m0, r0, r1, "m0");
  return s;
}

// Copies a (1, r1-r0, ...) result into rows [r0, r1) of `out` (allocated on first use like `part`).
void put_rows(Tensor& out, Tensor& part, const Shape& full_shape, std::int64_t r0) {
  if (part.empty()) return;
  if (out.empty() && r0 == 0 && shape_numel(part.shape()) == shape_numel(full_shape)) {
    out = std::move(part).reshaped(full_shape);  // one part holds every row (one device): no copy
    return;
  }
  if (out.empty()) out = Tensor(full_shape, part.dtype());
  const std::size_t bytes = part.nbytes();
  copy_rows(out.bytes() + static_cast<std::size_t>(r0) * (bytes / static_cast<std::size_t>(part.dim(1))), 0,
            part.bytes(), 0, 1, bytes);
}

Shape with_rows(const Shape& part, const ProblemShape& p) {
  Shape s = part;
  s[0] = p.B;
  s[1] = p.NH;
  return s;
}

// Contiguous row groups, one per device, sizes as equal as possible.
std::vector<std::pair<std::int64_t, std::int64_t>> row_groups(std::int64_t rows, std::size_t devices) {
  std::vector<std::pair<std::int64_t, std::int64_t>> g;
  const auto n = static_cast<std::int64_t>(std::min<std::size_t>(devices, static_cast<std::size_t>(rows)));
  for (std::int64_t d = 0; d < n; ++d) g.push_back({rows * d / n, rows * (d + 1) / n});
  return g;
}

// Runs work(d) for every row group d at once, one continue_node per group fanned out from one start
// message, and logs "rows [a, b): <what> on <device>". `built` gets the graph before it runs.
void run_row_groups(const std::vector<std::pair<std::int64_t, std::int64_t>>& groups,
                    const std::vector<std::shared_ptr<ComputeDevice>>& devices, const std::string& what,
                    std::vector<std::string>& log, const std::function<void(const GraphDescription&)>& built,
                    const std::function<void(std::size_t)>& work) {
  tbb::flow::graph g;
  GraphBuilder b(g, what + " head split");
  auto& start = b.add<tbb::flow::broadcast_node<tbb::flow::continue_msg>>("start");
  log.clear();
  for (std::size_t d = 0; d < groups.size(); ++d) {
    const std::string rows = "rows [" + std::to_string(groups[d].first) + ", " + std::to_string(groups[d].second) + ")";
    auto& node = b.add<tbb::flow::continue_node<tbb::flow::continue_msg>>(
        what + " " + rows + " on " + devices[d]->name(), [&work, d](tbb::flow::continue_msg) { work(d); });
    b.edge(start, node);
    log.push_back(rows + ": " + what + " on " + devices[d]->name());
  }
  built(b.description());
  start.try_put(tbb::flow::continue_msg());
  g.wait_for_all();
}

}  // namespace

ForwardResult FlowGraphRunner::forward_head_split(const ForwardArgs& args, const MlstmOptions& given) {
  const MlstmOptions options = with_chunk(given, shape_hint(args));
  refuse_exchange("the head split");
  const ProblemShape p = validate_forward(args, options);
  check_not_packed(p, "the head split");
  const PlannedRun planned = plan_run(Pass::forward_head_split, p, options, 0);
  const auto& devices = planned.devices;
  const Plan& plan = planned.plan;
  last_plan_ = plan;
  const auto& groups = plan.rows;
  std::vector<ForwardResult> parts(groups.size());
  std::vector<std::string> log;
  run_row_groups(
      groups, devices, "forward", log, [this](const GraphDescription& d) { built(d); },
      [&](std::size_t d) {
        parts[d] = devices[d]->forward(rows_of(args, groups[d].first, groups[d].second), options);
      });
  finish_log(std::move(log), {});
  ForwardResult out;
  for (std::size_t d = 0; d < groups.size(); ++d) {
    const auto r0 = groups[d].first;
    put_rows(out.h, parts[d].h, with_rows(parts[d].h.shape(), p), r0);
    if (options.return_last_states) {
      put_rows(out.c, parts[d].c, with_rows(parts[d].c.shape(), p), r0);
      put_rows(out.n, parts[d].n, with_rows(parts[d].n.shape(), p), r0);
      put_rows(out.m, parts[d].m, with_rows(parts[d].m.shape(), p), r0);
    }
  }
  return out;
}

Plan FlowGraphRunner::plan_over(const std::vector<std::shared_ptr<ComputeDevice>>& devices, const ProblemShape& shape,
                                const MlstmOptions& options, std::int64_t segment_tokens) const {
  std::vector<std::string> names;
  for (const auto& d : devices) names.push_back(d->name());
  if (balancing_ == Balancing::calibrated)
    return make_calibrated_plan(shape, options, names, calibrate(devices, shape, options), segment_tokens);
  return make_plan(shape, options, names, segment_tokens);
}

std::vector<std::shared_ptr<ComputeDevice>> FlowGraphRunner::capable_devices(std::initializer_list<DeviceStage> stages,
                                                                             const ProblemShape& shape,
                                                                             const MlstmOptions& options,
                                                                             std::vector<std::string>& left_out) const {
  std::vector<std::shared_ptr<ComputeDevice>> capable;
  std::string refusals;
  for (const auto& d : devices_) {
    std::string why;
    for (const DeviceStage stage : stages) {
      if (const auto support = d->supports(stage, shape, options); !support) {
        why = std::string(stage_name(stage)) + ": " + support.why_not;
        break;
      }
    }
    if (why.empty()) {
      capable.push_back(d);
    } else {
      spdlog::info("mlstm-flow: {} left out of this run ({})", d->name(), why);
      left_out.push_back(d->name() + " (" + why + ")");
      refusals += (refusals.empty() ? "" : "; ") + d->name() + " (" + why + ")";
    }
  }
  if (capable.empty()) throw InvalidArgument("devices", "no device of the graph can run this problem: " + refusals);
  return capable;
}

FlowGraphRunner::PlannedRun FlowGraphRunner::plan_run(Pass pass, const ProblemShape& shape, const MlstmOptions& options,
                                                      std::int64_t segment_tokens) const {
  PlannedRun run;
  std::vector<std::string> left_out;
  switch (pass) {
    case Pass::forward:
    case Pass::stream:
      run.devices = capable_devices({DeviceStage::last_state, DeviceStage::forward}, shape, options, left_out);
      break;
    case Pass::backward:
      run.devices = capable_devices({DeviceStage::forward, DeviceStage::backward, DeviceStage::state_gradient}, shape,
                                    options, left_out);
      break;
    case Pass::forward_head_split:
      run.devices = capable_devices({DeviceStage::forward}, shape, options, left_out);
      break;
    case Pass::backward_head_split:
      run.devices = capable_devices({DeviceStage::backward}, shape, options, left_out);
      break;
  }
  if (pass == Pass::forward_head_split || pass == Pass::backward_head_split) {
    run.plan.S = shape.S;
    run.plan.chunk_size = options.chunk_size;
    run.plan.rows = row_groups(shape.rows(), run.devices.size());
    run.devices.resize(run.plan.rows.size());  // more devices than rows: the extra ones get nothing
    for (const auto& d : run.devices) run.plan.devices.push_back(d->name());
  } else {
    std::vector<std::string> measured;
    if (balancing_ == Balancing::fastest && pass == Pass::forward && run.devices.size() > 1) {
      // Measured on pieces of up to 16384 tokens (whole chunks) of this problem: one device alone or all. Never
      // longer than the problem: a chunk longer than the sequence is the sequence.
      ProblemShape piece = shape;
      const std::int64_t L = options.chunk_size;
      piece.S = std::min(shape.S, std::max<std::int64_t>(L, std::min<std::int64_t>(shape.S, 16384) / L * L));
      const std::size_t best = fastest_candidate(run.devices, Balancing::pull, piece, options, measured);
      if (best < run.devices.size()) {
        for (std::size_t c = 0; c < run.devices.size(); ++c)
          if (c != best)
            left_out.push_back(run.devices[c]->name() + " (fastest: " + run.devices[best]->name() +
                               " alone measured faster)");
        run.devices = {run.devices[best]};
      }
    }
    run.plan = plan_over(run.devices, shape, options, segment_tokens);
    run.plan.measured = std::move(measured);
    // One segment runs where the plan says, decided here: device 0 unless a calibrated plan chose.
    if (run.plan.segments.size() == 1 && run.plan.segments.front().device < 0) run.plan.segments.front().device = 0;
  }
  run.plan.pass = pass;
  run.plan.left_out = std::move(left_out);
  return run;
}

void FlowGraphRunner::built(const GraphDescription& graph) {
  graph_ = graph;
  dot_error_.clear();
  const auto path = env::get("MLSTM_GRAPH_DOT");
  if (!path) return;
  try {
    // A file there that is not a graph dump (an input, a result) is never replaced: the CLI refuses such a path up
    // front, a library caller gets the report below.
    if (const auto why = why_not_replaceable(*path, "digraph")) {
      throw Error("'" + *path + "' " + *why + ": not a graph dump, not replaced");
    }
    write_file_atomically(*path, graph.dot());
  } catch (const Error& e) {  // a debugging aid: the run goes on, the failure is reported
    dot_error_ = std::string("graph DOT not written (MLSTM_GRAPH_DOT): ") + e.what();
    spdlog::warn("mlstm-flow: {}", dot_error_);
  }
}

void FlowGraphRunner::finish_log(std::vector<std::string> log, const std::vector<std::string>& failures) {
  log_ = std::move(log);
  for (const auto& f : failures) log_.push_back("device failure: " + f);
  if (!dot_error_.empty()) log_.push_back(dot_error_);
}

BackwardResult FlowGraphRunner::backward(const BackwardArgs& args, const MlstmOptions& options,
                                         std::int64_t segment_tokens) {
  return run_backward(args, options, segment_tokens, nullptr);
}

BackwardResult FlowGraphRunner::backward_into(const GradientViews& out, const BackwardArgs& args,
                                              const MlstmOptions& options, std::int64_t segment_tokens) {
  check_gradient_views(out, validate_backward(args, options));
  check_outputs_apart(named_outputs(out), named_inputs(args));
  return run_backward(args, options, segment_tokens, &out);
}

BackwardResult FlowGraphRunner::run_backward(const BackwardArgs& args, const MlstmOptions& given,
                                             std::int64_t segment_tokens, const GradientViews* out) {
  const MlstmOptions options = with_chunk(given, shape_hint(args.inputs));
  using namespace tbb::flow;
  const ProblemShape shape = validate_backward(args, options);
  if (shape.packed()) {
    refuse_exchange("packed sequences (cu_seqlens)");
    if (args.checkpoints) throw InvalidArgument("checkpoints", "no states are kept for packed sequences (cu_seqlens)");
    return run_packed_backward(args, shape, options, segment_tokens, out);
  }
  if (args.checkpoints) {
    if (args.checkpoints_from != 0)
      throw InvalidArgument("checkpoints_from", "a whole backward starts at token 0 of its checkpoints");
    args.checkpoints->check_fits(args.inputs, shape, options);
  }
  const PlannedRun planned = plan_run(Pass::backward, shape, options, segment_tokens);
  const auto& capable = planned.devices;
  const Plan& p = planned.plan;
  last_plan_ = p;
  if (env::flag("MLSTM_PLAN_DEBUG")) spdlog::warn("{}", p.describe());
  auto problem = std::make_shared<nodes::SegmentGradientProblem>(args, options, p.segments, out);
  const auto fw = problem->forward();
  const bool one_segment = p.segments.size() == 1 && !exchange_;  // a shard always exchanges (run_forward)
  auto segments = std::make_shared<std::vector<nodes::Segment>>(p.segments);
  auto grad_running = std::make_shared<nodes::SegmentGradientEntry>();  // the gradient leaving the current segment

  // Inputs and dh stay on the device that uploads them for a segment's local state, its local state gradient
  // and its backward: every pass of a segment runs on the device that computed its local state. One segment is
  // one backward call, which uploads its inputs once (a long one streams them through the device in pieces).
  const auto residency = one_segment ? decltype(keep_inputs_resident(capable, {}))()
                                     : keep_inputs_resident(capable, {args.inputs.q, args.inputs.k, args.inputs.v,
                                                                      args.inputs.i, args.inputs.f, args.dh});

  ExchangeThread exchange_thread;
  tbb::flow::graph g;
  GraphBuilder b(g, exchange_ ? "backward (one shard)" : "backward");
  auto pool = std::make_shared<nodes::DevicePool>(capable);
  using GradientEntries = queue_node<nodes::SegmentGradientEntry>;
  using BackwardNode = function_node<nodes::SegmentGradientEntry, int, rejecting>;
  std::vector<GradientEntries*> backward_queues(capable.size(), nullptr);
  for (std::size_t d = 0; d < capable.size(); ++d) {
    if (one_segment && d != device_of(p.segments.front())) continue;  // the one segment's device only
    const std::string where = capable[d]->name() + " (" + share_of(p, d) + ")";
    backward_queues[d] = &b.add<GradientEntries>("gradients leaving segments for " + where);
    auto& bw =
        b.add<BackwardNode>("backward on " + where, serial, nodes::SegmentBackwardBody{problem, capable[d], pool, d});
    b.edge(*backward_queues[d], bw);
  }
  std::unique_ptr<EnteringStateStage> entering;
  if (!one_segment) {
    // Forward: local states, in-order combine -> the state entering every segment, recorded in the problem in
    // segment order (EnteringStateStage::entries). Port 0: entries of segments 1.. for their local state
    // gradients; port 1: after the last entry, the last segment's backward entry (dc_last / dn_last), set
    // before the last local state gradient is passed on (that one reaches the reverse recurrence first).
    entering = std::make_unique<EnteringStateStage>(b, p, balancing_ != Balancing::calibrated, fw, segments, capable,
                                                    pool, exchange_, &exchange_thread);
    // A shard (exchange_): every segment's local state gradient (segment 0's too) folds into the shard's gradient
    // summary; the last segment's backward waits for the gradient the exchange returns.
    const bool shard = exchange_ != nullptr;
    using Record =
        multifunction_node<nodes::SegmentEntry, std::tuple<nodes::SegmentEntry, nodes::SegmentGradientEntry>>;
    // `shard` by value: this block ends before the graph runs (problem and grad_running live until the run ends).
    auto& record = b.add<Record>("record entering states", serial,
                                 [&, shard](const nodes::SegmentEntry& e, Record::output_ports_type& out) {
                                   problem->record_entry(e);
                                   if (e.is_last) {
                                     nodes::SegmentEntry leaving;
                                     leaving.index = e.index + 1;
                                     leaving.state = e.leaving;  // the final state, from the last message
                                     problem->record_final_state(leaving);
                                     if (!shard) {
                                       *grad_running = problem->last_entry();
                                       std::get<1>(out).try_put(*grad_running);
                                     }
                                   }
                                   if (e.index >= 1 || shard) std::get<0>(out).try_put(e);
                                 });
    b.edge(entering->entries(), record);
    // Backward: local state gradients (segments 1..), reverse combine, then every segment's gradients.
    const auto nseg = p.segments.size();
    auto& reverse_order = b.add<sequencer_node<nodes::SegmentStateGradient>>(
        "local state gradients, last segment first",
        [nseg](const nodes::SegmentStateGradient& s) { return nseg - 1 - static_cast<std::size_t>(s.index); });
    auto& grad_recurrence = b.add<function_node<nodes::SegmentStateGradient, nodes::SegmentGradientEntry>>(
        "reverse combine (state-gradient recurrence)", serial,
        nodes::StateGradientRecurrenceBody{problem, grad_running});
    using Release = multifunction_node<std::pair<Tensor, Tensor>,
                                       std::tuple<nodes::SegmentGradientEntry, nodes::SegmentStateGradient>>;
    Release* release = nullptr;
    if (shard) {
      release = &connect_gradient_exchange(b, problem, reverse_order, grad_recurrence, grad_running, exchange_,
                                           exchange_thread);
    } else {
      b.edge(reverse_order, grad_recurrence);
    }
    for (std::size_t d = 0; d < capable.size(); ++d) {
      const std::string name = capable[d]->name(), where = name + " (" + share_of(p, d) + ")";
      auto& route = b.add<RouteNode<nodes::SegmentEntry>>("route entering states to " + name, unlimited,
                                                          RouteBody<nodes::SegmentEntry>{d});
      b.edge(record, output_port<0>(record), route);
      auto& queue = b.add<queue_node<nodes::SegmentEntry>>("entering states for " + where);
      b.edge(route, output_port<0>(route), queue);
      auto& local_gradient = b.add<function_node<nodes::SegmentEntry, nodes::SegmentStateGradient, rejecting>>(
          "local_state_gradient on " + where, serial, nodes::LocalStateGradientBody{problem, capable[d], pool, d});
      b.edge(queue, local_gradient);
      b.edge(local_gradient, reverse_order);
      auto& route_gradients = b.add<RouteNode<nodes::SegmentGradientEntry>>("route gradients to " + name, unlimited,
                                                                            RouteBody<nodes::SegmentGradientEntry>{d});
      b.edge(record, output_port<1>(record), route_gradients);
      if (release) b.edge(*release, output_port<0>(*release), route_gradients);
      b.edge(grad_recurrence, route_gradients);
      b.edge(route_gradients, output_port<0>(route_gradients), *backward_queues[d]);
    }
  }
  built(b.description());
  if (one_segment) {
    // One segment: its entering state is the initial state, and nothing depends on its leaving state.
    nodes::SegmentEntry first = fw->initial_entry();
    first.segment = p.segments.front();
    problem->record_entry(first);
    backward_queues[device_of(first.segment)]->try_put(problem->last_entry());
  } else {
    for (const auto& s : p.segments) entering->put(s);
  }
  g.wait_for_all();
  exchange_thread.finish();
  finish_log(problem->log, pool->failures());
  return problem->take_result();
}

BackwardResult FlowGraphRunner::backward_head_split(const BackwardArgs& args, const MlstmOptions& given) {
  const MlstmOptions options = with_chunk(given, shape_hint(args.inputs));
  refuse_exchange("the head split");
  const ProblemShape p = validate_backward(args, options);
  check_not_packed(p, "the head split");
  const PlannedRun planned = plan_run(Pass::backward_head_split, p, options, 0);
  const auto& capable = planned.devices;
  const Plan& plan = planned.plan;
  last_plan_ = plan;
  const auto& groups = plan.rows;
  std::vector<BackwardResult> parts(groups.size());
  std::vector<std::string> log;
  run_row_groups(
      groups, capable, "backward", log, [this](const GraphDescription& d) { built(d); },
      [&](std::size_t d) {
        BackwardArgs b;
        b.inputs = rows_of(args.inputs, groups[d].first, groups[d].second);
        b.dh = rows_of(args.dh, groups[d].first, groups[d].second, "dh");
        b.dc_last = rows_of(args.dc_last, groups[d].first, groups[d].second, "dc_last");
        b.dn_last = rows_of(args.dn_last, groups[d].first, groups[d].second, "dn_last");
        parts[d] = capable[d]->backward(b, options);
      });
  finish_log(std::move(log), {});
  BackwardResult out;
  for (std::size_t d = 0; d < groups.size(); ++d) {
    const auto r0 = groups[d].first;
    auto& part = parts[d];
    for (auto [dst, src] : {std::pair{&out.dq, &part.dq},
                            {&out.dk, &part.dk},
                            {&out.dv, &part.dv},
                            {&out.di, &part.di},
                            {&out.df, &part.df},
                            {&out.dc0, &part.dc0},
                            {&out.dn0, &part.dn0},
                            {&out.dm0, &part.dm0}}) {
      if (!src->empty()) put_rows(*dst, *src, with_rows(src->shape(), p), r0);
    }
  }
  return out;
}

}  // namespace mlstm::graph
