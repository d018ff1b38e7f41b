// forward --stream-tokens: .npy files of any size in sequence slices (a read/compute/write pipeline), h written
// incrementally, a progress record after every slice for --resume.
#include <sys/stat.h>
#include <tbb/parallel_pipeline.h>
#include <tbb/task_group.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>

#include "commands.hpp"
#include "mlstm/core/atomic_file.hpp"
#include "mlstm/core/env.hpp"
#include "mlstm/core/npy.hpp"
#include "mlstm/core/trace.hpp"

namespace mlstm::cli {

namespace {

namespace fs = std::filesystem;

// What a resumed run must share with the run that wrote the record, so that the final h is bit for bit the
// one an uninterrupted run writes: the slice size, every option that changes results, where it runs, and the
// input files (path, size, modification time, and the inode and its change time: a file edited in place with its
// modification time set back still changes its ctime, which no user can set).
json stream_identity(const InputFiles& in, const ForwardOutputs& out, const ForwardStreaming& st,
                     const MlstmOptions& o) {
  json files = json::array();
  for (const auto& [option, path] : input_paths(in)) {
    if (path.empty()) continue;
    struct stat s {};
    if (::stat(path.c_str(), &s) != 0) throw InvalidArgument(option, "cannot open '" + path + "'");
    std::error_code ec;
    files.push_back({{"option", option},
                     {"path", fs::absolute(path, ec).string()},
                     {"size", static_cast<std::uint64_t>(s.st_size)},
                     {"mtime_ns", static_cast<std::int64_t>(s.st_mtim.tv_sec) * 1000000000 + s.st_mtim.tv_nsec},
                     {"ctime_ns", static_cast<std::int64_t>(s.st_ctim.tv_sec) * 1000000000 + s.st_ctim.tv_nsec},
                     {"inode", static_cast<std::uint64_t>(s.st_ino)}});
  }
  const float eps = static_cast<float>(o.eps);
  std::uint32_t eps_bits;
  std::memcpy(&eps_bits, &eps, sizeof eps_bits);
  // --balancing: where a flow-graph run's segments go (one kernel call refuses it, so it is the default there).
  // Packed sequences write their last states as they end: a resumed run continues the same state outputs.
  json packed_outputs = nullptr;
  if (!in.cu_seqlens.empty()) packed_outputs = {!out.c.empty(), !out.n.empty(), !out.m.empty()};
  return {{"--stream-tokens", st.tokens},
          {"--out-c/--out-n/--out-m", packed_outputs},
          {"--chunk-size", o.chunk_size},
          {"--gate", std::string(gate_name(o.gate))},
          {"--no-normalize", !o.normalize},
          {"--eps", eps_bits},
          {"--kernel", runs_one_kernel(in) ? in.kernel : std::string("flow-graph")},
          {"--devices", in.devices},
          {"--balancing", in.balancing},
          {"--dtype", in.dtype},
          {"inputs", files}};
}

constexpr char kRecordMagic[8] = {'M', 'L', 'S', 'T', 'M', 'F', 'W', 'P'};

// The progress record: magic, JSON length (u64), the JSON (identity + tokens done), the StreamSession
// snapshot after those tokens, FNV-1a 64 of everything before it. Written atomically (write_file_atomically)
// only after the h of those tokens is written and synced: it never claims more than the partial file holds.
void write_progress(const std::string& path, const json& identity, std::int64_t tokens_done,
                    const std::string& snapshot) {
  json doc = identity;
  doc["tokens_done"] = tokens_done;
  const std::string text = doc.dump();
  std::string bytes(kRecordMagic, sizeof kRecordMagic);
  const std::uint64_t len = text.size();
  bytes.append(reinterpret_cast<const char*>(&len), sizeof len);
  bytes += text;
  bytes += snapshot;
  const std::uint64_t sum = StreamSession::checksum(bytes);
  bytes.append(reinterpret_cast<const char*>(&sum), sizeof sum);
  write_file_atomically(path, bytes);
}

// Reads the record of `out` for --resume and checks it against this run (each difference refused naming its
// option); returns the session restored from it.
StreamSession read_progress(const std::string& path, const json& identity, const StreamConfig& cfg) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    throw InvalidArgument("--resume", "no progress record '" + path +
                                          "' (nothing to resume: the run finished, never started, or wrote a "
                                          "different --out); run without --resume");
  }
  std::ostringstream ss;
  ss << file.rdbuf();
  const std::string bytes = ss.str();
  auto refuse = [&](const std::string& why) {
    return InvalidArgument("--resume", "progress record '" + path + "' refused: " + why + "; run without --resume");
  };
  std::uint64_t len = 0, sum = 0;
  if (bytes.size() < sizeof kRecordMagic + 16 || std::memcmp(bytes.data(), kRecordMagic, sizeof kRecordMagic) != 0) {
    throw refuse("not a progress record");
  }
  std::memcpy(&sum, bytes.data() + bytes.size() - 8, 8);
  if (sum != StreamSession::checksum(bytes.substr(0, bytes.size() - 8))) throw refuse("checksum mismatch");
  std::memcpy(&len, bytes.data() + sizeof kRecordMagic, 8);
  const std::size_t at = sizeof kRecordMagic + 8;
  if (len > bytes.size() - at - 8) throw refuse("truncated");
  json doc = json::parse(bytes.substr(at, len), nullptr, false);
  if (doc.is_discarded() || !doc.is_object()) throw refuse("unreadable");
  if (!doc.contains("--balancing")) doc["--balancing"] = "pull";  // a record from before --balancing: the graph pulled
  // A value as the user wrote it: --eps is kept as its float32 bits (exact), shown as the number.
  const auto shown = [](const std::string& key, const json& v) {
    if (key == "--out-c/--out-n/--out-m" && v.is_array() && v.size() == 3) {  // which state outputs were given
      std::string named;
      const char* options[] = {"--out-c", "--out-n", "--out-m"};
      for (std::size_t j = 0; j < 3; ++j)
        if (v[j] == true) named += (named.empty() ? "" : " ") + std::string(options[j]);
      return named.empty() ? std::string("none") : named;
    }
    if (key != "--eps" || !v.is_number_unsigned()) return v.dump();
    const auto bits = v.get<std::uint32_t>();
    float eps = 0;
    std::memcpy(&eps, &bits, sizeof eps);
    char text[32];
    std::snprintf(text, sizeof text, "%g", static_cast<double>(eps));
    return std::string(text);
  };
  // Inputs given in one run and not in the other first (--cu-seqlens, --c0/--n0/--m0): they explain the options
  // that follow from them (the packed state outputs), and are named as the user gave them.
  const json& have = doc["inputs"];
  const auto has_option = [](const json& files, const json& option) {
    return std::any_of(files.begin(), files.end(), [&](const json& f) { return f["option"] == option; });
  };
  for (const auto& want : identity["inputs"]) {
    if (!has_option(have, want["option"])) {
      throw InvalidArgument(want["option"].get<std::string>(),
                            "given here but not in the run that wrote the progress record '" + path +
                                "'; resume with the same inputs, or run without --resume");
    }
  }
  for (const auto& had : have) {
    if (!has_option(identity["inputs"], had["option"])) {
      throw InvalidArgument(had["option"].get<std::string>(),
                            "given in the run that wrote the progress record '" + path +
                                "' but not here; resume with the same inputs, or run without --resume");
    }
  }
  for (const auto& [key, value] : identity.items()) {
    if (key == "inputs") continue;
    if (!doc.contains(key) || doc[key] != value) {
      throw InvalidArgument(key, "differs from the run that wrote the progress record '" + path + "' (" +
                                     (doc.contains(key) ? shown(key, doc[key]) : "absent") + " there, " +
                                     shown(key, value) +
                                     " here); resume with the same options, or run without --resume");
    }
  }
  for (const auto& want : identity["inputs"]) {
    const auto it =
        std::find_if(have.begin(), have.end(), [&](const json& h) { return h["option"] == want["option"]; });
    if (it == have.end() || *it != want) {
      throw InvalidArgument(want["option"].get<std::string>(),
                            "'" + want["path"].get<std::string>() + "' is not the file the progress record '" + path +
                                "' was made from (its path, size, modification or change time differ); run "
                                "without --resume");
    }
  }
  // The state inside the record: a damaged one is the record's fault (--resume), not a library path argument.
  StreamSession session = [&] {
    try {
      return StreamSession::restore_bytes(bytes.substr(at + len, bytes.size() - at - len - 8), cfg, path);
    } catch (const InvalidArgument& e) {
      if (e.argument() != "path") throw;
      throw refuse(e.what());
    }
  }();
  if (!doc.contains("tokens_done") || doc["tokens_done"] != session.tokens()) throw refuse("token counts disagree");
  return session;
}

// The last state of packed sequence `index`, taken when its last token was computed.
struct FinishedSequence {
  std::int64_t index = 0;
  State state;
};

// Tokens [s0, s1) of every input: read by the pipeline's first stage while the slice before is computed.
struct StreamSlice {
  std::int64_t s0 = 0, s1 = 0;
  ForwardInputs in;
  Tensor h;
  std::string snapshot;                    // the session's state after this slice
  std::vector<FinishedSequence> finished;  // packed: the sequences that ended in this slice
  std::int64_t whole_sequences = 0;        // packed: those of them that began in it too (one packed call)
};

// --cu-seqlens with --stream-tokens: the sequences' offsets; each sequence's initial state read when it starts
// (row j of --c0/--n0/--m0, (N,...)), and its last state written when it ends (row j of --out-c/-n/-m, whose
// partial files a --resume continues like h's). A slice's whole sequences run in one packed call, the parts that
// cross its ends stream (compute_packed_slice).
struct PackedStreaming {
  std::vector<std::int64_t> offsets;
  std::unique_ptr<npy::SeqSliceReader> c0, n0, m0;
  std::unique_ptr<npy::SeqSliceWriter> c, n, m;

  bool on() const noexcept { return !offsets.empty(); }
  std::int64_t count() const noexcept { return static_cast<std::int64_t>(offsets.size()) - 1; }
  std::int64_t sequence_of(std::int64_t t) const {  // the sequence holding token t
    return std::upper_bound(offsets.begin(), offsets.end(), t) - offsets.begin() - 1;
  }
  std::int64_t end_of(std::int64_t j) const { return offsets[static_cast<std::size_t>(j + 1)]; }

  // Opens the offsets and the initial-state files, every header checked against N packed sequences of `hdr`.
  void open(const InputFiles& in, const InputHeaders& hdr) {
    offsets = npy::read_offsets(in.cu_seqlens, "--cu-seqlens");
    ProblemShape p;
    p.B = hdr.B;
    p.S = hdr.S;
    try {
      check_cu_seqlens(offsets, p);
    } catch (const InvalidArgument& e) {
      rethrow_as_cli(e);
    }
    const std::int64_t N = count();
    const std::pair<const std::string*, const char*> given[3] = {{&in.c0, "--c0"}, {&in.n0, "--n0"}, {&in.m0, "--m0"}};
    const bool any = !in.c0.empty() || !in.n0.empty() || !in.m0.empty();
    const Shape want[3] = {{N, hdr.NH, hdr.DK, hdr.DV}, {N, hdr.NH, hdr.DK}, {N, hdr.NH}};
    std::unique_ptr<npy::SeqSliceReader>* readers[3] = {&c0, &n0, &m0};
    for (int k = 0; k < 3 && any; ++k) {
      if (given[k].first->empty()) {
        throw InvalidArgument(given[k].second,
                              "missing; the initial states are given as all three of --c0, --n0, --m0 or none");
      }
      *readers[k] = std::make_unique<npy::SeqSliceReader>(*given[k].first, given[k].second, std::nullopt, 0);
      if ((*readers[k])->shape() != want[k]) {
        throw InvalidArgument(given[k].second, "expected " + shape_to_string(want[k]) + " (one state per packed " +
                                                   "sequence, N = " + std::to_string(N) + "), got " +
                                                   shape_to_string((*readers[k])->shape()));
      }
    }
  }

  // m0 is small ((N,NH)): the sigmoid gate's zero stabiliser is checked for every sequence before the run starts.
  void check_sigmoid_states(const MlstmOptions& o) const {
    if (!m0) return;
    try {
      check_stabiliser(m0->read(0, count()).view(), o, "m0");
    } catch (const InvalidArgument& e) {
      rethrow_as_cli(e);
    }
  }

  // The state sequence j starts from: its rows of the state files, whose shapes open() checked and whose sigmoid
  // stabilisers check_sigmoid_states() did; finite under --check-finite.
  State initial(std::int64_t j, bool finite) const {
    if (!c0) return {};
    State s{c0->read(j, j + 1), n0->read(j, j + 1), m0->read(j, j + 1)};
    if (finite) {
      const std::pair<const Tensor*, const char*> parts[3] = {{&s.C, "--c0"}, {&s.n, "--n0"}, {&s.m, "--m0"}};
      for (const auto& [t, option] : parts) {
        try {
          check_finite(t->view(), option);
        } catch (const InvalidArgument& e) {
          const std::string what = e.what();
          throw InvalidArgument(option, "sequence " + std::to_string(j) + ": " +
                                            what.substr(std::min(what.size(), e.argument().size() + 2)));
        }
      }
    }
    return s;
  }

  // The states sequences [ja, jb) start from ((jb - ja, NH, ...) rows; empty without state files), checked as
  // initial() checks each.
  State initial_rows(std::int64_t ja, std::int64_t jb, bool finite) const {
    if (!c0) return {};
    State s{c0->read(ja, jb), n0->read(ja, jb), m0->read(ja, jb)};
    if (finite) {
      try {
        check_finite(s.C.view(), "--c0");
        check_finite(s.n.view(), "--n0");
        check_finite(s.m.view(), "--m0");
      } catch (const InvalidArgument&) {
        for (std::int64_t j = ja; j < jb; ++j) (void)initial(j, true);  // names the sequence
        throw;
      }
    }
    return s;
  }

  // The writers of the requested last-state outputs: fresh partial files, or (resume) the ones a killed run left.
  void open_outputs(const ForwardOutputs& out, const InputHeaders& hdr, bool resume) {
    const std::int64_t N = count();
    if (!out.c.empty())
      c = std::make_unique<npy::SeqSliceWriter>(out.c, Shape{N, hdr.NH, hdr.DK, hdr.DV}, DType::f32, resume, 0);
    if (!out.n.empty())
      n = std::make_unique<npy::SeqSliceWriter>(out.n, Shape{N, hdr.NH, hdr.DK}, DType::f32, resume, 0);
    if (!out.m.empty()) m = std::make_unique<npy::SeqSliceWriter>(out.m, Shape{N, hdr.NH}, DType::f32, resume, 0);
  }
  void write(const FinishedSequence& f) const {
    if (c) c->write(f.index, f.state.C.view());
    if (n) n->write(f.index, f.state.n.view());
    if (m) m->write(f.index, f.state.m.view());
  }
  void sync() const {
    for (auto* w : {c.get(), n.get(), m.get()})
      if (w) w->sync();
  }
  void commit() const {
    for (auto* w : {c.get(), n.get(), m.get()})
      if (w) w->commit();
  }
};

// One slice of packed sequences. The sequences that begin and end inside it run as one packed call
// (StreamSession::forward_sequences: their h written into the slice's, their last states kept); only the parts
// that cross the slice's ends stream: the first going on from the session's state (its last state kept where it
// ends here), the last starting its sequence afresh. The streamed parts are submitted around the packed call and
// taken after it, so a GPU's stream overlaps them with it; a slice of many short documents is then one call instead
// of a piece each.
void compute_packed_slice(StreamSlice& s, const ForwardArgs& a, StreamSession& session, const PackedStreaming& packed,
                          bool finite) {
  s.h = Tensor({a.q.dim(0), a.q.dim(1), a.q.dim(2), a.v.dim(3)}, a.q.dtype());
  struct Part {
    std::uint64_t ticket;
    std::int64_t t0, t1;
    std::int64_t ends = -1;  // the sequence whose last part this is
  };
  std::vector<Part> parts;
  auto stream = [&](std::int64_t t0, std::int64_t t1, std::int64_t j) {  // tokens [t0, t1) of sequence j
    if (t0 == packed.offsets[static_cast<std::size_t>(j)]) session.start_sequence(packed.initial(j, finite));
    const bool ends = t1 == packed.end_of(j);
    parts.push_back({session.submit(sequence_slice(a, t0 - s.s0, t1 - s.s0), /*keep_state=*/ends), t0 - s.s0, t1 - s.s0,
                     ends ? j : -1});
  };
  const std::int64_t j0 = packed.sequence_of(s.s0), j1 = packed.sequence_of(s.s1 - 1);
  // The whole sequences: [ja, jb).
  const std::int64_t ja = packed.offsets[static_cast<std::size_t>(j0)] == s.s0 ? j0 : j0 + 1;
  const std::int64_t jb = packed.end_of(j1) == s.s1 ? j1 + 1 : j1;
  if (ja > j0) stream(s.s0, std::min(s.s1, packed.end_of(j0)), j0);  // goes on from the slice before
  if (jb > ja) {
    const std::int64_t t0 = packed.offsets[static_cast<std::size_t>(ja)], t1 = packed.end_of(jb - 1);
    ForwardArgs whole = sequence_slice(a, t0 - s.s0, t1 - s.s0);
    std::vector<std::int64_t> offsets;
    for (std::int64_t j = ja; j <= jb; ++j) offsets.push_back(packed.offsets[static_cast<std::size_t>(j)] - t0);
    whole.cu_seqlens = offsets;
    const State initial = packed.initial_rows(ja, jb, finite);
    whole.c0 = initial.C.view();
    whole.n0 = initial.n.view();
    whole.m0 = initial.m.view();
    ForwardResult r = session.forward_sequences(whole, sequence_slice(s.h.view(), t0 - s.s0, t1 - s.s0));
    s.finished.push_back({ja, State{std::move(r.c), std::move(r.n), std::move(r.m)}});
    s.whole_sequences = jb - ja;
  }
  // The last sequence goes on into the slice after (unless that is the first part's, streamed above).
  if (packed.end_of(j1) > s.s1 && !(j1 == j0 && ja > j0))
    stream(std::max(s.s0, packed.offsets[static_cast<std::size_t>(j1)]), s.s1, j1);
  for (const Part& p : parts) {
    session.take_into(p.ticket, sequence_slice(s.h.view(), p.t0, p.t1));
    if (p.ends >= 0) s.finished.push_back({p.ends, session.take_state(p.ticket)});
  }
}

// The first slice of a fresh run: an eighth of --stream-tokens (a multiple of 1024 tokens, so of every chunk size
// up to 1024) where the slices are long enough for their reading to show, the whole slice otherwise. The first
// token waits for the first slice's read (from the disk: 0.29 s of a 65536-token slice on the H100 machine, while
// its devices open in 0.19 s); the slices after it keep their length, and a resumed run continues on the same
// boundaries.
std::int64_t first_slice_tokens(std::int64_t tokens) {
  constexpr std::int64_t kRampFrom = 16384, kAlign = 1024;
  return tokens < kRampFrom ? tokens : tokens / 8 / kAlign * kAlign;
}

// The five inputs' readers; read() gives tokens [s0, s1) of each.
struct SliceReaders {
  npy::SeqSliceReader q, k, v, i, f;
  SliceReaders(const InputFiles& in, std::optional<DType> dt)
      : q(in.q, "--q", dt),
        k(in.k, "--k", dt),
        v(in.v, "--v", dt),
        i(in.i, "--i", dt, 2, false),  // gates keep their dtype; uint16 ones are bfloat16 bits with --dtype
        f(in.f, "--f", dt, 2, false) {}
  std::shared_ptr<StreamSlice> read(std::int64_t s0, std::int64_t s1) const {
    const ScopedTrace trace([&] { return "slice read at token " + std::to_string(s0); });
    auto s = std::make_shared<StreamSlice>();
    s->s0 = s0;
    s->s1 = s1;
    s->in.q = q.read(s0, s1);
    s->in.k = k.read(s0, s1);
    s->in.v = v.read(s0, s1);
    s->in.i = i.read(s0, s1);
    s->in.f = f.read(s0, s1);
    return s;
  }
};

}  // namespace

int cmd_forward_streamed(const InputFiles& in, const ForwardOutputs& out, const ForwardStreaming& st,
                         const MlstmOptions& o, const InputHeaders& hdr, bool as_json) {
  const auto dt = as_dtype(in);
  // Up-front validation with the library's own checks on a one-token slice plus the initial state, before
  // any output file exists (dtypes, head dimensions, state shapes; --check-finite on the state).
  // One set of readers (pread: safe from several threads) for the check below, the first slice read during
  // start-up, and the pipeline.
  const SliceReaders readers(in, dt);
  ForwardInputs first = std::move(readers.read(0, std::min<std::int64_t>(1, hdr.S))->in);
  PackedStreaming packed;
  if (!in.cu_seqlens.empty()) {
    packed.open(in, hdr);  // the initial states are read per sequence
    packed.check_sigmoid_states(o);
  } else {
    first.c0 = read_optional(in.c0, "--c0", std::nullopt);
    first.n0 = read_optional(in.n0, "--n0", std::nullopt);
    first.m0 = read_optional(in.m0, "--m0", std::nullopt);
  }
  StreamConfig cfg;
  cfg.B = hdr.B;
  cfg.NH = hdr.NH;
  cfg.DHQK = hdr.DK;
  cfg.DHHV = hdr.DV;
  cfg.options = o;
  if (runs_one_kernel(in)) {
    if (!in.devices.empty() && opencl::select_devices(in.devices).size() != 1) {
      throw InvalidArgument("--devices", "'" + in.devices +
                                             "' names several devices and --kernel runs on one; leave --kernel out "
                                             "to run the flow graph over all of them");
    }
    cfg.kernel = in.kernel;
    cfg.target = KernelTarget{in.devices};
  } else {
    cfg.devices = in.devices;
    cfg.balancing = balancing_of(in);
  }
  const json identity = stream_identity(in, out, st, o);
  const std::string record = progress_path_of(out.h);
  std::unique_ptr<StreamSession> session;
  // A fresh run's first slice is read while the devices open and the stream is set up (OpenCL start-up, the
  // engine's choice, programs, staging: 1.1 s on the H200 before this, the read 0.25 s after it). On a TBB
  // worker, not a thread of its own: a new thread gets a malloc arena of its own, 64 MiB of address space, and
  // under an address-space cap OpenBLAS then spins forever waiting for its buffer.
  struct Prefetch {
    tbb::task_group group;
    std::shared_ptr<StreamSlice> slice;
    bool pending = false;
    std::shared_ptr<StreamSlice> take() {
      group.wait();  // rethrows the read's error
      pending = false;
      return std::move(slice);
    }
    ~Prefetch() {
      if (!pending) return;
      try {
        group.wait();
      } catch (...) {  // the run failed before it used the slice: that error is the one reported
      }
    }
  } first_slice;
  // The first slice as it is read and reported: never past the sequence's end.
  const std::int64_t first_tokens = std::min(hdr.S, first_slice_tokens(st.tokens));
  try {
    validate_forward(first.args(), o);
    if (in.check_finite) {
      check_finite(first.c0.view(), "c0");
      check_finite(first.n0.view(), "n0");
      check_finite(first.m0.view(), "m0");
    }
    if (!st.resume) {
      first_slice.pending = true;
      first_slice.group.run(
          [&first_slice, &readers, tokens = first_tokens] { first_slice.slice = readers.read(0, tokens); });
    }
    if (st.resume) {
      remove_stale_temporaries(record);
      session = std::make_unique<StreamSession>(read_progress(record, identity, cfg));
    } else if (first.c0.empty()) {
      session = std::make_unique<StreamSession>(cfg);
    } else {
      State s0{first.c0, first.n0.empty() ? Tensor::zeros({hdr.B, hdr.NH, hdr.DK}, DType::f32) : first.n0,
               first.m0.empty() ? Tensor::zeros({hdr.B, hdr.NH}, DType::f32) : first.m0};
      session = std::make_unique<StreamSession>(cfg, std::move(s0));
    }
    if (session->tokens() < hdr.S) session->prepare(std::min(st.tokens, hdr.S - session->tokens()), first.q.dtype());
  } catch (const InvalidArgument& e) {
    rethrow_as_cli(e);
  }
  first = ForwardInputs();
  // A fresh run forgets an earlier run's record first (a record must never describe another partial file).
  if (!st.resume) {
    remove_stale_temporaries(record);
    if (::unlink(record.c_str()) != 0 && errno != ENOENT) {
      throw Error("cannot remove the stale progress record '" + record + "': " + std::strerror(errno));
    }
  }
  const std::int64_t resumed_from = session->tokens();
  npy::SeqSliceWriter writer(out.h, {hdr.B, hdr.NH, hdr.S, hdr.DV}, hdr.dtype, st.resume);
  if (packed.on()) packed.open_outputs(out, hdr, st.resume);
  std::int64_t kill_after = -1;  // test hook (env.hpp): SIGKILL to itself after this many slices
  if (const auto k = env::positive_count("MLSTM_TEST_KILL_AFTER_SLICES", "slices")) kill_after = *k;
  std::int64_t next = resumed_from, slices = 0, whole_sequences = 0;
  std::vector<std::string> devices;
  const auto t0 = Clock::now();
  std::optional<Clock::time_point> first_token;  // the first slice's h computed
  try {
    // Three serial stages, at most three slices in flight (memory flat): read slice k+2 (pread), compute
    // slice k+1 (the session carries the state; with --devices it runs the flow graph), write slice k's h
    // at its strided positions, sync it, then record the progress.
    tbb::parallel_pipeline(
        3, tbb::make_filter<void, std::shared_ptr<StreamSlice>>(
               tbb::filter_mode::serial_in_order,
               [&](tbb::flow_control& fc) -> std::shared_ptr<StreamSlice> {
                 if (next >= hdr.S) {
                   fc.stop();
                   return nullptr;
                 }
                 auto s =
                     first_slice.pending ? first_slice.take() : readers.read(next, std::min(hdr.S, next + st.tokens));
                 next = s->s1;
                 return s;
               }) &
               tbb::make_filter<std::shared_ptr<StreamSlice>, std::shared_ptr<StreamSlice>>(
                   tbb::filter_mode::serial_in_order,
                   [&](std::shared_ptr<StreamSlice> s) {
                     const ScopedTrace trace([&] { return "slice computed at token " + std::to_string(s->s0); });
                     const ForwardArgs a = s->in.args();
                     if (in.check_finite) check_finite(a);
                     if (packed.on()) {
                       compute_packed_slice(*s, a, *session, packed, in.check_finite);
                     } else {
                       s->h = session->push(a);
                     }
                     if (!first_token) first_token = Clock::now();
                     s->snapshot = session->snapshot_bytes();
                     s->in = ForwardInputs();  // the inputs go as soon as they are used
                     return s;
                   }) &
               tbb::make_filter<std::shared_ptr<StreamSlice>, void>(
                   tbb::filter_mode::serial_in_order, [&](std::shared_ptr<StreamSlice> s) {
                     const ScopedTrace trace([&] { return "slice written at token " + std::to_string(s->s0); });
                     writer.write(s->s0, s->h.view());
                     writer.sync();
                     for (const FinishedSequence& f : s->finished) packed.write(f);
                     whole_sequences += s->whole_sequences;
                     packed.sync();
                     write_progress(record, identity, s->s1, s->snapshot);
                     ++slices;
                     if (kill_after >= 0 && slices >= kill_after && s->s1 < hdr.S) ::raise(SIGKILL);
                   }));
    if (session->runner()) devices = session->runner()->last_plan().devices;
  } catch (const InvalidArgument& e) {
    rethrow_as_cli(e);
  }
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  // The last states, then h (its final name appears only complete), then the record goes.
  if (packed.on()) {
    packed.commit();
  } else {
    const State& last = session->state();
    OutputFiles files;
    files.add("--out-c", out.c, last.C);
    files.add("--out-n", out.n, last.n);
    files.add("--out-m", out.m, last.m);
    files.commit();
  }
  writer.commit();
  ::unlink(record.c_str());
  // Listed as forward without --stream-tokens lists them: the kernel's device, or the graph's that took part.
  if (runs_one_kernel(in)) devices = kernel_devices(in);
  if (devices.empty()) devices = {in.devices};
  // The size the slices' calls took: no chunk spans more tokens than a slice or a packed sequence has.
  const std::int64_t chunk =
      size_taken(session->config().options.chunk_size,
                 std::min(std::min(st.tokens, hdr.S), packed.on() ? longest_sequence(hdr.S, packed.offsets) : hdr.S));
  const Shape shape_h{hdr.B, hdr.NH, hdr.S, hdr.DV};
  if (as_json) {
    std::cout << json{{"command", "forward"},
                      {"kernel", runs_one_kernel(in) ? in.kernel : "flow-graph"},
                      {"devices", devices},
                      {"balancing", runs_one_kernel(in) ? json(nullptr) : json(in.balancing)},
                      {"shape_h", shape_h},
                      {"dtype", dtype_name(hdr.dtype)},
                      {"seconds", secs},
                      // from the process's start (before main) to the first slice's h: start-up included
                      {"first_token_seconds",
                       first_token ? json(std::chrono::duration<double>(*first_token - process_start()).count())
                                   : json(nullptr)},
                      {"stream_tokens", st.tokens},
                      {"first_slice_tokens", st.resume ? json(nullptr) : json(first_tokens)},
                      {"packed_sequences", packed.on() ? packed.count() : 0},
                      // of those, the ones that began and ended in one slice: one packed call per slice
                      {"sequences_in_packed_calls", whole_sequences},
                      {"chunk_size", chunk},
                      {"slices", slices},
                      {"resumed_from", resumed_from},
                      {"input_mib", static_cast<double>(hdr.bytes) / static_cast<double>(1 << 20)},
                      {"peak_rss_mib", peak_rss_mib()}}
                     .dump()
              << "\n";
  } else {
    std::cout << "forward: " << (runs_one_kernel(in) ? in.kernel : "flow graph over " + in.devices) << ", chunk "
              << chunk << ", h " << shape_to_string(shape_h) << " " << dtype_name(hdr.dtype) << " -> " << out.h
              << " in " << slices << (slices == 1 ? " slice of " : " slices of ") << size_taken(st.tokens, hdr.S)
              << " tokens"
              << (resumed_from == 0 && first_tokens < std::min(hdr.S, st.tokens)
                      ? " (the first " + std::to_string(first_tokens) + ", for an early first token)"
                      : std::string())
              << (resumed_from > 0 ? " (resumed at token " + std::to_string(resumed_from) + ")" : std::string()) << " ("
              << secs * 1e3 << " ms)\n";
  }
  return 0;
}

}  // namespace mlstm::cli
