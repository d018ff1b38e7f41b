// mlstm: the command line of mlstm-flow.
//   mlstm run | forward | backward | step | kernels | devices | bench   (--help on each)
// Bad input: one line on stderr naming the argument, exit code 2. Other failures: exit code 1.
// This file: the CLI11 setup and the exit codes; the subcommands are in commands.hpp, the conventions in cli.hpp.
#include <poll.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <memory>
#include <optional>
#include <string>

#include "commands.hpp"
#ifdef MLSTM_HAVE_MPI
#include "mlstm/dist/mpi_runner.hpp"
#endif

using namespace mlstm;
using namespace mlstm::cli;

// Messages are one line on stderr (a library message may hold line breaks, e.g. an OpenCL build log).
static std::string one_line(std::string text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
  std::replace(text.begin(), text.end(), '\n', ' ');
  std::replace(text.begin(), text.end(), '\r', ' ');
  return text;
}

// What a parse error was about, in the command line's own order (CLI11 lists extras last first, and says "A
// subcommand is required" for a word that is not one): the first unknown subcommand, unknown option or stray
// argument; "" when none is found (then CLI11's message stands).
static std::string parse_culprit(const CLI::App& app, int argc, char** argv) {
  const CLI::App* at = &app;  // the command whose options the next tokens are
  std::string command = "mlstm";
  for (int j = 1; j < argc; ++j) {
    const std::string token = argv[j];
    if (token == "--") break;
    if (token.size() > 1 && token[0] == '-') {
      const std::string name = token.substr(0, token.find('='));
      const CLI::Option* option = at->get_option_no_throw(name);  // mlstm's own options only before the subcommand
      if (option == nullptr) return "unknown option '" + name + "'" + (at == &app ? "" : " of " + command);
      if (token.find('=') == std::string::npos && option->get_expected_min() > 0) {
        j += std::max(1, option->get_expected_max() > 1 ? 1 : option->get_expected_min());
        // a list option takes the words up to the next option
        if (option->get_expected_max() > 1)
          while (j + 1 < argc && argv[j + 1][0] != '-') ++j;
      }
      continue;
    }
    if (at == &app) {
      const CLI::App* sub = nullptr;
      std::string names;
      for (const CLI::App* c : app.get_subcommands({})) {
        if (c->get_name() == token) sub = c;
        names += (names.empty() ? "" : ", ") + c->get_name();
      }
      if (sub == nullptr) return "unknown subcommand '" + token + "' (one of " + names + ")";
      at = sub;
      command = "mlstm " + token;
      continue;
    }
    return "unexpected argument '" + token + "' to " + command;
  }
  return "";
}

static int stdout_checked(int code);

// The command line parsed and the subcommand run; its exit code (main checks stdout after it; under mpirun, rank 0
// checks it here, before the ranks agree on one exit code).
static int run_mlstm(int argc, char** argv) {
  // Log lines go to stderr: stdout carries only the command's output (--json's one object).
  spdlog::set_default_logger(spdlog::stderr_logger_mt("mlstm"));
  // Under mpirun with several ranks, forward and backward are distributed (distributed.cpp); messages come from
  // rank 0 only, every rank exits with the same code.
#ifdef MLSTM_HAVE_MPI
  std::unique_ptr<MpiSession> mpi;
  if (launched_by_mpi()) mpi = std::make_unique<MpiSession>(argc, argv);
  const int world_rank = mpi ? mpi->rank() : 0, world_size = mpi ? mpi->size() : 1;
#else
  if (launched_by_mpi() && launcher_size() > 1) {
    if (launcher_rank() == 0) {
      std::fprintf(stderr,
                   "mlstm: error: started by an MPI launcher with %d ranks, but this mlstm was built without MPI "
                   "(scripts/install-deps.sh installs Open MPI; then rebuild)\n",
                   launcher_size());
    }
    return 2;
  }
  const int world_rank = 0, world_size = 1;
#endif
  const bool speaks = world_rank == 0;
  CLI::App app{std::string("mlstm: the mLSTM cell over very long sequences (mlstm-flow " MLSTM_VERSION ", ") +
               git_revision() + ")"};
  app.require_subcommand(1);
  std::string log_level = "warn";
  bool as_json = false;
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, off")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));
  app.add_flag("--json", as_json, "machine-readable output (JSON)");

  RunOptions ro;
  auto* run = app.add_subcommand(
      "run", "the main job: a long synthetic sequence streamed through the flow graph on every usable device");
  run->add_option("--batch", ro.batch, "B");
  run->add_option("--heads", ro.heads, "NH");
  run->add_option("--seq-len", ro.seq_len, "S (tokens per batch row)");
  run->add_option("--dqk", ro.dqk, "DHQK");
  run->add_option("--dhv", ro.dhv, "DHHV");
  run->add_option("--dtype", ro.dtype, "float32, float16, bfloat16");
  add_chunk_size_option(run, ro.chunk_size);
  ro.piece_option = run->add_option("--piece", ro.piece, "tokens per streamed piece (not with --mode resident)");
  run->add_option("--devices", ro.devices,
                  "devices: auto (CPU workers + OpenCL GPUs), workers, an OpenCL spec (gpu:all, 0,1, cpu), or a+b");
  run->add_option("--balancing", ro.balancing,
                  "how the graph over the devices shares each piece, when the stream measured it fastest: calibrated "
                  "(shares by measured speed, cached; the default), pull (free devices pull segments) or fastest (as "
                  "pull: the stream always measures each device alone against the graph)")
      ->check(CLI::IsMember({"pull", "calibrated", "fastest"}));
  run->add_option(
         "--mode", ro.mode,
         "stream (= auto: pieces through the measured-fastest engine), pipeline (the same, refused unless a GPU "
         "streams through pinned staging) or resident (one piece)")
      ->check(CLI::IsMember({"auto", "pipeline", "stream", "resident"}));
  run->add_flag("--backward", ro.backward, "forward + backward");
  run->add_flag("--progress", ro.progress, "progress bar even when stderr is not a terminal");
  ro.check_tokens_option = run->add_option(
      "--check-tokens", ro.check_tokens,
      "the first tokens of the sequence spot-checked against the float64 reference, gathered across pieces (0: none; "
      "at most --seq-len; default 2048, or the first piece where that is shorter)");

  InputFiles fin;
  ForwardOutputs fout;
  auto* forward = app.add_subcommand(
      "forward", "forward pass on .npy inputs (under mpirun -np N: every rank one shard of the sequence)");
  add_input_options(forward, fin, true);
  forward->add_option("--out", fout.h, "h output .npy (input dtype)")->required()->check(path_check());
  forward->add_option("--out-c", fout.c, "last C output .npy")->check(path_check());
  forward->add_option("--out-n", fout.n, "last n output .npy")->check(path_check());
  forward->add_option("--out-m", fout.m, "last m output .npy")->check(path_check());
  ForwardStreaming fstream;
  forward
      ->add_option("--stream-tokens", fstream.tokens,
                   "stream the .npy inputs in slices of this many tokens (pread, reads overlapping compute; from "
                   "16384 up a fresh run's first slice is an eighth of it, for an early first token), writing h "
                   "incrementally: memory stays flat whatever S; resumable with --resume")
      ->check(positive_count_check());
  forward->add_flag("--resume", fstream.resume,
                    "continue a killed --stream-tokens run from its progress record (.<out>.progress) and partial "
                    "h (.<out>.partial): same options and inputs, h bit for bit that of an uninterrupted run");
  forward
      ->add_option("--memory-limit", fstream.memory_limit,
                   "bytes a forward may hold (default: this machine's memory): whole arrays above it are "
                   "refused (use --stream-tokens), and so is a --stream-tokens whose slices exceed it")
      ->check(positive_count_check());

  InputFiles bin;
  BackwardFiles bfiles;
  auto* backward = app.add_subcommand(
      "backward", "backward pass on .npy inputs (under mpirun -np N: every rank one shard of the sequence)");
  add_input_options(backward, bin, true);
  backward->add_option("--dh", bfiles.dh, "gradient of h .npy (B,NH,S,DHHV)")->required()->check(path_check());
  backward->add_option("--dc", bfiles.dc, "gradient of the last C .npy")->check(path_check());
  backward->add_option("--dn", bfiles.dn, "gradient of the last n .npy")->check(path_check());
  backward->add_option("--out-dq", bfiles.out_dq, "dq output .npy")->check(path_check());
  backward->add_option("--out-dk", bfiles.out_dk, "dk output .npy")->check(path_check());
  backward->add_option("--out-dv", bfiles.out_dv, "dv output .npy")->check(path_check());
  backward->add_option("--out-di", bfiles.out_di, "di output .npy")->check(path_check());
  backward->add_option("--out-df", bfiles.out_df, "df output .npy")->check(path_check());
  backward->add_option("--out-dc0", bfiles.out_dc0, "initial C gradient .npy")->check(path_check());
  backward->add_option("--out-dn0", bfiles.out_dn0, "initial n gradient .npy")->check(path_check());
  backward->add_option("--out-dm0", bfiles.out_dm0, "initial m gradient .npy")->check(path_check());

  InputFiles sin;
  StepFiles sfiles;
  auto* step = app.add_subcommand("step", "one recurrent step on .npy inputs");
  add_input_options(step, sin, false);
  step->add_option("--c", sfiles.c, "state C .npy (B,NH,DHQK,DHHV)")->check(path_check());
  step->add_option("--n", sfiles.n, "state n .npy (B,NH,DHQK)")->check(path_check());
  step->add_option("--m", sfiles.m, "state m .npy (B,NH)")->check(path_check());
  step->add_option("--out", sfiles.out_h, "h output .npy (B,NH,DHHV)")->required()->check(path_check());
  step->add_option("--out-c", sfiles.out_c, "new C .npy")->check(path_check());
  step->add_option("--out-n", sfiles.out_n, "new n .npy")->check(path_check());
  step->add_option("--out-m", sfiles.out_m, "new m .npy")->check(path_check());

  auto* kernels = app.add_subcommand("kernels", "list the kernel registry");
  auto* devices = app.add_subcommand("devices", "list OpenCL devices and NUMA nodes");
  std::string open_spec;
  devices
      ->add_option("--open", open_spec,
                   "open the devices of this spec (OpenCL contexts and queues, CPU workers) and report how long after "
                   "the process started they were open: the start-up floor under a run's first token")
      ->check(CLI::Validator(
          [](std::string& spec) { return spec.empty() ? std::string("empty device spec") : std::string(); }, "SPEC"));

  BenchOptions bo;
  auto* bench = app.add_subcommand(
      "bench", "constant-token sweep (TFLA paper style), or with --system the system benchmark, to CSV and JSON");
  bench->add_option("--tokens", bo.tokens, "B*S, fixed across the sweep");
  bench->add_option("--heads", bo.heads, "NH");
  bench->add_option("--dqk", bo.dqk, "DHQK");
  bench->add_option("--dhv", bo.dhv, "DHHV");
  bench->add_option("--seq-lens", bo.seq_lens, "sequence lengths");
  bench->add_option("--chunk-sizes", bo.chunk_sizes, "chunk sizes (--system: one, default 128)");
  bench->add_option("--kernels", bo.kernels, "kernels");
  bench->add_option("--dtype", bo.dtype, "input dtype (--system: default bfloat16)");
  bench->add_option("--repeats", bo.repeats, "timed repeats (median)");
  bench->add_flag("--backward", bo.backward, "also time forward+backward");
  bench->add_option("--head-dims", bo.head_dims, "also sweep DHQK = DHHV over these values");
  bench->add_option("--graph-devices", bo.graph_devices,
                    "also run each device spec (strong and weak scaling), e.g. workers 0 0,1: device-resident "
                    "(OpenCL specs; rows resident[...]) and through the flow graph from host memory (graph[...])");
  bench->add_option("--weak-seq-len", bo.weak_seq_len,
                    "tokens per device for the weak-scaling rows of --graph-devices (default: the largest --seq-lens)");
  bench->add_option("--csv", bo.csv, "CSV output path (--system: default bench_system.csv)")->check(path_check());
  bench->add_option("--json-out", bo.json_out, "JSON output path (--system: default bench_system.json)")
      ->check(path_check());
  BenchSystemOptions& sys = bo.system;
  bench->add_flag("--system", sys.enabled,
                  "the system benchmark (README \"Performance\"): forward from host memory (C++ and Python), from "
                  ".npy files through the CLI, forward+backward, CPU workers + GPU, peak RSS and start-up, each as a "
                  "ratio against the transfer, kernel and file-read bounds measured in the same run");
  bench->add_option("--system-problems", sys.problems, "with --system: NHxDHQKxDHHV,... (default 4x128x128,16x128x256)")
      ->delimiter(',');
  bench->add_option("--system-tokens", sys.tokens, "with --system: sequence lengths, B = 1 (default 1048576,8388608)")
      ->delimiter(',');
  bench->add_option("--system-stream-tokens", sys.stream_tokens,
                    "with --system: slices of the CLI run (forward --stream-tokens), pieces of streamed runs (65536)");
  bench->add_option("--devices", sys.devices, "with --system: the OpenCL devices of the GPU side (default gpu:all)");
  bench->add_option("--workdir", sys.workdir,
                    "with --system: where the .npy files go, in a temporary directory removed at the end (default "
                    "$TMPDIR, else /tmp)");
  bench->add_option("--memory-limit", sys.memory_limit,
                    "with --system: bytes the runs may hold (default: the memory available); a size above it is "
                    "streamed or skipped, as its row says");
  for (CLI::Option* option : bench->get_options()) bo.options[option->get_name()] = option;  // given or default
  decimal_integers_only(&app);  // every integer option of every subcommand: "010" is 10, "0x10" refused

  // A parse that ends the run (--help, a parse error) gives its exit code and, for an error, its message.
  std::optional<int> stop;
  std::string parse_message;
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    stop = speaks ? app.exit(e) : e.get_exit_code();
  } catch (const CLI::CallForAllHelp& e) {
    stop = speaks ? app.exit(e) : e.get_exit_code();
  } catch (const CLI::ParseError& e) {
    // An unknown word is named as the user wrote it (also where CLI11 first saw a required option missing: the word
    // is the likelier slip); other parse errors (a value out of its set, a missing option) in CLI11's words.
    const bool about_words =
        dynamic_cast<const CLI::ExtrasError*>(&e) != nullptr || dynamic_cast<const CLI::RequiredError*>(&e) != nullptr;
    const std::string culprit = about_words ? parse_culprit(app, argc, argv) : std::string();
    parse_message = (culprit.empty() ? one_line(e.what()) : culprit) + " (see --help)";
    stop = 2;
  }
#ifdef MLSTM_HAVE_MPI
  if (world_size > 1) {
    // One collective before any other: a rank that stops here, or runs a subcommand that is not distributed while
    // the others run forward or backward, would leave them waiting in their first collective step for good. Each
    // rank says what it does (0 forward or backward, 1 another subcommand, 2 it stops); rank 0's word goes to all.
    const int mine = stop ? 2 : (*forward || *backward) ? 0 : 1;
    int words[2] = {mine, -mine}, most[2] = {0, 0}, first = mine;
    MPI_Allreduce(words, most, 2, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Bcast(&first, 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (most[0] != -most[1] || stop) {
      // Rank 0 speaks for itself when it stopped, else each rank that stopped names itself (one line each; the
      // others stop without a word), and rank 0 names a mismatch of subcommands.
      if (!parse_message.empty() && (speaks || first != 2)) {
        const std::string who = speaks ? "" : "rank " + std::to_string(world_rank) + ": ";
        std::fprintf(stderr, "mlstm: error: %s%s\n", who.c_str(), parse_message.c_str());
      }
      if (speaks && most[0] == 1) {  // nobody stopped: some ranks run another subcommand
        std::fprintf(stderr,
                     "mlstm: error: the ranks run different subcommands; under mpirun every rank runs the same "
                     "forward or backward\n");
      }
      return stop.value_or(2);
    }
  }
#endif
  if (stop) {
    if (!parse_message.empty() && speaks) std::fprintf(stderr, "mlstm: error: %s\n", parse_message.c_str());
    return *stop;
  }
  spdlog::set_level(spdlog::level::from_str(log_level));
  try {
#ifdef MLSTM_HAVE_MPI
    if (world_size > 1) {
      int code = 2;
      try {
        if (*forward) {
          code = cmd_forward_mpi(fin, fout, fstream, as_json);
        } else if (*backward) {
          code = cmd_backward_mpi(bin, bfiles, as_json);
        } else if (speaks) {
          std::fprintf(stderr,
                       "mlstm: error: %s runs in one process; under mpirun only forward and backward are "
                       "distributed\n",
                       app.get_subcommands().front()->get_name().c_str());
        }
      } catch (const dist::RankFailed& e) {
        if (speaks) {
          std::fprintf(stderr, "mlstm: %s: %s\n", e.exit_code() == 2 ? "error" : "failed", one_line(e.what()).c_str());
        }
        code = e.exit_code();
      } catch (const std::exception& e) {
        // Outside the collective steps: this rank alone knows; ending every rank is the only way not to hang one.
        std::fprintf(stderr, "mlstm: failed: rank %d: %s\n", world_rank, one_line(e.what()).c_str());
        MPI_Abort(MPI_COMM_WORLD, 1);
      }
      // Every rank exits with one code: a report lost on rank 0's stdout (the only rank that writes there) fails
      // them all, not rank 0 alone.
      if (speaks) code = stdout_checked(code);
      MPI_Bcast(&code, 1, MPI_INT, 0, MPI_COMM_WORLD);
      return code;
    }
#endif
    if (*run) {
      try {
        return cmd_run(ro, as_json);
      } catch (const InvalidArgument& e) {
        rethrow_as_cli(e, {{"devices", "--devices"}, {"chunk_size", "--chunk-size"}, {"mode", "--mode"}});
      }
    }
    if (*forward) return cmd_forward(fin, fout, fstream, as_json);
    if (*backward) return cmd_backward(bin, bfiles, as_json);
    if (*step) return cmd_step(sin, sfiles, as_json);
    if (*kernels) return cmd_kernels(as_json);
    if (*devices) {
      try {
        return cmd_devices(as_json, open_spec);
      } catch (const InvalidArgument& e) {
        rethrow_as_cli(e, {{"devices", "--open"}});
      }
    }
    if (*bench) return sys.enabled ? cmd_bench_system(bo, as_json) : cmd_bench(bo, as_json);
  } catch (const InvalidArgument& e) {
    std::fprintf(stderr, "mlstm: error: %s\n", one_line(e.what()).c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mlstm: failed: %s\n", one_line(e.what()).c_str());
    return 1;
  }
  return 0;
}

// Why a write to stdout failed before the final flush (its errno is long gone): a pipe or socket whose reader is
// gone says so (POLLERR, POLLHUP on the writing end): EPIPE; otherwise 0 (unknown).
static int earlier_stdout_failure() {
  struct stat st {};
  if (::fstat(STDOUT_FILENO, &st) != 0 || !(S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode))) return 0;
  pollfd out{STDOUT_FILENO, POLLOUT, 0};
  return ::poll(&out, 1, 0) == 1 && (out.revents & (POLLERR | POLLHUP)) != 0 ? EPIPE : 0;
}

// stdout carries the command's report (--json's object, a listing, bench's rows): a report lost on the way (a full
// disk, a reader that closed its end of the pipe) is a failure, never exit code 0. Output goes through std::cout
// (nlohmann's dump too) and printf; with sync_with_stdio (never turned off) both go through C's stdout buffer, so
// flushing both and asking each stream whether a write failed covers every write of the run. The .npy outputs are
// written and committed by then; only the report is at stake. An earlier nonzero exit code stands.
static int stdout_checked(int code) {
  errno = 0;
  int reason = std::fflush(stdout) != 0 ? errno : 0;  // C's buffer, which std::cout writes through (sync_with_stdio)
  errno = 0;
  std::cout.flush();
  if (reason == 0 && std::cout.bad()) reason = errno;
  if (std::ferror(stdout) == 0 && !std::cout.fail()) return code;
  if (code != 0) return code;
  if (reason == 0) reason = earlier_stdout_failure();
  // Only rank 0 of an MPI run writes to stdout (run_mlstm calls this there before MPI ends): another rank never gets
  // here with a failed write.
  std::fprintf(stderr, "mlstm: error: writing the output to stdout failed%s%s\n", reason != 0 ? ": " : "",
               reason != 0 ? std::strerror(reason) : "");
  return 1;
}

int main(int argc, char** argv) {
  // A write to a pipe whose reader is gone fails with EPIPE (reported by stdout_checked, exit code 1) instead of
  // killing the process with SIGPIPE. Children (bench --system's) inherit the disposition: the mlstm CLI ignores it
  // anyway, and their stdout is a file.
  std::signal(SIGPIPE, SIG_IGN);
  return stdout_checked(run_mlstm(argc, argv));
}
