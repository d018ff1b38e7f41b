// forward and backward under mpirun (issue 17): every rank of MPI_COMM_WORLD owns a contiguous shard of the
// sequence (dist::shard_of: whole chunks), reads only its slice of the .npy inputs (one pread per row), computes it
// through its own flow graph over --devices (default: the CPU workers) with dist::MpiRunner, and writes its slice
// of every sequence output into the shared output file (positioned writes into one partial file whose header rank 0
// writes once; rank 0 renames it into place when every rank's slice is durable). Nothing is gathered to one rank.
// Every step is collective (dist::collectively): a rank that fails makes every rank exit with the first failing
// rank's message, printed once (by rank 0), and its exit code; no partial output is left behind.
// Before anything else the ranks agree on their options (agree_on_options): mpirun's MPMD syntax gives each rank its
// own command line, and a rank computing with another --eps, or writing another --out, must be refused, not run.
#ifdef MLSTM_HAVE_MPI

#include <mpi.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <array>
#include <charconv>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>

#include "commands.hpp"
#include "mlstm/core/atomic_file.hpp"
#include "mlstm/core/npy.hpp"
#include "mlstm/dist/mpi_runner.hpp"

namespace mlstm::cli {

MpiSession::MpiSession(int& argc, char**& argv) {
  int provided = 0;
  if (MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided) != MPI_SUCCESS)
    throw Error("MPI_Init_thread failed");
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
}

MpiSession::~MpiSession() { MPI_Finalize(); }

namespace {

// The inputs under MPI: the flow graph over --devices on every rank (default: the CPU workers).
InputFiles distributed_inputs(const InputFiles& given) {
  if (given.kernel_option && given.kernel_option->count() > 0) {
    throw InvalidArgument("--kernel",
                          "under mpirun every rank runs the flow graph over --devices (default: workers); leave "
                          "--kernel out");
  }
  if (!given.cu_seqlens.empty()) {
    throw InvalidArgument("--cu-seqlens", "packed sequences are not split across MPI ranks; run them in one process");
  }
  InputFiles in = given;
  if (in.devices.empty()) in.devices = "workers";
  return in;
}

// This rank's shard of the sequence and its slice of the inputs (one pread per row), checked against the memory
// limit: a rank holds its slice of the inputs and of h, never the whole sequence.
struct Shard {
  std::int64_t t0 = 0, t1 = 0;
  ForwardInputs inputs;
};

Shard read_shard(const InputFiles& in, const InputHeaders& hdr, const MlstmOptions& o, int rank, int size,
                 std::uint64_t limit) {
  Shard s;
  std::tie(s.t0, s.t1) = dist::shard_of(hdr.S, o.chunk_size, rank, size);
  const std::uint64_t need = static_cast<std::uint64_t>(s.t1 - s.t0) * input_and_h_bytes_per_token(hdr);
  if (need > limit) {
    throw InvalidArgument("--memory-limit", "rank " + std::to_string(rank) + "'s shard of " +
                                                std::to_string(s.t1 - s.t0) + " tokens needs " + mib_text(need) +
                                                ", more than the limit of " + mib_text(limit) + "; use more ranks");
  }
  const auto dt = as_dtype(in);
  auto slice = [&](const std::string& path, const char* option, std::optional<DType> as, bool exact = true) {
    return npy::SeqSliceReader(path, option, as, 2, exact).read(s.t0, s.t1);
  };
  s.inputs.q = slice(in.q, "--q", dt);
  s.inputs.k = slice(in.k, "--k", dt);
  s.inputs.v = slice(in.v, "--v", dt);
  s.inputs.i = slice(in.i, "--i", dt, false);  // gates keep their dtype (uint16: bfloat16 bits with --dtype)
  s.inputs.f = slice(in.f, "--f", dt, false);
  if (rank == 0) {  // the initial state enters the first shard only
    s.inputs.c0 = read_optional(in.c0, "--c0", dt);
    s.inputs.n0 = read_optional(in.n0, "--n0", dt);
    s.inputs.m0 = read_optional(in.m0, "--m0", dt);
  }
  return s;
}

// One (B,NH,S,...) output shared by the ranks: rank 0 makes its partial file (header of the whole shape, size
// reserved), then every rank opens it and writes its slice, syncs, and rank 0 renames it into place. A failure at
// any step removes the partial file (rank 0) and reaches every rank.
class SharedOutput {
 public:
  SharedOutput(dist::MpiRunner& runner, std::string option, std::string path, Shape shape, DType dtype)
      : runner_(runner), option_(std::move(option)), path_(std::move(path)), shape_(std::move(shape)), dtype_(dtype) {}
  ~SharedOutput() {
    if (!committed_ && runner_.rank() == 0 && !path_.empty()) {
      std::error_code ignored;
      std::filesystem::remove(partial_path_of(path_), ignored);
    }
  }
  // Collective: every rank's slice (tokens [t0, ...) of `slice`) written and synced.
  void write(std::int64_t t0, const Tensor& slice) {
    if (path_.empty()) return;
    runner_.collectively([&] {
      if (runner_.rank() == 0) writer_ = std::make_unique<npy::SeqSliceWriter>(path_, shape_, dtype_, false);
    });
    runner_.collectively([&] {
      fail_if_injected();
      if (runner_.rank() != 0) writer_ = std::make_unique<npy::SeqSliceWriter>(path_, shape_, dtype_, true);
      if (slice.empty()) throw Error(option_ + ": the run returned no such output");
      writer_->write(t0, slice.view());
      writer_->sync();
    });
  }
  // Collective: rank 0 renames the file into place once every rank's slice is durable.
  void commit() {
    if (path_.empty()) return;
    runner_.collectively([&] {
      if (runner_.rank() == 0) writer_->commit();
    });
    committed_ = true;
    writer_.reset();
  }

 private:
  // Test hook: MLSTM_MPI_FAIL_WRITE=<rank>:<option> makes that rank fail to write that output's slice, after rank 0
  // made its partial file (the ranks agree on their options, so the tests have no other way to fail there).
  void fail_if_injected() const {
    const char* hook = std::getenv("MLSTM_MPI_FAIL_WRITE");
    if (hook != nullptr && std::string(hook) == std::to_string(runner_.rank()) + ":" + option_)
      throw Error(option_ + ": cannot write this rank's slice (MLSTM_MPI_FAIL_WRITE)");
  }
  dist::MpiRunner& runner_;
  std::string option_, path_;
  Shape shape_;
  DType dtype_;
  std::unique_ptr<npy::SeqSliceWriter> writer_;
  bool committed_ = false;
};

// ---- the ranks' agreement on their options ---------------------------------------------------------------------
//
// Every rank describes, in one string, each option that changes the numbers or the files: the subcommand, the
// gate, --eps, --no-normalize, --check-finite, --dtype, --kernel, --chunk-size as given (before an automatic one is
// resolved), the stream options, every input and every output. Per-rank options are left out: --devices and
// --balancing (where a rank's shard runs: mixed ranks are the point of MPMD), --memory-limit (that rank's machine),
// --json and --log-level (what rank 0 prints). One all_gather; every rank compares the same descriptions, so every
// rank refuses the same first difference (exit code 2) before any input is read beyond its fingerprint and before
// any output is touched.
//
// Each entry is [option, key, shown]: the ranks must agree on the key; shown is what a refusal prints.
//   inputs:  size and a fingerprint of the content (the .npy header with the first and last 64 KiB), not the path:
//            ranks on other hosts may read their own copy of a file at another path, and what matters is that they
//            read the same array. Only a regular file is opened (a FIFO would block; the checks later refuse it).
//   outputs: the absolute, lexically normal path: the ranks write one shared file through it.
using OptionList = std::vector<std::array<std::string, 3>>;

constexpr std::size_t kFingerprintBytes = 64 * 1024;

std::string hex64(std::uint64_t x) {
  static const char* digits = "0123456789abcdef";
  std::string s(16, '0');
  for (int d = 15; d >= 0; --d, x >>= 4) s[static_cast<std::size_t>(d)] = digits[x & 15];
  return s;
}

// An input's identity: {key, shown}. "" when not given.
std::pair<std::string, std::string> input_identity(const std::string& path) {
  if (path.empty()) return {"", "(not given)"};
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st)) return {"missing", path + " (no such file)"};
  if (!fs::is_regular_file(st)) return {"not a regular file", path + " (not a regular file)"};
  const std::uint64_t size = fs::file_size(path, ec);
  std::ifstream file(path, std::ios::binary);
  if (ec || !file) return {"unreadable", path + " (cannot be read)"};
  std::uint64_t hash = 14695981039346656037ull;  // FNV-1a, 64 bits
  auto take = [&](std::uint64_t from, std::uint64_t n) {
    std::string bytes(static_cast<std::size_t>(n), '\0');
    file.seekg(static_cast<std::streamoff>(from));
    file.read(bytes.data(), static_cast<std::streamsize>(n));
    for (const char c : bytes.substr(0, static_cast<std::size_t>(file.gcount()))) {
      hash = (hash ^ static_cast<unsigned char>(c)) * 1099511628211ull;
    }
    file.clear();
  };
  take(0, std::min<std::uint64_t>(size, kFingerprintBytes));
  if (size > kFingerprintBytes)
    take(std::max<std::uint64_t>(size - kFingerprintBytes, kFingerprintBytes),
         std::min<std::uint64_t>(size - kFingerprintBytes, kFingerprintBytes));
  const std::string id = std::to_string(size) + " bytes, fingerprint " + hex64(hash);
  return {id, path + " (" + id + ")"};
}

std::string output_key(const std::string& path) {
  if (path.empty()) return "";
  std::error_code ec;
  const std::filesystem::path abs = std::filesystem::absolute(path, ec);
  return (ec ? std::filesystem::path(path) : abs).lexically_normal().string();
}

std::string shortest(double x) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, x);
  return std::string(buf, r.ptr);
}

void add_value(OptionList& l, const std::string& option, const std::string& value) {
  l.push_back({option, value, value});
}
void add_input(OptionList& l, const std::string& option, const std::string& path) {
  auto [key, shown] = input_identity(path);
  l.push_back({option, key, shown});
}
void add_output(OptionList& l, const std::string& option, const std::string& path) {
  l.push_back({option, output_key(path), path.empty() ? "(not given)" : path});
}

// The options of forward and backward alike (InputFiles), per-rank ones left out.
OptionList common_options(const std::string& subcommand, const InputFiles& in) {
  OptionList l;
  add_value(l, "the subcommand", subcommand);
  add_value(l, "--gate", std::string(gate_name(parse_gate(in.gate, "--gate"))));
  add_value(l, "--eps", shortest(in.eps));
  add_value(l, "--no-normalize", in.no_normalize ? "given" : "not given");
  add_value(l, "--check-finite", in.check_finite ? "given" : "not given");
  const auto dt = as_dtype(in);
  add_value(l, "--dtype", dt ? std::string(dtype_name(*dt)) : "(not given)");
  add_value(l, "--kernel", in.kernel_option && in.kernel_option->count() > 0 ? in.kernel : "(not given)");
  add_value(l, "--chunk-size", in.chunk_size == kAutoChunk ? "auto" : std::to_string(in.chunk_size));
  for (const NamedPath& input : input_paths(in)) add_input(l, input.option, input.path);
  return l;
}

// "1e-06 on rank 0, 0.01 on rank 1" (ranks with one value together: "... on ranks 0, 2; ... on rank 1").
std::string values_by_rank(const std::vector<OptionList>& all, std::size_t at) {
  std::vector<std::pair<std::string, std::vector<int>>> groups;  // key's shown value, its ranks
  std::vector<std::string> keys;
  for (std::size_t r = 0; r < all.size(); ++r) {
    if (at >= all[r].size()) continue;
    const auto& e = all[r][at];
    std::size_t g = 0;
    while (g < keys.size() && keys[g] != e[1]) ++g;
    if (g == keys.size()) {
      keys.push_back(e[1]);
      groups.push_back({e[2], {}});
    }
    groups[g].second.push_back(static_cast<int>(r));
  }
  bool plural = false;
  for (const auto& g : groups) plural = plural || g.second.size() > 1;
  std::string text;
  for (const auto& [shown, ranks] : groups) {
    if (!text.empty()) text += plural ? "; " : ", ";
    text += shown + (ranks.size() > 1 ? " on ranks " : " on rank ");
    for (std::size_t j = 0; j < ranks.size(); ++j) text += (j > 0 ? ", " : "") + std::to_string(ranks[j]);
  }
  return text;
}

// Strings in one string and back (length-prefixed: any bytes, a path's included).
std::string packed(const std::vector<std::string>& fields) {
  std::string s;
  for (const auto& f : fields) s += std::to_string(f.size()) + ":" + f;
  return s;
}
std::vector<std::string> unpacked(const std::string& s) {
  std::vector<std::string> fields;
  for (std::size_t at = 0; at < s.size();) {
    const std::size_t colon = s.find(':', at);
    const std::size_t n = std::stoull(s.substr(at, colon - at));
    fields.push_back(s.substr(colon + 1, n));
    at = colon + 1 + n;
  }
  return fields;
}

// One collective round (all_gather of every rank's description); RankFailed (exit code 2, naming the option and
// the ranks) on every rank at the first option they do not agree on. A rank that could not describe its options
// (an exception) is the failure every rank reports instead.
void agree_on_options(const std::function<OptionList()>& describe) {
  std::vector<std::string> mine;  // "0", then option, key, shown of each; or the exit code, argument and message
  try {
    mine = {"0"};
    for (const auto& e : describe()) mine.insert(mine.end(), e.begin(), e.end());
  } catch (const InvalidArgument& e) {  // its options are parsed and checked already: named as the user's (--gate)
    mine = {"2", e.argument(), e.what()};
  } catch (const std::exception& e) {
    mine = {"1", "", e.what()};
  }
  const std::vector<std::string> gathered = dist::all_gather(MPI_COMM_WORLD, packed(mine));
  std::vector<OptionList> all;
  for (std::size_t r = 0; r < gathered.size(); ++r) {
    const std::vector<std::string> f = unpacked(gathered[r]);
    if (f.at(0) != "0") throw dist::RankFailed(static_cast<int>(r), std::stoi(f.at(0)), f.at(1), f.at(2));
    OptionList l;
    for (std::size_t j = 1; j + 2 < f.size(); j += 3) l.push_back({f[j], f[j + 1], f[j + 2]});
    all.push_back(std::move(l));
  }
  const OptionList& first = all.front();
  for (std::size_t at = 0; at < first.size(); ++at) {
    for (std::size_t r = 1; r < all.size(); ++r) {
      // forward's and backward's lists differ in length: they differ at the subcommand, the first entry, already
      if (at < all[r].size() && all[r][at][0] == first[at][0] && all[r][at][1] == first[at][1]) continue;
      const std::string option = first[at][0];
      throw dist::RankFailed(static_cast<int>(r), 2, option,
                             option + " differs between ranks: " + values_by_rank(all, at));
    }
  }
}

// A rank's refusal of the user's input names the option (--c0), not the library's argument (c0).
[[noreturn]] void rethrow_with_options(const dist::RankFailed& e) {
  const std::string& a = e.argument();
  if (e.exit_code() != 2 || a.empty() || e.message().compare(0, a.size() + 2, a + ": ") != 0) throw e;
  try {
    rethrow_as_cli(InvalidArgument(a, e.message().substr(a.size() + 2)));
  } catch (const InvalidArgument& named) {
    throw dist::RankFailed(e.rank(), 2, named.argument(), named.what());
  }
}

// "rank r: device, device" for every rank, in rank order.
std::vector<std::string> devices_of_ranks(dist::MpiRunner& runner) {
  std::string mine;
  for (const auto& d : runner.local().last_plan().devices) mine += (mine.empty() ? "" : ", ") + d;
  std::vector<std::string> all = dist::all_gather(runner.comm(), mine);
  for (std::size_t r = 0; r < all.size(); ++r)
    all[r] = "rank " + std::to_string(r) + ": " + (all[r].empty() ? "no tokens (more ranks than chunks)" : all[r]);
  return all;
}

json shards_of(const InputHeaders& hdr, const MlstmOptions& o, int size) {
  json shards = json::array();
  for (int r = 0; r < size; ++r) {
    const auto [a, b] = dist::shard_of(hdr.S, o.chunk_size, r, size);
    shards.push_back({a, b});
  }
  return shards;
}

// The devices of this rank's graph, opened on every rank before the runner (its constructor is collective).
std::unique_ptr<dist::MpiRunner> open_runner(const InputFiles& in) {
  std::vector<std::shared_ptr<ComputeDevice>> devices;
  dist::collectively(MPI_COMM_WORLD, [&] {
    try {
      devices = devices_from_spec(in.devices);
    } catch (const InvalidArgument& e) {
      rethrow_as_cli(e);
    }
  });
  auto runner = std::make_unique<dist::MpiRunner>(MPI_COMM_WORLD, std::move(devices));
  runner->local().set_balancing(balancing_of(in));
  return runner;
}

// An automatic chunk size, agreed by every rank before the shards are cut (in whole chunks): rank 0's devices'
// choice for the whole problem (a collective call).
void agree_on_chunk(dist::MpiRunner& runner, MlstmOptions& o, const InputHeaders& hdr) {
  if (o.chunk_size != kAutoChunk) return;
  ProblemShape p;
  p.B = hdr.B;
  p.NH = hdr.NH;
  p.S = hdr.S;
  p.DHQK = hdr.DK;
  p.DHHV = hdr.DV;
  p.dtype = hdr.dtype;
  const std::string mine = std::to_string(runner.local().with_chunk(o, p).chunk_size);
  o.chunk_size = std::stoll(dist::all_gather(runner.comm(), mine).front());
}

}  // namespace

int cmd_forward_mpi(const InputFiles& given, const ForwardOutputs& out, const ForwardStreaming& st, bool as_json) {
  agree_on_options([&] {
    OptionList l = common_options("forward", given);
    add_value(l, "--stream-tokens", std::to_string(st.tokens));
    add_value(l, "--resume", st.resume ? "given" : "not given");
    for (const NamedPath& output : output_paths(out)) add_output(l, output.option, output.path);
    return l;
  });
  MlstmOptions o;
  InputFiles in;
  InputHeaders hdr;
  dist::collectively(MPI_COMM_WORLD, [&] {
    if (st.tokens > 0 || st.resume) {
      throw InvalidArgument(st.tokens > 0 ? "--stream-tokens" : "--resume",
                            "under mpirun every rank reads only its own shard; leave it out");
    }
    in = distributed_inputs(given);
    o = options_of(in, kernel_info(in.kernel, false));
    o.return_last_states = !out.c.empty() || !out.n.empty() || !out.m.empty();
    check_outputs(input_paths(in), {{"--out", out.h}, {"--out-c", out.c}, {"--out-n", out.n}, {"--out-m", out.m}});
    hdr = read_input_headers(in);
  });
  auto runner = open_runner(in);
  agree_on_chunk(*runner, o, hdr);
  const int rank = runner->rank(), size = runner->size();
  Shard shard;
  runner->collectively([&] {
    try {
      shard = read_shard(in, hdr, o, rank, size, memory_limit_of(st));
      if (in.check_finite) check_finite(shard.inputs.args());
    } catch (const InvalidArgument& e) {
      rethrow_as_cli(e);
    }
  });
  const auto t0 = Clock::now();
  ForwardResult r;
  try {
    r = runner->forward(shard.inputs.args(), o);
  } catch (const dist::RankFailed& e) {
    rethrow_with_options(e);
  }
  const double secs = dist::max_over_ranks(runner->comm(), std::chrono::duration<double>(Clock::now() - t0).count());
  const double exchange = dist::max_over_ranks(runner->comm(), runner->last_exchange().seconds);
  SharedOutput h(*runner, "--out", out.h, {hdr.B, hdr.NH, hdr.S, hdr.DV}, hdr.dtype);
  h.write(shard.t0, r.h);
  runner->collectively([&] {
    if (rank != size - 1) return;  // the last rank holds the sequence's last state
    OutputFiles files;
    files.add("--out-c", out.c, r.c);
    files.add("--out-n", out.n, r.n);
    files.add("--out-m", out.m, r.m);
    files.commit();
  });
  h.commit();
  const std::vector<std::string> devices = devices_of_ranks(*runner);
  if (rank != 0) return 0;
  if (as_json) {
    std::cout << json{{"command", "forward"},
                      {"kernel", "flow-graph"},
                      {"ranks", size},
                      {"shards", shards_of(hdr, o, size)},
                      {"chunk_size", o.chunk_size},
                      {"devices", devices},
                      {"balancing", graph::balancing_name(runner->local().balancing())},
                      {"shape_h", Shape{hdr.B, hdr.NH, hdr.S, hdr.DV}},
                      {"dtype", dtype_name(hdr.dtype)},
                      {"seconds", secs},
                      {"exchange_seconds", exchange},
                      {"exchange_bytes_per_rank", runner->last_exchange().bytes},
                      {"peak_rss_mib_rank0", peak_rss_mib()}}
                     .dump()
              << "\n";
  } else {
    std::cout << "forward: " << size << " MPI ranks, flow graph over " << in.devices << " on each, h "
              << shape_to_string({hdr.B, hdr.NH, hdr.S, hdr.DV}) << " " << dtype_name(hdr.dtype) << " -> " << out.h
              << " (" << secs * 1e3 << " ms, exchange " << exchange * 1e3 << " ms)\n";
  }
  return 0;
}

int cmd_backward_mpi(const InputFiles& given, const BackwardFiles& bf, bool as_json) {
  agree_on_options([&] {
    OptionList l = common_options("backward", given);
    for (const NamedPath& input : gradient_input_paths(bf)) add_input(l, input.option, input.path);
    for (const NamedPath& output : gradient_output_paths(bf)) add_output(l, output.option, output.path);
    return l;
  });
  MlstmOptions o;
  InputFiles in;
  InputHeaders hdr;
  dist::collectively(MPI_COMM_WORLD, [&] {
    in = distributed_inputs(given);
    o = options_of(in, kernel_info(in.kernel, false));
    check_backward_files(in, bf);
    hdr = read_input_headers(in);
    const auto dh = npy::read_header(bf.dh, "--dh", as_dtype(in), false);
    if (dh.first != Shape{hdr.B, hdr.NH, hdr.S, hdr.DV}) {
      throw InvalidArgument("--dh", "expected (B,NH,S,DHHV) = " + shape_to_string({hdr.B, hdr.NH, hdr.S, hdr.DV}) +
                                        " as h, got " + shape_to_string(dh.first));
    }
  });
  auto runner = open_runner(in);
  agree_on_chunk(*runner, o, hdr);
  const int rank = runner->rank(), size = runner->size();
  Shard shard;
  BackwardInputs l;
  runner->collectively([&] {
    try {
      ForwardStreaming none;
      shard = read_shard(in, hdr, o, rank, size, memory_limit_of(none));
      static_cast<ForwardInputs&>(l) = std::move(shard.inputs);
      l.dh = npy::SeqSliceReader(bf.dh, "--dh", as_dtype(in), 2, false).read(shard.t0, shard.t1);
      if (rank == size - 1) {  // the gradient of the last state enters the last shard only
        l.dc_last = read_optional(bf.dc, "--dc", as_dtype(in));
        l.dn_last = read_optional(bf.dn, "--dn", as_dtype(in));
      }
      if (in.check_finite) {
        check_finite(l.args());
        check_finite(l.dh.view(), "dh");
        check_finite(l.dc_last.view(), "dc_last");
        check_finite(l.dn_last.view(), "dn_last");
      }
    } catch (const InvalidArgument& e) {
      rethrow_as_cli(e);
    }
  });
  const auto t0 = Clock::now();
  BackwardResult g;
  try {
    g = runner->backward(l.backward_args(), o);
  } catch (const dist::RankFailed& e) {
    rethrow_with_options(e);
  }
  const double secs = dist::max_over_ranks(runner->comm(), std::chrono::duration<double>(Clock::now() - t0).count());
  const double exchange = dist::max_over_ranks(runner->comm(), runner->last_exchange().seconds);
  const DType dt = hdr.dtype;
  SharedOutput dq(*runner, "--out-dq", bf.out_dq, {hdr.B, hdr.NH, hdr.S, hdr.DK}, dt),
      dk(*runner, "--out-dk", bf.out_dk, {hdr.B, hdr.NH, hdr.S, hdr.DK}, dt),
      dv(*runner, "--out-dv", bf.out_dv, {hdr.B, hdr.NH, hdr.S, hdr.DV}, dt),
      di(*runner, "--out-di", bf.out_di, {hdr.B, hdr.NH, hdr.S}, g.di.empty() ? dt : g.di.dtype()),
      df(*runner, "--out-df", bf.out_df, {hdr.B, hdr.NH, hdr.S}, g.df.empty() ? dt : g.df.dtype());
  dq.write(shard.t0, g.dq);
  dk.write(shard.t0, g.dk);
  dv.write(shard.t0, g.dv);
  di.write(shard.t0, g.di);
  df.write(shard.t0, g.df);
  runner->collectively([&] {
    if (rank != 0) return;  // the initial state's gradients come out of the first shard
    OutputFiles files;
    files.add("--out-dc0", bf.out_dc0, g.dc0);
    files.add("--out-dn0", bf.out_dn0, g.dn0);
    files.add("--out-dm0", bf.out_dm0, g.dm0);
    files.commit();
  });
  for (SharedOutput* o2 : {&dq, &dk, &dv, &di, &df}) o2->commit();
  const std::vector<std::string> devices = devices_of_ranks(*runner);
  if (rank != 0) return 0;
  if (as_json) {
    std::cout << json{{"command", "backward"},
                      {"kernel", "flow-graph"},
                      {"ranks", size},
                      {"shards", shards_of(hdr, o, size)},
                      {"chunk_size", o.chunk_size},
                      {"devices", devices},
                      {"balancing", graph::balancing_name(runner->local().balancing())},
                      {"seconds", secs},
                      {"exchange_seconds", exchange},
                      {"exchange_bytes_per_rank", runner->last_exchange().bytes},
                      {"initial_state_gradients", !g.dc0.empty()}}
                     .dump()
              << "\n";
  } else {
    std::cout << "backward: " << size << " MPI ranks, flow graph over " << in.devices << " on each (" << secs * 1e3
              << " ms, exchange " << exchange * 1e3 << " ms)\n";
  }
  return 0;
}

}  // namespace mlstm::cli

#endif  // MLSTM_HAVE_MPI
