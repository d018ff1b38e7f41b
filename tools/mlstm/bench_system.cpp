// bench --system (issue 14 item 6): in ONE run on one machine, what a user's call through the system achieves,
// each as a ratio against bounds measured in the same run, to a table, CSV and JSON. For every problem
// (--system-problems, B = 1) and size (--system-tokens):
//   bounds  transfer: the problem's bytes over the pinned copy rates (up, down, both at once) of the GPU side;
//           kernel: the device-resident forward (and forward+backward) kernel time, OpenCL events;
//           file read: the .npy inputs read back with pread after posix_fadvise(DONTNEED)
//   runs    forward from host memory through the graph (FlowGraphRunner; StreamSession pieces when the inputs do
//           not fit the memory budget), from Python numpy arrays (a child /usr/bin/python3), from .npy files
//           through this executable's `forward --stream-tokens` (a child process), forward+backward through the
//           graph (from host memory, and from the GPU's page-locked memory with the gradients written there),
//           CPU workers + GPU against the GPU alone, the CLI run's peak RSS at the smallest and largest
//           size, and a second run's start-up to its first token on the program cache the first one filled.
// What cannot fit this machine's memory or disk is a row with "skipped" and the reason, never left out; a
// measurement that fails is a row with "error" (exit code 1 at the end, after the files are written).
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <spawn.h>
#include <spdlog/spdlog.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <tbb/task_group.h>
#include <unistd.h>

#include <CLI/Option.hpp>
#include <algorithm>
#include <bit>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include "commands.hpp"
#include "default_outputs.hpp"
#include "mlstm/core/atomic_file.hpp"
#include "mlstm/core/npy.hpp"
#include "mlstm/core/trace.hpp"
#include "mlstm/devices/opencl/chunkwise_routine.hpp"
#include "mlstm/devices/opencl/copy_probe.hpp"
#include "mlstm/devices/opencl/tc_routine.hpp"

extern char** environ;

namespace mlstm::cli {

namespace {

namespace fs = std::filesystem;

// Options of the sweep that --system does not read, and those only --system reads.
constexpr const char* kSweepOnly[] = {"--tokens",  "--heads",    "--dqk",       "--dhv",           "--seq-lens",
                                      "--kernels", "--backward", "--head-dims", "--graph-devices", "--weak-seq-len"};
constexpr const char* kSystemOnly[] = {"--system-problems", "--system-tokens", "--system-stream-tokens",
                                       "--devices",         "--workdir",       "--memory-limit"};

// The columns of bench_system.csv, and its first line.
constexpr const char* kCsvColumns[] = {"kind",         "id",
                                       "problem",      "NH",
                                       "DHQK",         "DHHV",
                                       "tokens",       "what",
                                       "tokens_per_s", "seconds",
                                       "bound",        "bound_tokens_per_s",
                                       "ratio",        "ratio_vs_file_io",
                                       "target",       "compare",
                                       "pass",         "skipped",
                                       "error",        "note"};
// How bench's CSV begins in every version (ratio_vs_file_io came after "ratio" in session 42): what a file at the
// default path must begin with to be replaced.
constexpr std::string_view kCsvSignature = "kind,id,problem,NH,DHQK,DHHV,tokens,what,";
std::string csv_header() {
  std::string h;
  for (std::size_t j = 0; j < std::size(kCsvColumns); ++j) h += std::string(j ? "," : "") + kCsvColumns[j];
  return h + "\n";
}

struct Problem {
  std::string name;  // "4x128x128"
  std::int64_t NH = 0, DK = 0, DV = 0;
};

// "NHxDHQKxDHHV", each a whole number in [1, kMaxDim].
Problem parse_problem(const std::string& text) {
  Problem p;
  std::int64_t* dims[3] = {&p.NH, &p.DK, &p.DV};
  std::size_t at = 0;
  for (int d = 0; d < 3; ++d) {
    const std::size_t end = d < 2 ? text.find('x', at) : text.size();
    const char* first = text.data() + at;
    const char* last = text.data() + (end == std::string::npos ? text.size() : end);
    const auto [ptr, ec] = std::from_chars(first, last, *dims[d]);
    if (end == std::string::npos || first == last || ec != std::errc() || ptr != last) {
      throw InvalidArgument("--system-problems", "'" + text + "' is not NHxDHQKxDHHV (e.g. 4x128x128)");
    }
    require_range(*dims[d], 1, kMaxDim, "--system-problems");
    at = end + 1;
  }
  p.name = std::to_string(p.NH) + "x" + std::to_string(p.DK) + "x" + std::to_string(p.DV);
  return p;
}

// The checked options of one system run.
struct SystemPlan {
  std::vector<Problem> problems;
  std::vector<std::int64_t> tokens;  // ascending, distinct
  DType dtype = DType::bf16;
  std::int64_t chunk = 128, repeats = 3, stream_tokens = 65536;
  std::uint64_t memory_limit = 0;  // 0: the machine's available memory
  std::string devices, workdir_base, csv, json_out;
  std::vector<opencl::DeviceInfo> gpus;
};

// Every option in range and every combination meaningful, before anything is allocated or measured.
SystemPlan check_system(const BenchOptions& bo) {
  const BenchSystemOptions& so = bo.system;
  SystemPlan p;
  p.dtype = parse_dtype(option_given(bo, "--dtype") ? bo.dtype : "bfloat16", "--dtype");
  if (p.dtype == DType::f64) throw InvalidArgument("--dtype", "takes bfloat16, float16 or float32 with --system");
  if (option_given(bo, "--chunk-sizes")) {
    if (bo.chunk_sizes.size() != 1) throw InvalidArgument("--chunk-sizes", "takes one value with --system");
    p.chunk = bo.chunk_sizes.front();
  }
  require_range(p.chunk, 1, kMaxChunkSize, "--chunk-sizes");
  require_range(bo.repeats, 1, 1000, "--repeats");
  p.repeats = bo.repeats;
  if (so.problems.empty()) throw InvalidArgument("--system-problems", "needs at least one value");
  for (const auto& text : so.problems) p.problems.push_back(parse_problem(text));
  {
    std::vector<std::string> names;  // as parsed ("04x128x128" is 4x128x128)
    for (const Problem& pr : p.problems) names.push_back(pr.name);
    refuse_repeats(names, "--system-problems");
  }
  if (so.tokens.empty()) throw InvalidArgument("--system-tokens", "needs at least one value");
  for (const auto t : so.tokens) require_range(t, 1, kMaxTokens, "--system-tokens");
  refuse_repeats(so.tokens, "--system-tokens");
  p.tokens = so.tokens;
  std::sort(p.tokens.begin(), p.tokens.end());
  require_range(so.stream_tokens, 1, kMaxTokens, "--system-stream-tokens");
  p.stream_tokens = so.stream_tokens;
  if (option_given(bo, "--memory-limit"))
    require_range(so.memory_limit, 1, std::numeric_limits<std::int64_t>::max(), "--memory-limit");
  p.memory_limit = static_cast<std::uint64_t>(so.memory_limit);
  for (const char* name : kSweepOnly) {
    if (option_given(bo, name)) {
      throw InvalidArgument(name,
                            "has no effect with --system (its problems are --system-problems at "
                            "--system-tokens)");
    }
  }
  if (so.devices.empty() || so.devices.find("workers") != std::string::npos ||
      so.devices.find('+') != std::string::npos) {
    throw InvalidArgument("--devices", "'" + so.devices +
                                           "': name the OpenCL devices of the GPU side (gpu:all, 0, 0,1); the "
                                           "workers+GPU row adds the CPU workers itself");
  }
  try {
    p.gpus = opencl::select_devices(so.devices);
  } catch (const InvalidArgument& e) {
    rethrow_as_cli(e, {{"devices", "--devices"}});
  }
  if (p.gpus.empty()) throw InvalidArgument("--devices", "'" + so.devices + "' names no OpenCL device");
  p.devices = so.devices;
  if (option_given(bo, "--workdir")) {
    p.workdir_base = so.workdir;
  } else {
    const char* tmp = std::getenv("TMPDIR");
    p.workdir_base = tmp && *tmp ? tmp : "/tmp";
  }
  std::error_code ec;
  if (!fs::is_directory(p.workdir_base, ec) || ::access(p.workdir_base.c_str(), W_OK | X_OK) != 0) {
    throw InvalidArgument("--workdir", "'" + p.workdir_base + "' is not a writable directory" +
                                           (option_given(bo, "--workdir") ? "" : " (the default: $TMPDIR, else /tmp)"));
  }
  p.csv = option_given(bo, "--csv") ? bo.csv : "bench_system.csv";
  p.json_out = option_given(bo, "--json-out") ? bo.json_out : "bench_system.json";
  check_outputs({}, {{"--csv", p.csv}, {"--json-out", p.json_out}});
  refuse_foreign_default_outputs(bo, p.csv, kCsvSignature, p.json_out, "{\n  \"command\": \"bench --system\"");
  return p;
}

// ---- the machine -------------------------------------------------------------------------------------------

// Bytes of memory this run may use now: what the kernel calls available (free plus reclaimable caches), at
// most --memory-limit.
std::uint64_t memory_budget(const SystemPlan& plan) {
  std::uint64_t available = 0;
  std::ifstream in("/proc/meminfo");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("MemAvailable:", 0) == 0) available = std::stoull(line.substr(13)) * 1024;  // in kB
  }
  if (available == 0) {
    const auto pages = sysconf(_SC_AVPHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    available = pages > 0 && page > 0 ? static_cast<std::uint64_t>(pages) * static_cast<std::uint64_t>(page) : 0;
  }
  return plan.memory_limit > 0 ? std::min(available, plan.memory_limit) : available;
}

std::uint64_t disk_free(const fs::path& dir) {
  struct statvfs s {};
  if (::statvfs(dir.c_str(), &s) != 0) throw Error("statvfs '" + dir.string() + "': " + std::strerror(errno));
  return static_cast<std::uint64_t>(s.f_bavail) * static_cast<std::uint64_t>(s.f_frsize);
}

std::string gib_text(double bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.3g GiB", bytes / static_cast<double>(1ull << 30));
  return text;
}

json machine_of(const SystemPlan& plan) {
  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  json gpus = json::array();
  for (const auto& d : plan.gpus) {
    gpus.push_back({{"index", d.index},
                    {"name", d.name},
                    {"vendor", d.vendor},
                    {"driver", d.driver},
                    {"opencl", d.version},
                    {"platform", d.platform_name + " " + d.platform_version},
                    {"memory_gib", static_cast<double>(d.global_memory) / static_cast<double>(1ull << 30)}});
  }
  const auto pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  return {{"hostname", host},
          {"cpu", cpu_model()},
          {"cores", sysconf(_SC_NPROCESSORS_ONLN)},
          {"memory_gib", static_cast<double>(pages) * static_cast<double>(page) / static_cast<double>(1ull << 30)},
          {"gpus", gpus}};
}

// ---- stopping: signals, the work directory, and those killed runs left ---------------------------------------

// The work directory of a run: <base>/mlstm-bench-system.XXXXXX (mkdtemp), its first file the owner record .owner,
// which says who made it (pid, that process's start time, the boot, the host). A run stopped by SIGINT, SIGTERM or
// SIGHUP removes it before it dies (StopOnSignal); one killed outright (SIGKILL, a crash, power loss) leaves it, and
// the next run in the same base removes the files bench makes there once the owner is gone (sweep_stale_work_dirs).
constexpr char kWorkDirPrefix[] = "mlstm-bench-system.";
constexpr char kOwnerFile[] = ".owner";
constexpr char kOwnerMagic[] = "mlstm bench --system work directory";

// A small text file read whole through a directory descriptor, never through a symbolic link; nullopt when it is not
// a regular file of at most 4 KiB.
std::optional<std::string> read_small_file_at(int dir_fd, const char* name) {
  const int fd = ::openat(dir_fd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return std::nullopt;
  struct stat st {};
  std::optional<std::string> text;
  if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size <= 4096) {
    std::string buf(static_cast<std::size_t>(st.st_size), '\0');
    if (read_fully(fd, buf.data(), buf.size()).bytes == buf.size()) text = std::move(buf);
  }
  ::close(fd);
  return text;
}

std::string first_line_of(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

// A process's start time in clock ticks after the boot (/proc/<pid>/stat field 22), "" when it cannot be read.
std::string start_time_of(pid_t pid) {
  const std::string stat = first_line_of("/proc/" + std::to_string(pid) + "/stat");
  const auto close = stat.rfind(')');  // the command name (field 2) may hold spaces and parentheses
  if (close == std::string::npos) return {};
  std::istringstream fields(stat.substr(close + 1));
  std::string field;
  for (int j = 3; j <= 22 && (fields >> field); ++j) {
    if (j == 22) return field;
  }
  return {};
}

std::string boot_id() { return first_line_of("/proc/sys/kernel/random/boot_id"); }

std::string host_name() {
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  return host;
}

struct OwnerRecord {
  long long pid = 0;
  std::string start_time, boot_id, host;
};

std::string owner_text(const OwnerRecord& o) {
  return std::string(kOwnerMagic) + "\npid " + std::to_string(o.pid) + "\nstart_time " + o.start_time + "\nboot_id " +
         o.boot_id + "\nhost " + o.host + "\n";
}

// The record, when `text` is one in full (a record being written, or anything else, is not).
std::optional<OwnerRecord> parse_owner(const std::string& text) {
  std::istringstream in(text);
  std::string line;
  if (!std::getline(in, line) || line != kOwnerMagic) return std::nullopt;
  OwnerRecord o;
  bool pid = false, start = false, boot = false, host = false;
  while (std::getline(in, line)) {
    const auto space = line.find(' ');
    if (space == std::string::npos) return std::nullopt;
    const std::string key = line.substr(0, space), value = line.substr(space + 1);
    if (key == "pid") {
      const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), o.pid);
      pid = ec == std::errc() && end == value.data() + value.size() && o.pid > 0;
    } else if (key == "start_time") {
      o.start_time = value, start = true;
    } else if (key == "boot_id") {
      o.boot_id = value, boot = true;
    } else if (key == "host") {
      o.host = value, host = true;
    }
  }
  if (!pid || !start || !boot || !host) return std::nullopt;
  return o;
}

// Whether the process that wrote `o` is gone for sure: same host (another one sharing the directory is never
// judged), and another boot, or no process with that pid, or one that started at another time (the pid reused).
bool owner_gone(const OwnerRecord& o) {
  if (o.host != host_name()) return false;
  const std::string boot = boot_id();
  if (!boot.empty() && !o.boot_id.empty() && boot != o.boot_id) return true;
  const auto pid = static_cast<pid_t>(o.pid);
  if (static_cast<long long>(pid) != o.pid) return false;
  if (::kill(pid, 0) != 0 && errno == ESRCH) return true;
  const std::string start = start_time_of(pid);
  return !start.empty() && !o.start_time.empty() && start != o.start_time;
}

bool all_digits(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
}

// A problem's directory: <NH>x<DHQK>x<DHHV>_<tokens>.
bool is_case_dir_name(std::string_view name) {
  const auto x1 = name.find('x'), x2 = name.find('x', x1 == std::string_view::npos ? x1 : x1 + 1), us = name.find('_');
  if (x1 == std::string_view::npos || x2 == std::string_view::npos || us == std::string_view::npos || us < x2)
    return false;
  return all_digits(name.substr(0, x1)) && all_digits(name.substr(x1 + 1, x2 - x1 - 1)) &&
         all_digits(name.substr(x2 + 1, us - x2 - 1)) && all_digits(name.substr(us + 1));
}

// The files bench and its children make in a problem's directory: the .npy inputs, h (the CLI forward's output, its
// partial file, progress record and the record's temporaries), the write probe, a child's stdout and stderr.
bool is_case_file_name(const std::string& name) {
  static const std::set<std::string> known = [] {
    std::set<std::string> k{"write_probe.bin", "child.out", "child.err", ".h.npy.progress"};
    for (const char* n : {"q", "k", "v", "i", "f", "h"}) {
      k.insert(std::string(n) + ".npy");
      k.insert(partial_path_of(std::string(n) + ".npy"));
    }
    return k;
  }();
  return known.count(name) || is_atomic_temporary_of(".h.npy.progress", name);
}

// The files the children's program cache (<work>/programs) holds: <16 hex digits>.clbin and their temporaries.
bool is_cache_entry_name(std::string_view name) {
  return name.size() == 22 && name.substr(16) == ".clbin" && std::all_of(name.begin(), name.begin() + 16, [](char ch) {
           return (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f');
         });
}
bool is_cache_file_name(const std::string& name) {
  if (is_cache_entry_name(name)) return true;
  const auto tmp = name.find(".tmp.");
  return name.size() > 1 && name[0] == '.' && tmp != std::string::npos &&
         is_cache_entry_name(std::string_view(name).substr(1, tmp - 1)) &&
         is_atomic_temporary_of(name.substr(1, tmp - 1), name);
}

// Removes the entries of the directory open at `dir_fd` that `ours` names (regular files, never a symbolic link)
// and, through `subdir`, the directories it accepts (removed when that left them empty). What stays, as paths
// under `shown`, goes to `left`; false when something of ours could not be removed. `keep`: a name passed over.
bool remove_ours_at(int dir_fd, const std::string& shown, const std::function<bool(const std::string&)>& ours,
                    const std::function<std::function<bool(const std::string&)>(const std::string&)>& subdir,
                    std::vector<std::string>& left, const std::string& keep = {}) {
  const int list_fd = ::dup(dir_fd);
  DIR* d = list_fd < 0 ? nullptr : ::fdopendir(list_fd);
  if (!d) {
    if (list_fd >= 0) ::close(list_fd);
    left.push_back(shown + " (cannot be listed: " + std::strerror(errno) + ")");
    return false;
  }
  std::vector<std::string> names;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name != "." && name != ".." && name != keep) names.push_back(name);
  }
  ::closedir(d);
  bool all = true;
  for (const auto& name : names) {
    const std::string at = shown + "/" + name;
    struct stat st {};
    if (::fstatat(dir_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) continue;  // gone meanwhile
    if (S_ISREG(st.st_mode) && ours(name)) {
      if (::unlinkat(dir_fd, name.c_str(), 0) != 0 && errno != ENOENT) {
        left.push_back(at + " (" + std::strerror(errno) + ")");
        all = false;
      }
      continue;
    }
    const auto inner = S_ISDIR(st.st_mode) && st.st_uid == ::geteuid() ? subdir(name) : nullptr;
    if (!inner) {
      left.push_back(at);
      continue;
    }
    const int fd = ::openat(dir_fd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
      left.push_back(at + " (" + std::strerror(errno) + ")");
      all = false;
      continue;
    }
    const std::size_t before = left.size();
    all = remove_ours_at(
              fd, at, inner, [](const std::string&) { return nullptr; }, left) &&
          all;
    ::close(fd);
    if (left.size() == before && ::unlinkat(dir_fd, name.c_str(), AT_REMOVEDIR) != 0 && errno != ENOENT) {
      left.push_back(at + " (" + std::strerror(errno) + ")");
      all = false;
    }
  }
  return all;
}

// Removes, in `base`, the work directories of earlier runs whose owner is gone (owner_gone), and in them only what
// bench makes there; anything else stays (a warning names it). A directory without a complete owner record (a
// foreign one, one being made, one of a version before the record), one of another user, a symbolic link, or one
// whose owner may still run is not touched.
void sweep_stale_work_dirs(const std::string& base) {
  const int base_fd = ::open(base.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (base_fd < 0) return;
  const int list_fd = ::dup(base_fd);
  DIR* d = list_fd < 0 ? nullptr : ::fdopendir(list_fd);
  if (!d) {
    if (list_fd >= 0) ::close(list_fd);
    ::close(base_fd);
    return;
  }
  std::vector<std::string> names;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name.size() == std::size(kWorkDirPrefix) - 1 + 6 && name.rfind(kWorkDirPrefix, 0) == 0) names.push_back(name);
  }
  ::closedir(d);
  for (const auto& name : names) {
    struct stat st {};
    if (::fstatat(base_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISDIR(st.st_mode) ||
        st.st_uid != ::geteuid())
      continue;
    const int fd = ::openat(base_fd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) continue;
    const auto text = read_small_file_at(fd, kOwnerFile);
    const auto owner = text ? parse_owner(*text) : std::nullopt;
    if (!owner || !owner_gone(*owner)) {
      ::close(fd);
      continue;
    }
    const std::string shown = (fs::path(base) / name).string();
    std::vector<std::string> left;
    auto case_files = [](const std::string& n) { return is_case_file_name(n); };
    auto cache_files = [](const std::string& n) { return is_cache_file_name(n); };
    const bool all = remove_ours_at(
        fd, shown, [](const std::string& n) { return n == "child.out" || n == "child.err"; },
        [&](const std::string& n) -> std::function<bool(const std::string&)> {
          if (n == "programs") return cache_files;
          if (is_case_dir_name(n)) return case_files;
          return nullptr;
        },
        left, kOwnerFile);
    // The record last, once everything of ours is gone (else a later run tries again).
    if (all) ::unlinkat(fd, kOwnerFile, 0);
    ::close(fd);
    const std::string who = "an earlier bench --system run (pid " + std::to_string(owner->pid) + ", no longer running)";
    if (left.empty() && all && ::unlinkat(base_fd, name.c_str(), AT_REMOVEDIR) == 0) {
      spdlog::warn("removed the work directory {} of {}", shown, who);
    } else {
      std::string list;
      for (const auto& l : left) list += (list.empty() ? "" : ", ") + l;
      spdlog::warn("removed the files bench makes in the work directory {} of {}; left what it does not make: {}",
                   shown, who, list.empty() ? std::string("(nothing listed)") : list);
    }
  }
  ::close(base_fd);
}

// The write end of StopOnSignal's pipe, for its handler (async-signal-safe: one write(2), errno kept).
volatile int g_stop_pipe = -1;
extern "C" void on_stop_signal(int sig) {
  const int saved = errno;
  const auto byte = static_cast<unsigned char>(sig);
  if (g_stop_pipe >= 0) (void)!::write(g_stop_pipe, &byte, 1);
  errno = saved;
}

// SIGINT, SIGTERM and SIGHUP while bench --system runs: blocked in every thread this process starts (the constructor
// blocks them in the calling thread before any other starts, and threads inherit the mask), and waited for by a
// thread of their own (signalfd), which then stops the running child (SIGTERM, SIGKILL after 3 s), lets a save of
// the CSV and JSON finish (they are replaced atomically; none starts after), removes the work directory, and dies of
// the same signal with its default action (exit status 128 + the signal, as without this). A thread that a library
// started before main (OpenBLAS's) does not block them: there a handler passes the signal on through a pipe, with
// SA_RESTART. A signal ignored when the run started stays ignored. Children start with the mask this process had
// (spawn) and the default actions (exec resets handlers).
class StopOnSignal {
 public:
  StopOnSignal() {
    sigemptyset(&caught_);
    for (const int sig : {SIGINT, SIGTERM, SIGHUP}) {
      struct sigaction now {};
      if (::sigaction(sig, nullptr, &now) == 0 && now.sa_handler == SIG_IGN) continue;
      sigaddset(&caught_, sig);
    }
    if (::pthread_sigmask(SIG_BLOCK, &caught_, &original_) != 0) throw Error("pthread_sigmask failed");
    int fds[2] = {-1, -1};
    signal_fd_ = ::signalfd(-1, &caught_, SFD_CLOEXEC | SFD_NONBLOCK);
    if (signal_fd_ < 0 || ::pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) {
      const std::string why = std::strerror(errno);
      if (signal_fd_ >= 0) ::close(signal_fd_);
      ::pthread_sigmask(SIG_SETMASK, &original_, nullptr);
      throw Error("cannot wait for signals: " + why);
    }
    pipe_read_ = fds[0];
    pipe_write_ = fds[1];
    g_stop_pipe = pipe_write_;
    waiter_ = std::thread([this] { wait_for_signals(); });
    active_ = this;
    for (int sig = 1; sig < NSIG; ++sig) {
      if (!sigismember(&caught_, sig)) continue;
      struct sigaction sa {};
      sa.sa_handler = on_stop_signal;
      sa.sa_flags = SA_RESTART;
      sigfillset(&sa.sa_mask);
      ::sigaction(sig, &sa, &actions_[sig]);
    }
  }
  ~StopOnSignal() {
    // The default actions back first: a signal from here on ends the process as without this (the work directory
    // is gone by now); one the thread already took still removes nothing twice.
    for (int sig = 1; sig < NSIG; ++sig) {
      if (sigismember(&caught_, sig)) ::sigaction(sig, &actions_[sig], nullptr);
    }
    const unsigned char quit = 0;
    while (::write(pipe_write_, &quit, 1) < 0 && errno == EINTR) {
    }
    waiter_.join();
    active_ = nullptr;
    g_stop_pipe = -1;
    ::close(signal_fd_);
    ::close(pipe_read_);
    ::close(pipe_write_);
    // A signal that came after the thread stopped is delivered here, with its default action.
    ::pthread_sigmask(SIG_SETMASK, &original_, nullptr);
  }
  StopOnSignal(const StopOnSignal&) = delete;
  StopOnSignal& operator=(const StopOnSignal&) = delete;

  static StopOnSignal* active() { return active_; }
  const sigset_t& original_mask() const { return original_; }

  // A new work directory (make_work_dir) under `base`, after the sweep of stale ones: known to the signal thread from
  // the moment it exists (a signal meanwhile waits for it).
  fs::path make_work_dir(const std::string& base) {
    sweep_stale_work_dirs(base);
    std::lock_guard<std::mutex> lock(dir_mutex_);
    std::string name = (fs::path(base) / (std::string(kWorkDirPrefix) + "XXXXXX")).string();
    if (!::mkdtemp(name.data())) throw Error("cannot make a directory in '" + base + "': " + std::strerror(errno));
    work_dir_ = name;
    removed_ = false;
    try {
      write_owner(name);
    } catch (...) {
      remove_locked();
      throw;
    }
    return name;
  }
  // Removes the work directory, once (normal end, error or signal, whichever comes first).
  void remove_work_dir() {
    std::lock_guard<std::mutex> lock(dir_mutex_);
    remove_locked();
  }

  // Held while the CSV and JSON are replaced.
  std::mutex& outputs_mutex() { return outputs_; }
  // Held while a child starts and while it is registered: the signal thread stops only a child not yet reaped (its
  // pid not reused), and no child starts once it holds it.
  std::mutex& children_mutex() { return children_; }
  void set_child(pid_t pid) { child_ = pid; }  // under children_mutex(); 0: none

 private:
  static void write_owner(const std::string& dir) {
    const OwnerRecord o{static_cast<long long>(::getpid()), start_time_of(::getpid()), boot_id(), host_name()};
    const std::string text = owner_text(o);
    const std::string path = (fs::path(dir) / kOwnerFile).string();
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0) throw Error("cannot write '" + path + "': " + std::strerror(errno));
    const ssize_t n = ::write(fd, text.data(), text.size());  // one write: a record is complete or refused
    const int err = errno;
    ::close(fd);
    if (n != static_cast<ssize_t>(text.size()))
      throw Error("cannot write '" + path + "': " + std::string(n < 0 ? std::strerror(err) : "short write"));
  }

  void remove_locked() {
    if (removed_ || work_dir_.empty()) return;
    removed_ = true;
    // Our own mkdtemp directory (mode 0700): remove_all does not follow symbolic links. A thread of this process may
    // still make a file in it meanwhile (then the next round takes it); none remakes the directory (create_directory
    // of a problem's directory needs it, a child starts only through spawn).
    for (int round = 0; round < 100; ++round) {
      std::error_code ec;
      fs::remove_all(work_dir_, ec);
      struct stat st {};
      if (::lstat(work_dir_.c_str(), &st) != 0 && errno == ENOENT) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }

  // Signals pending for the process (every thread of ours blocks them) through the signalfd; those a thread that
  // does not block them caught through the pipe, where a 0 says stop waiting. Both do not block: a signal poll saw
  // on the signalfd may have gone to the handler (then it is in the pipe) before the read.
  void wait_for_signals() {
    for (;;) {
      pollfd fds[2] = {{signal_fd_, POLLIN, 0}, {pipe_read_, POLLIN, 0}};
      if (::poll(fds, 2, -1) < 0) {
        if (errno == EINTR) continue;
        return;
      }
      if (fds[1].revents != 0) {
        unsigned char byte = 0;
        if (::read(pipe_read_, &byte, 1) == 1) {
          if (byte == 0) return;
          stop(byte);
        }
      }
      signalfd_siginfo info{};
      if (fds[0].revents != 0 && ::read(signal_fd_, &info, sizeof info) == static_cast<ssize_t>(sizeof info))
        stop(static_cast<int>(info.ssi_signo));
    }
  }

  [[noreturn]] void stop(int sig) {
    std::lock_guard<std::mutex> children(children_);  // kept until the end: no child starts after this
    if (child_ > 0) stop_child(child_);
    std::lock_guard<std::mutex> outputs(outputs_);  // a save under way ends first; none starts after
    std::string dir;
    {
      std::lock_guard<std::mutex> lock(dir_mutex_);
      dir = removed_ ? std::string() : work_dir_.string();
      remove_locked();
    }
    const std::string name = sig == SIGINT    ? "SIGINT"
                             : sig == SIGTERM ? "SIGTERM"
                             : sig == SIGHUP  ? "SIGHUP"
                                              : "a signal";
    const std::string line = "mlstm: bench --system stopped by " + name +
                             (dir.empty() ? std::string() : "; removed its work directory " + dir) + "\n";
    (void)!::write(2, line.data(), line.size());
    // Dies of the signal, default action: pending on this thread (blocked), then unblocked here.
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    ::sigaction(sig, &dfl, nullptr);
    ::raise(sig);
    sigset_t one;
    sigemptyset(&one);
    sigaddset(&one, sig);
    ::pthread_sigmask(SIG_UNBLOCK, &one, nullptr);
    ::_exit(128 + sig);  // not reached
  }

  // SIGTERM to the running child, SIGKILL after 3 s; waits until it has ended, without reaping it (its spawn does).
  static void stop_child(pid_t pid) {
    ::kill(pid, SIGTERM);
    for (int waited_ms = 0;; waited_ms += 10) {
      siginfo_t info{};
      const int rc = ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT);
      if (rc != 0 && errno != EINTR) return;
      if (rc == 0 && info.si_pid == pid) return;
      if (waited_ms >= 3000) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    ::kill(pid, SIGKILL);
    siginfo_t info{};
    while (::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOWAIT) != 0 && errno == EINTR) {
    }
  }

  inline static StopOnSignal* active_ = nullptr;
  sigset_t caught_{}, original_{};
  struct sigaction actions_[NSIG] {};  // the actions before, of the signals in caught_
  int signal_fd_ = -1, pipe_read_ = -1, pipe_write_ = -1;
  std::thread waiter_;
  std::mutex dir_mutex_, outputs_, children_;
  fs::path work_dir_;
  bool removed_ = false;
  pid_t child_ = 0;
};

// The run's work directory, removed (once) when this goes out of scope.
struct WorkDir {
  fs::path path;
  explicit WorkDir(const std::string& base) : path(StopOnSignal::active()->make_work_dir(base)) {}
  ~WorkDir() { StopOnSignal::active()->remove_work_dir(); }
  WorkDir(const WorkDir&) = delete;
  WorkDir& operator=(const WorkDir&) = delete;
};

// ---- child processes ---------------------------------------------------------------------------------------

struct ChildRun {
  int code = -1;       // exit code, -1 when killed by a signal
  int signal = 0;      // the signal that killed it
  double seconds = 0;  // wall time from spawn to exit
  std::string out, err;
  json result;  // the last line of stdout as JSON (null when none)
  bool ok() const { return code == 0; }
  // The peak RSS the child reports in its JSON (peak_rss_mib: VmHWM, its own image). Not wait4's ru_maxrss:
  // Linux carries that across exec, so a child spawned by this large process would report at least its size.
  double peak_rss_mib() const {
    const json v = result.is_object() ? result.value("peak_rss_mib", json(nullptr)) : json(nullptr);
    if (!v.is_number()) throw Error("the child reported no peak_rss_mib");
    return v.get<double>();
  }
  // "exit code 2: <the last line on stderr>" for rows.
  std::string failure() const {
    std::string last = err;
    while (!last.empty() && last.back() == '\n') last.pop_back();
    if (const auto nl = last.rfind('\n'); nl != std::string::npos) last = last.substr(nl + 1);
    return (signal ? "killed by signal " + std::to_string(signal) : "exit code " + std::to_string(code)) +
           (last.empty() ? "" : ": " + last);
  }
};

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The trace lines (trace.hpp) among a run's stderr, in order.
json trace_lines(const std::string& err) {
  json lines = json::array();
  std::istringstream in(err);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("mlstm-flow trace: ", 0) == 0) lines.push_back(line);
  }
  return lines;
}

// Runs argv[0] with argv (stdin /dev/null, stdout and stderr to files in `dir`), with `env` set on top of this
// process's environment; waits for it.
ChildRun spawn(const std::vector<std::string>& args, const std::map<std::string, std::string>& env,
               const fs::path& dir) {
  std::vector<std::string> env_text;
  for (char** e = environ; *e; ++e) {
    const std::string entry = *e;
    if (!env.count(entry.substr(0, entry.find('=')))) env_text.push_back(entry);
  }
  for (const auto& [key, value] : env) env_text.push_back(key + "=" + value);
  std::vector<char*> argv, envp;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  for (const auto& e : env_text) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);
  const fs::path out = dir / "child.out", err = dir / "child.err";
  posix_spawn_file_actions_t actions;
  if (posix_spawn_file_actions_init(&actions) != 0) throw Error("posix_spawn_file_actions_init failed");
  int rc = posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  if (rc == 0) rc = posix_spawn_file_actions_addopen(&actions, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (rc == 0) rc = posix_spawn_file_actions_addopen(&actions, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  // The child starts with the signal mask this process had before StopOnSignal blocked SIGINT, SIGTERM and SIGHUP,
  // and is registered with it until it has ended (then reaped): a signal stops it first.
  StopOnSignal* stopper = StopOnSignal::active();
  posix_spawnattr_t attr;
  if (posix_spawnattr_init(&attr) != 0) {
    posix_spawn_file_actions_destroy(&actions);
    throw Error("posix_spawnattr_init failed");
  }
  if (rc == 0 && stopper) rc = posix_spawnattr_setsigmask(&attr, &stopper->original_mask());
  if (rc == 0 && stopper) rc = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
  pid_t pid = 0;
  const auto t0 = Clock::now();
  {
    std::unique_lock<std::mutex> children;
    if (stopper) children = std::unique_lock<std::mutex>(stopper->children_mutex());
    if (rc == 0) rc = posix_spawn(&pid, argv[0], &actions, &attr, argv.data(), envp.data());
    if (rc == 0 && stopper) stopper->set_child(pid);
  }
  posix_spawnattr_destroy(&attr);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) throw Error("cannot start '" + args[0] + "': " + std::strerror(rc));
  if (stopper) {
    siginfo_t info{};
    while (::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOWAIT) != 0 && errno == EINTR) {
    }
    const std::lock_guard<std::mutex> children(stopper->children_mutex());
    stopper->set_child(0);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) throw Error("waitpid for '" + args[0] + "': " + std::strerror(errno));
  }
  ChildRun r;
  r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  if (WIFEXITED(status)) r.code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) r.signal = WTERMSIG(status);
  r.out = slurp(out);
  r.err = slurp(err);
  std::error_code ec;
  fs::remove(out, ec);
  fs::remove(err, ec);
  std::string last = r.out;
  while (!last.empty() && last.back() == '\n') last.pop_back();
  if (const auto nl = last.rfind('\n'); nl != std::string::npos) last = last.substr(nl + 1);
  r.result = json::parse(last, nullptr, false);
  if (r.result.is_discarded()) r.result = nullptr;
  return r;
}

// ---- inputs ------------------------------------------------------------------------------------------------

// One problem at one size and what its data weigh.
struct Case {
  Problem p;
  std::int64_t S = 0, piece = 0;  // tokens; tokens of each synthetic piece
  double up = 0, down = 0;        // bytes per token: q, k, v, i, f up; h down
  json base() const { return {{"problem", p.name}, {"NH", p.NH}, {"DHQK", p.DK}, {"DHHV", p.DV}, {"tokens", S}}; }
  double bytes(double per_token, std::int64_t tokens) const { return per_token * static_cast<double>(tokens); }
};

constexpr int kDistinctPieces = 4;  // as `mlstm run`: distinct random pieces, cycled along the sequence

std::vector<ForwardInputs> make_pieces(const Case& c, DType dtype) {
  std::vector<ForwardInputs> pieces;
  for (int j = 0; j < kDistinctPieces; ++j) {
    pieces.push_back(
        synthetic_piece(1, c.p.NH, c.piece, c.p.DK, c.p.DV, dtype, 1234567 + static_cast<std::uint64_t>(j)));
  }
  return pieces;
}

// The .npy inputs of a case, written slice by slice from the pieces (memory: the pieces only).
struct NpyInputs {
  std::string q, k, v, i, f;
  std::vector<std::string> all() const { return {q, k, v, i, f}; }
};

NpyInputs write_inputs(const fs::path& dir, const Case& c, const std::vector<ForwardInputs>& pieces, DType dtype) {
  NpyInputs files{(dir / "q.npy").string(), (dir / "k.npy").string(), (dir / "v.npy").string(),
                  (dir / "i.npy").string(), (dir / "f.npy").string()};
  auto write = [&](const std::string& path, Tensor ForwardInputs::*member, Shape shape, DType dt) {
    npy::SeqSliceWriter writer(path, std::move(shape), dt, false);
    for (std::int64_t t0 = 0; t0 < c.S; t0 += c.piece) {
      const Tensor& src = pieces[static_cast<std::size_t>(t0 / c.piece) % pieces.size()].*member;
      writer.write(t0, sequence_slice(src.view(), 0, std::min(c.piece, c.S - t0)));
    }
    writer.commit();
  };
  write(files.q, &ForwardInputs::q, {1, c.p.NH, c.S, c.p.DK}, dtype);
  write(files.k, &ForwardInputs::k, {1, c.p.NH, c.S, c.p.DK}, dtype);
  write(files.v, &ForwardInputs::v, {1, c.p.NH, c.S, c.p.DV}, dtype);
  write(files.i, &ForwardInputs::i, {1, c.p.NH, c.S}, DType::f32);
  write(files.f, &ForwardInputs::f, {1, c.p.NH, c.S}, DType::f32);
  return files;
}

// Drops the file's pages from the page cache (written files are synced: nothing dirty stays), so that the next
// read comes from the disk.
void drop_cached(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error("open '" + path + "': " + std::strerror(errno));
  const int rc = ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
  if (rc != 0) throw Error("posix_fadvise(DONTNEED) '" + path + "': " + std::strerror(rc));
}

// Seconds to read the files whole with pread (16 MiB at a time, every read checked), their cached pages
// dropped first.
double read_back_seconds(const std::vector<std::string>& paths) {
  for (const auto& p : paths) drop_cached(p);
  std::vector<char> buffer(std::size_t{16} << 20);
  const auto t0 = Clock::now();
  for (const auto& path : paths) {
    const int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) throw Error("open '" + path + "': " + std::strerror(errno));
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);  // a hint only
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      throw Error("fstat '" + path + "': " + std::strerror(errno));
    }
    for (std::uint64_t at = 0; at < static_cast<std::uint64_t>(st.st_size);) {
      const std::size_t want = std::min<std::uint64_t>(buffer.size(), static_cast<std::uint64_t>(st.st_size) - at);
      if (const FdTransfer t = read_fully(fd, buffer.data(), want, at); t.bytes < want) {
        ::close(fd);
        throw Error("pread '" + path + "': " + (t.error != 0 ? std::strerror(t.error) : "unexpected end of file"));
      }
      at += want;
    }
    ::close(fd);
  }
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// A directory (or file) removed with everything in it when this goes out of scope.
struct RemovedAtEnd {
  fs::path path;
  ~RemovedAtEnd() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

// Writes `bytes` into a new file `path` as the CLI writes h: 16 MiB pwrites, fdatasync after every
// `sync_every` bytes (a slice) and at the end, every call checked.
void write_synced(const fs::path& path, std::size_t bytes, std::size_t sync_every) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw Error("open '" + path.string() + "': " + std::strerror(errno));
  const std::vector<char> block(std::size_t{16} << 20, 1);
  std::string failed;
  std::size_t since_sync = 0;
  for (std::size_t at = 0; at < bytes && failed.empty();) {
    const std::size_t n = std::min(block.size(), bytes - at);
    if (const FdTransfer t = write_fully(fd, block.data(), n, at); t.bytes < n) {
      failed = "pwrite: " + std::string(t.error != 0 ? std::strerror(t.error) : "no progress");
      break;
    }
    at += n;
    since_sync += n;
    if ((since_sync >= sync_every || at == bytes) && ::fdatasync(fd) != 0)
      failed = "fdatasync: " + std::string(std::strerror(errno));
    if (since_sync >= sync_every) since_sync = 0;
  }
  if (::close(fd) != 0 && failed.empty()) failed = "close: " + std::string(std::strerror(errno));
  if (!failed.empty()) throw Error("'" + path.string() + "': " + failed);
}

// Seconds to read the files back (read_back_seconds) while `write_bytes` are written and synced beside them
// (write_synced, into `dir`), until both are done: the CLI forward reads its inputs and writes h on the same disk,
// and where reads and writes share its bandwidth this, not the reads alone, is what its files allow.
double read_while_writing_seconds(const std::vector<std::string>& paths, const fs::path& dir, std::size_t write_bytes,
                                  std::size_t sync_every) {
  const fs::path probe = dir / "write_probe.bin";
  const RemovedAtEnd probe_goes{probe};
  // Dropped here, before the clock starts, so that the drop's own time stays out of the bound (read_back_seconds
  // drops them again: nothing is cached by then, and that costs nothing).
  for (const auto& p : paths) drop_cached(p);
  tbb::task_group writing;
  const auto t0 = Clock::now();
  writing.run([&] { write_synced(probe, write_bytes, sync_every); });
  try {
    (void)read_back_seconds(paths);
  } catch (...) {
    writing.wait();
    throw;
  }
  writing.wait();
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// ---- bounds ------------------------------------------------------------------------------------------------

// Tokens/s of the transfer bound over every GPU-side device (measured one after the other, added up): the
// forward's bytes (q, k, v, i, f up; h down) and the forward+backward's (the forward's, then the backward's:
// q, k, v, i, f and dh up, dq, dk, dv, di, df down), each over the slowest of up alone, down alone, and both at
// once.
struct TransferBound {
  double fw = 0, fwbw = 0;
  json devices = json::array();
  std::string note;  // the rates, for the table
};

// Bytes per token of a forward+backward: up, the forward's inputs, then the backward's inputs and dh (h's size);
// down, h, then the gradients (the inputs' sizes).
double fwbw_up_bytes(const Case& c) { return 2 * c.up + c.down; }
double fwbw_down_bytes(const Case& c) { return c.down + c.up; }

TransferBound transfer_bound(const Case& c, const std::vector<std::shared_ptr<opencl::Device>>& gpus,
                             std::int64_t repeats) {
  // 256 MiB copies (bench_opencl's), less for a problem whose inputs are smaller, 16 MiB at least.
  const auto bytes = static_cast<std::size_t>(
      std::clamp(c.bytes(c.up, c.S), static_cast<double>(16 << 20), static_cast<double>(256 << 20)));
  TransferBound t;
  for (const auto& dev : gpus) {
    const opencl::CopyRates r = opencl::measure_copy_rates(dev, bytes, static_cast<int>(repeats));
    const double both = c.up + c.down, fwbw_up = fwbw_up_bytes(c), fwbw_down = fwbw_down_bytes(c);
    t.fw += 1.0 / std::max({c.up / r.up, c.down / r.down, both / r.both});
    t.fwbw += 1.0 / std::max({fwbw_up / r.up, fwbw_down / r.down, (fwbw_up + fwbw_down) / r.both});
    t.devices.push_back({{"device", dev->name()},
                         {"copy_mib", static_cast<double>(bytes) / static_cast<double>(1 << 20)},
                         {"up_GBps", r.up * 1e-9},
                         {"down_GBps", r.down * 1e-9},
                         {"both_GBps", r.both * 1e-9}});
    char text[160];
    std::snprintf(text, sizeof text, "pinned copies of %zu MiB: up %.1f, down %.1f, both %.1f GB/s", bytes >> 20,
                  r.up * 1e-9, r.down * 1e-9, r.both * 1e-9);
    t.note += (t.note.empty() ? "" : "; ") + (gpus.size() > 1 ? dev->name() + ": " : std::string()) + text;
  }
  return t;
}

// Host memory copy rate (bytes/s, best of `repeats`): a parallel copy (copy_rows, as the streams' staging
// copies are) of 256 MiB between two touched pageable buffers. Arrays in pageable host memory reach the GPU
// only through such a copy into pinned staging (and h comes back through one), so every streamed byte costs
// one: tokens/s <= rate / (up + down bytes per token).
double host_copy_rate(std::int64_t repeats) {
  constexpr std::size_t kBytes = std::size_t{256} << 20;
  std::vector<std::byte> from(kBytes, std::byte{1}), to(kBytes, std::byte{0});
  double best = 1e30;
  for (std::int64_t r = 0; r < std::max<std::int64_t>(repeats, 3); ++r) {
    const auto t0 = Clock::now();
    copy_rows(to.data(), 0, from.data(), 0, 1, kBytes);
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return static_cast<double>(kBytes) / best;
}

struct KernelBound {
  double fw = 0, fwbw = 0;
  std::int64_t tokens = 0;  // measured on (the smallest over the devices)
  json devices = json::array();
  std::string note;
};

std::uint64_t max_alloc_of(const opencl::DeviceInfo& d) {
  cl_ulong bytes = 0;
  if (clGetDeviceInfo(d.id, CL_DEVICE_MAX_MEM_ALLOC_SIZE, sizeof bytes, &bytes, nullptr) != CL_SUCCESS) return 0;
  return bytes;
}

// Whether a device-resident forward+backward of `tokens` tokens plausibly fits the device (a generous estimate:
// inputs, h, dh and gradients, per-token gate buffers, and the chunk states of forward and backward in float32),
// and its largest buffer the device's largest allocation.
bool fits_device(const Case& c, std::int64_t tokens, std::int64_t chunk, const opencl::DeviceInfo& d) {
  const double rows = static_cast<double>(c.p.NH), T = static_cast<double>(tokens);
  const double states = rows * (std::ceil(T / static_cast<double>(chunk)) + 1) * static_cast<double>(c.p.DK) *
                        static_cast<double>(c.p.DV) * 4;
  const double total = 2 * (c.up + c.down) * T + 128 * rows * T + 2 * states + static_cast<double>(64 << 20);
  const double largest = std::max(states, rows * T * static_cast<double>(std::max(c.p.DK, c.p.DV)) * 4);
  const auto max_alloc = static_cast<double>(max_alloc_of(d));
  return total <= 0.9 * static_cast<double>(d.global_memory) && (max_alloc == 0 || largest <= max_alloc);
}

// The problem on one device, resident, as the graph's OpenCL devices run it: the tensor cores where the device
// has them and the problem fits them (and their programs build), else the portable kernels.
std::unique_ptr<opencl::ResidentChunkwise> resident_on(const std::shared_ptr<opencl::Device>& dev, const ForwardArgs& a,
                                                       const MlstmOptions& o, const BackwardArgs& grads,
                                                       std::string* path) {
  if (opencl::tensor_core_support(dev->info()).available &&
      opencl::tensor_core_fit(validate_forward(a, o), o).empty()) {
    try {
      *path = "tensor cores";
      return opencl::TensorCoreRunner(dev).resident(a, o, &grads);
    } catch (const DeviceError& e) {
      if (e.kind() != DeviceError::Kind::build) throw;
      *path = "portable (the tensor-core programs did not build)";
    }
  } else {
    *path = "portable";
  }
  return opencl::ChunkwiseRunner(dev).resident(a, o, &grads);
}

// Device time of the forward and of forward+backward on every GPU-side device (medians, added up over the
// devices), on the whole sequence or the largest power-of-two number of tokens that fits device and budget.
KernelBound kernel_bound(const Case& c, const std::vector<ForwardInputs>& pieces, const ForwardInputs& whole,
                         const std::vector<std::shared_ptr<opencl::Device>>& gpus, const MlstmOptions& o,
                         std::int64_t repeats, std::uint64_t budget) {
  KernelBound k;
  std::vector<std::int64_t> candidates{c.S};
  for (std::int64_t t = std::int64_t{1} << 62; t >= std::max<std::int64_t>(o.chunk_size, 1); t >>= 1) {
    if (t < c.S) candidates.push_back(t);
  }
  ForwardInputs tiled;  // when the whole sequence is not in memory already, or does not fit the device
  std::int64_t tiled_tokens = 0;
  std::string limits;
  for (const auto& dev : gpus) {
    std::int64_t done = 0;
    for (const std::int64_t T : candidates) {
      const bool have = T == c.S && !whole.q.empty();
      if (!have && 1.2 * c.bytes(c.up + c.down, T) > static_cast<double>(budget)) {
        limits = "memory budget";
        continue;
      }
      if (!fits_device(c, T, o.chunk_size, dev->info())) {
        limits = "device memory";
        continue;
      }
      if (!have && tiled_tokens != T) {
        tiled = ForwardInputs();
        tiled = tile_pieces(pieces, T);
        tiled_tokens = T;
      }
      const ForwardInputs& host = have ? whole : tiled;
      const ForwardArgs a = host.args();
      BackwardArgs grads;
      grads.inputs = a;
      grads.dh = host.v.view();  // (1,NH,T,DHHV) in the input dtype: the shape and dtype of h
      std::string path;
      std::unique_ptr<opencl::ResidentChunkwise> r;
      auto pass_ms = [&](bool backward) {
        std::vector<opencl::KernelEvent> events;
        r->enqueue_forward(&events);
        if (backward) r->enqueue_backward(&events);
        return opencl::time_events(events, dev->name()).total_ms;
      };
      try {
        r = resident_on(dev, a, o, grads, &path);
        (void)pass_ms(true);  // warm-up
      } catch (const DeviceError& e) {
        if (e.kind() != DeviceError::Kind::out_of_memory && e.kind() != DeviceError::Kind::lost) throw;
        r.reset();
        dev->trim();
        limits = "device memory";
        continue;
      }
      std::vector<double> fw, fwbw;
      for (std::int64_t j = 0; j < repeats; ++j) fw.push_back(pass_ms(false));
      for (std::int64_t j = 0; j < repeats; ++j) fwbw.push_back(pass_ms(true));
      std::sort(fw.begin(), fw.end());
      std::sort(fwbw.begin(), fwbw.end());
      const double fw_ms = fw[fw.size() / 2], fwbw_ms = fwbw[fwbw.size() / 2];
      k.fw += static_cast<double>(T) / (fw_ms * 1e-3);
      k.fwbw += static_cast<double>(T) / (fwbw_ms * 1e-3);
      k.devices.push_back(
          {{"device", dev->name()}, {"path", path}, {"tokens", T}, {"fw_ms", fw_ms}, {"fwbw_ms", fwbw_ms}});
      k.tokens = k.tokens == 0 ? T : std::min(k.tokens, T);
      done = T;
      r.reset();
      dev->trim();
      break;
    }
    if (done == 0) {
      throw Error("the resident problem does not fit " + dev->name() + " (" + limits + ") even at " +
                  std::to_string(candidates.back()) + " tokens");
    }
  }
  for (const auto& d : k.devices) {
    k.note += (k.note.empty() ? "" : "; ") + (gpus.size() > 1 ? d["device"].get<std::string>() + ": " : std::string()) +
              d["path"].get<std::string>();
  }
  if (k.tokens < c.S) {
    k.note +=
        ", measured on " + std::to_string(k.tokens) + " tokens: " + std::to_string(c.S) + " do not fit the " + limits;
  }
  return k;
}

// ---- the report --------------------------------------------------------------------------------------------

// What each row is, for the table, the CSV and the JSON.
struct RowKind {
  const char* id;
  const char* what;
  double target = 0;     // 0: a bound
  bool at_least = true;  // ratio >= target (throughput) or <= (memory, start-up)
};

// Bounds (tokens/s).
constexpr RowKind kTransfer{"transfer", "bound: transfer, forward bytes"};
constexpr RowKind kTransferFwbw{"transfer_fwbw", "bound: transfer, forward+backward bytes"};
constexpr RowKind kKernelFw{"kernel_fw", "bound: kernel, forward (device-resident)"};
constexpr RowKind kKernelFwbw{"kernel_fwbw", "bound: kernel, forward+backward"};
constexpr RowKind kFileRead{"file_read", "bound: reading the .npy inputs back"};
constexpr RowKind kFileIo{"file_io", "bound: reading the .npy inputs back while h is written beside them"};
constexpr RowKind kHostCopy{"host_copy", "bound: host copies to/from staging"};
// Runs and their targets.
constexpr RowKind kForwardHost{"forward_host", "forward, C++ host memory, graph", 0.80, true};
constexpr RowKind kForwardPinned{"forward_pinned", "forward, C++ page-locked host memory, graph", 0.80, true};
constexpr RowKind kWorkersPlus{"workers_plus_gpu", "forward, CPU workers + GPU vs GPU", 1.0, true};
constexpr RowKind kFwbwHost{"fwbw_host", "forward+backward, C++ host memory", 0.70, true};
constexpr RowKind kFwbwPinned{"fwbw_pinned", "forward+backward, C++ page-locked host memory, graph", 0.70, true};
constexpr RowKind kForwardFiles{"forward_files", "forward, .npy files through the CLI", 0.80, true};
constexpr RowKind kForwardPython{"forward_python", "forward, Python numpy arrays, graph", 0.80, true};
constexpr RowKind kForwardPythonPinned{"forward_python_pinned", "forward, Python host_array()s, graph", 0.80, true};
constexpr RowKind kStartup{"startup", "second run: start-up to first token", 0.10, false};
constexpr RowKind kPeakRss{"peak_rss", "peak RSS, largest vs smallest size", 1.10, false};
constexpr const RowKind* kCaseRows[] = {&kTransfer,     &kTransferFwbw,  &kHostCopy,           &kKernelFw,
                                        &kKernelFwbw,   &kForwardHost,   &kForwardPinned,      &kWorkersPlus,
                                        &kFwbwHost,     &kFwbwPinned,    &kFileRead,           &kFileIo,
                                        &kForwardFiles, &kForwardPython, &kForwardPythonPinned};

std::string rate_text(double tokens_per_s) {
  char text[32];
  if (tokens_per_s >= 1e6)
    std::snprintf(text, sizeof text, "%.2fM", tokens_per_s * 1e-6);
  else
    std::snprintf(text, sizeof text, "%.1fk", tokens_per_s * 1e-3);
  return text;
}

std::string csv_field(const json& v) {
  if (v.is_null()) return "";
  if (v.is_boolean()) return v.get<bool>() ? "PASS" : "FAIL";
  if (!v.is_string()) return v.dump();
  std::string s = v.get<std::string>(), out = "\"";
  for (const char ch : s) out += ch == '"' ? std::string("\"\"") : std::string(1, ch);
  return out + "\"";
}

class Report {
 public:
  Report(const SystemPlan& plan, bool as_json) : plan_(plan), as_json_(as_json), machine_(machine_of(plan)) {
    if (as_json_) return;
    std::printf("mlstm bench --system (%s): %s; %s\n", git_revision(), machine_["cpu"].get<std::string>().c_str(),
                plan.gpus.front().name.c_str());
    std::printf("%-11s %9s  %-40s %9s %9s %7s %8s  %s\n", "problem", "tokens", "what", "tokens/s", "bound", "ratio",
                "target", "result");
    std::fflush(stdout);
  }

  // A bound: tokens/s of the case.
  void bound(const Case& c, const RowKind& kind, double tokens_per_s, json extra) {
    json row = start(c, kind, std::move(extra));
    row["tokens_per_s"] = tokens_per_s;
    add(std::move(row));
  }
  // A run measured against a bound: rate / bound, judged against the kind's target.
  void run(const Case& c, const RowKind& kind, double tokens, double seconds, const std::string& bound_name,
           double bound_tokens_per_s, json extra) {
    if (!std::isfinite(bound_tokens_per_s) || bound_tokens_per_s <= 0) {
      failed(c, kind, "no bound to compare with (" + bound_name + " was not measured)");
      return;
    }
    json row = start(c, kind, std::move(extra));
    row["tokens_per_s"] = tokens / seconds;
    row["seconds"] = seconds;
    row["bound"] = bound_name;
    row["bound_tokens_per_s"] = bound_tokens_per_s;
    judge(row, kind, tokens / seconds / bound_tokens_per_s);
    add(std::move(row));
  }
  // A row whose ratio is not a rate (peak RSS, start-up): `ratio` judged against the kind's target.
  void ratio(const Case& c, const RowKind& kind, double value, json extra) {
    json row = start(c, kind, std::move(extra));
    judge(row, kind, value);
    add(std::move(row));
  }
  void skipped(const Case& c, const RowKind& kind, const std::string& why) {
    json row = start(c, kind, json::object());
    row["skipped"] = why;
    add(std::move(row));
  }
  void failed(const Case& c, const RowKind& kind, const std::string& why) {
    json row = start(c, kind, json::object());
    row["error"] = why;
    row["pass"] = false;
    ++errors_;
    add(std::move(row));
  }
  int errors() const noexcept { return errors_; }
  json document() const {
    return {
        {"command", "bench --system"},
        {"revision", git_revision()},
        {"version", MLSTM_VERSION},
        {"timestamp",
         std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count()},
        {"machine", machine_},
        {"options",
         {{"devices", plan_.devices},
          {"dtype", dtype_name(plan_.dtype)},
          {"chunk", plan_.chunk},
          {"repeats", plan_.repeats},
          {"stream_tokens", plan_.stream_tokens},
          {"B", 1},
          {"tokens", plan_.tokens}}},
        {"errors", errors_},
        {"rows", rows_}};
  }

 private:
  json start(const Case& c, const RowKind& kind, json extra) const {
    json row = c.base();
    row["kind"] = kind.target > 0 ? "run" : "bound";
    row["id"] = kind.id;
    row["what"] = kind.what;
    if (kind.target > 0) {
      row["target"] = kind.target;
      row["compare"] = kind.at_least ? ">=" : "<=";
    }
    for (auto& [key, value] : extra.items()) row[key] = value;
    return row;
  }
  static void judge(json& row, const RowKind& kind, double ratio) {
    row["ratio"] = ratio;
    row["pass"] = kind.at_least ? ratio >= kind.target : ratio <= kind.target;
  }
  void add(json row) {
    if (!as_json_) print(row);
    rows_.push_back(std::move(row));
    save();
  }
  void print(const json& row) const {
    auto num = [&](const char* key) {
      return row.contains(key) ? rate_text(row[key].get<double>()) : std::string("-");
    };
    char ratio[16] = "-", target[16] = "-";
    if (row.contains("ratio")) std::snprintf(ratio, sizeof ratio, "%.3f", row["ratio"].get<double>());
    if (row.contains("target"))
      std::snprintf(target, sizeof target, "%s%.2f", row["compare"].get<std::string>().c_str(),
                    row["target"].get<double>());
    std::string result;
    if (row.contains("skipped"))
      result = "skipped: " + row["skipped"].get<std::string>();
    else if (row.contains("error"))
      result = "ERROR: " + row["error"].get<std::string>();
    else if (row.contains("pass"))
      result = row["pass"].get<bool>() ? "PASS" : "FAIL";
    if (row.contains("note")) result += (result.empty() ? "" : "  ") + row["note"].get<std::string>();
    std::printf("%-11s %9lld  %-40s %9s %9s %7s %8s  %s\n", row["problem"].get<std::string>().c_str(),
                static_cast<long long>(row["tokens"].get<std::int64_t>()), row["what"].get<std::string>().c_str(),
                num("tokens_per_s").c_str(), num("bound_tokens_per_s").c_str(), ratio, target, result.c_str());
    std::fflush(stdout);
  }
  // Both files replaced atomically after every row: a run cut short keeps the rows measured so far.
  void save() const {
    std::ostringstream csv;
    csv << csv_header();
    for (const auto& row : rows_) {
      for (std::size_t j = 0; j < std::size(kCsvColumns); ++j) {
        csv << (j ? "," : "") << (row.contains(kCsvColumns[j]) ? csv_field(row[kCsvColumns[j]]) : std::string());
      }
      csv << "\n";
    }
    // Not while a signal stops the run (StopOnSignal): it waits for this save, and none starts after it.
    std::unique_lock<std::mutex> saving;
    if (StopOnSignal* stopper = StopOnSignal::active()) saving = std::unique_lock<std::mutex>(stopper->outputs_mutex());
    write_file_atomically(plan_.csv, csv.str());
    write_file_atomically(plan_.json_out, document().dump(2) + "\n");
  }

  const SystemPlan& plan_;
  bool as_json_;
  json machine_;
  json rows_ = json::array();
  int errors_ = 0;
};

// ---- the runs ----------------------------------------------------------------------------------------------

// The Python side: the interpreter in MLSTM_PYTHON (the one the module was built for, where that is not the system's),
// else /usr/bin/python3, with numpy and the mlstm_flow module (PYTHONPATH as given, then the build tree's python/
// next to this executable's directory), checked once.
struct Python {
  std::string interpreter = "/usr/bin/python3";
  std::map<std::string, std::string> env;
  std::string missing;  // why not, when it cannot run
};

Python find_python(const fs::path& exe, const fs::path& dir) {
  Python py;
  if (const char* p = std::getenv("MLSTM_PYTHON"); p && *p) py.interpreter = p;
  std::string path;
  if (const char* p = std::getenv("PYTHONPATH"); p && *p) path = p;
  const fs::path built = exe.parent_path().parent_path() / "python";
  std::error_code ec;
  if (fs::is_directory(built, ec)) path += (path.empty() ? "" : ":") + built.string();
  if (!path.empty()) py.env["PYTHONPATH"] = path;
  if (::access(py.interpreter.c_str(), X_OK) != 0) {
    py.missing = "python/numpy not available (no " + py.interpreter + ")";
    return py;
  }
  const ChildRun r = spawn({py.interpreter, "-c", "import numpy, mlstm_flow"}, py.env, dir);
  if (!r.ok()) py.missing = "python/numpy not available (import numpy, mlstm_flow: " + r.failure() + ")";
  return py;
}

// The Python child: loads the .npy files and warms up on their first piece (untimed), then times
// forward(devices=...) from the numpy arrays; with "pinned", copies them into host_array()s (untimed) and times
// forward(..., out=) from and into those.
constexpr const char* kPythonForward = R"(import json, sys, time
import numpy as np
import mlstm_flow
a = json.loads(sys.argv[1])
x = {n: np.load(a["files"][n]) for n in "qkvif"}
def forward(tokens):
    return mlstm_flow.forward(*(np.ascontiguousarray(x[n][:, :, :tokens]) for n in "qkvif"),
                              devices=a["devices"], chunk_size=a["chunk"], dtype=a["dtype"])
forward(a["warm_up_tokens"])  # devices opened, programs loaded: as the C++ row's warm-up
t0 = time.perf_counter()
h, _ = mlstm_flow.forward(x["q"], x["k"], x["v"], x["i"], x["f"], devices=a["devices"], chunk_size=a["chunk"],
                          dtype=a["dtype"])
seconds = time.perf_counter() - t0
out = {"seconds": seconds, "shape_h": list(h.shape)}
if a["pinned"]:
    del h
    kind = lambda arr: "bfloat16" if a["dtype"] == "bfloat16" and arr.dtype == np.uint16 else arr.dtype
    p = {}
    for n in "qkvif":
        p[n] = mlstm_flow.host_array(x[n].shape, kind(x[n]), devices=a["devices"])
        p[n][...] = x[n]
        del x[n]
    hp = mlstm_flow.host_array(out["shape_h"], kind(p["q"]), devices=a["devices"])
    t0 = time.perf_counter()
    mlstm_flow.forward(p["q"], p["k"], p["v"], p["i"], p["f"], devices=a["devices"], chunk_size=a["chunk"],
                       dtype=a["dtype"], out=hp)
    out["pinned_seconds"] = time.perf_counter() - t0
print(json.dumps(out))
)";

class SystemBench {
 public:
  SystemBench(const SystemPlan& plan, Report& report) : plan_(plan), report_(report), work_(plan.workdir_base) {
    for (const auto& d : plan.gpus) gpus_.push_back(opencl::open_device(d));
    options_.chunk_size = plan.chunk;
    exe_ = fs::read_symlink("/proc/self/exe");
    cache_ = work_.path / "programs";  // the children's program cache: empty until the first child fills it
  }

  void run() {
    for (const Problem& p : plan_.problems) {
      std::map<std::int64_t, double> cli_rss;  // peak RSS MiB of the CLI forward by size, where it ran
      for (const std::int64_t S : plan_.tokens) {
        const Case c = case_of(p, S);
        if (auto cli = run_case(c, S == plan_.tokens.front())) cli_rss[S] = cli->peak_rss_mib();
      }
      peak_rss_row(p, cli_rss);
    }
  }

 private:
  Case case_of(const Problem& p, std::int64_t S) const {
    Case c;
    c.p = p;
    c.S = S;
    c.piece = std::min(plan_.stream_tokens, S);
    c.up = static_cast<double>(p.NH) * static_cast<double>(token_bytes(p.DK, p.DV, plan_.dtype));
    c.down = static_cast<double>(p.NH * p.DV) * static_cast<double>(dtype_size(plan_.dtype));
    return c;
  }

  // The synthetic pieces of a case, when they fit the memory budget; else why not.
  std::string pieces_refusal(const Case& c) const {
    const double pieces_bytes = 1.5 * kDistinctPieces * c.bytes(c.up, c.piece);  // float temporaries included
    const auto budget = static_cast<double>(memory_budget(plan_));
    if (pieces_bytes <= budget) return {};
    return "the synthetic inputs (" + std::to_string(kDistinctPieces) + " pieces of " + std::to_string(c.piece) +
           " tokens, about " + gib_text(pieces_bytes) + ") exceed the memory budget of " + gib_text(budget);
  }

  // One problem at one size: every row of it, in measurement order. Returns the CLI run, when it ran.
  std::optional<ChildRun> run_case(const Case& c, bool smallest) {
    if (const std::string why = pieces_refusal(c); !why.empty()) {
      for (const RowKind* kind : kCaseRows) report_.skipped(c, *kind, why);
      if (smallest) report_.skipped(c, kStartup, why);
      return std::nullopt;
    }
    const std::vector<ForwardInputs> pieces = make_pieces(c, plan_.dtype);
    // The whole sequence in memory when it fits (else the host runs stream it in pieces).
    const double budget = static_cast<double>(memory_budget(plan_));
    ForwardInputs whole;
    if (1.2 * c.bytes(c.up + c.down, c.S) <= budget) whole = tile_pieces(pieces, c.S);
    // Bounds of the GPU side.
    std::optional<TransferBound> transfer;
    try {
      transfer = transfer_bound(c, gpus_, plan_.repeats);
      const json extra{{"devices", transfer->devices}, {"note", transfer->note}};
      report_.bound(c, kTransfer, transfer->fw, extra);
      report_.bound(c, kTransferFwbw, transfer->fwbw, extra);
    } catch (const std::exception& e) {
      report_.failed(c, kTransfer, e.what());
      report_.failed(c, kTransferFwbw, e.what());
    }
    double host_copy = INFINITY, host_copy_fwbw = INFINITY;  // tokens/s the host copies allow, forward and fw+bw
    try {
      const double rate = host_copy_rate(plan_.repeats);
      host_copy = rate / (c.up + c.down);
      host_copy_fwbw = rate / (fwbw_up_bytes(c) + fwbw_down_bytes(c));
      report_.bound(c, kHostCopy, host_copy,
                    {{"GBps", rate * 1e-9},
                     {"note", "parallel copies of 256 MiB at " + std::to_string(static_cast<int>(rate * 1e-9)) +
                                  " GB/s; every byte up and down passes one"}});
    } catch (const std::exception& e) {
      report_.failed(c, kHostCopy, e.what());
    }
    std::optional<KernelBound> kernel;
    try {
      kernel = kernel_bound(c, pieces, whole, gpus_, options_, plan_.repeats, memory_budget(plan_));
      const json extra{{"tokens_measured", kernel->tokens}, {"devices", kernel->devices}, {"note", kernel->note}};
      report_.bound(c, kKernelFw, kernel->fw, extra);
      report_.bound(c, kKernelFwbw, kernel->fwbw, extra);
    } catch (const std::exception& e) {
      report_.failed(c, kKernelFw, e.what());
      report_.failed(c, kKernelFwbw, e.what());
    }
    const double fw_bound = std::min({transfer ? transfer->fw : INFINITY, kernel ? kernel->fw : INFINITY, host_copy});
    const double fwbw_bound =
        std::min({transfer ? transfer->fwbw : INFINITY, kernel ? kernel->fwbw : INFINITY, host_copy_fwbw});
    host_runs(c, pieces, std::move(whole), budget, fw_bound, fwbw_bound);
    pinned_run(c, pieces, budget, std::min(transfer ? transfer->fw : INFINITY, kernel ? kernel->fw : INFINITY),
               std::min(transfer ? transfer->fwbw : INFINITY, kernel ? kernel->fwbw : INFINITY));
    return file_runs(c, pieces, fw_bound, std::min(transfer ? transfer->fw : INFINITY, kernel ? kernel->fw : INFINITY),
                     smallest);
  }

  // forward, workers+GPU and forward+backward from host memory, in this process.
  void host_runs(const Case& c, const std::vector<ForwardInputs>& pieces, ForwardInputs host, double budget,
                 double fw_bound, double fwbw_bound) {
    const bool whole = !host.q.empty();
    const std::string how = whole ? std::string()
                                  : "streamed through StreamSession in pieces of " + std::to_string(c.piece) +
                                        " tokens: the inputs and h (" + gib_text(c.bytes(c.up + c.down, c.S)) +
                                        ") exceed the memory budget of " + gib_text(budget);
    const auto S = static_cast<double>(c.S);
    // The GPU alone and CPU workers + GPU, timed in turns (A B A B ...): the host's memory bandwidth and state drift
    // between rows timed apart (the pageable rows moved by up to 0.1 between calls), and a ratio of two such rows
    // measured the drift as well.
    const std::string both = "workers+" + plan_.devices;
    std::function<void()> gpu_call, both_call;
    try {
      gpu_call = whole ? forward_call(plan_.devices, host, pieces) : stream_call(plan_.devices, c, pieces);
    } catch (const std::exception& e) {
      report_.failed(c, kForwardHost, e.what());
      report_.failed(c, kWorkersPlus, "no GPU-alone forward to compare with");
      return;
    }
    std::string both_error;
    std::vector<std::string> both_used;  // the devices the workers+GPU plan gave work (fastest may leave some out)
    try {
      both_call = whole ? forward_call(both, host, pieces, &both_used) : stream_call(both, c, pieces, &both_used);
    } catch (const std::exception& e) {
      both_error = e.what();
    }
    try {
      const auto [gpu, with_workers] = timed_in_turns(gpu_call, both_call);
      json extra{{"devices", plan_.devices}, {"timed_runs", gpu.runs}};
      if (!how.empty()) extra["note"] = how;
      report_.run(c, kForwardHost, S, gpu.seconds, "min(transfer, host copies, kernel_fw)", fw_bound, extra);
      if (both_error.empty()) {
        std::string ran;
        for (const auto& d : both_used) ran += (ran.empty() ? "" : ", ") + d;
        json plus{{"devices", both},
                  {"devices_used", both_used},
                  {"gpu_alone_seconds", gpu.seconds},
                  {"timed_runs", with_workers.runs},
                  {"note", "timed in turns with the GPU alone; ran on " + (ran.empty() ? std::string("?") : ran)}};
        report_.run(c, kWorkersPlus, S, with_workers.seconds, "the GPU alone (forward_host)", S / gpu.seconds, plus);
      } else {
        report_.failed(c, kWorkersPlus, both_error);
      }
    } catch (const std::exception& e) {
      report_.failed(c, kForwardHost, e.what());
      report_.failed(c, kWorkersPlus, e.what());
    }
    // forward+backward: inputs, h (also dh) and the gradients in memory; the largest power of two that fits.
    auto fwbw_bytes = [&](std::int64_t tokens) { return 1.2 * c.bytes(2 * (c.up + c.down), tokens); };
    std::int64_t T = c.S;
    while (T > plan_.chunk && fwbw_bytes(T) > budget) {
      T = static_cast<std::int64_t>(std::bit_floor(static_cast<std::uint64_t>(T - 1)));
    }
    if (fwbw_bytes(T) > budget) {
      report_.skipped(c, kFwbwHost,
                      "inputs, h and gradients of even " + std::to_string(T) + " tokens exceed the memory budget of " +
                          gib_text(budget));
      return;
    }
    try {
      if (T != c.S || !whole) {
        host = ForwardInputs();
        host = tile_pieces(pieces, T);
      }
      graph::FlowGraphRunner runner(plan_.devices);
      StateCheckpoints kept;  // as a training step: the forward keeps its states, the backward starts there
      auto fwbw = [&](const ForwardArgs& a) {
        const ForwardResult fw = runner.forward(a, options_, 0, &kept);
        BackwardArgs b;
        b.inputs = a;
        b.dh = fw.h.view();  // dh = h
        b.checkpoints = &kept;
        (void)runner.backward(b, options_);
      };
      fwbw(pieces[0].args());  // warm-up: programs, pools
      const ForwardArgs a = host.args();
      const Timed t = timed([&] { fwbw(a); });
      json extra{{"devices", plan_.devices}, {"tokens_measured", T}, {"timed_runs", t.runs}};
      if (T < c.S) {
        extra["note"] = "measured on " + std::to_string(T) + " tokens: inputs, h and gradients of " +
                        std::to_string(c.S) + " exceed the memory budget of " + gib_text(budget);
      }
      report_.run(c, kFwbwHost, static_cast<double>(T), t.seconds, "min(transfer_fwbw, host copies, kernel_fwbw)",
                  fwbw_bound, extra);
    } catch (const std::exception& e) {
      report_.failed(c, kFwbwHost, e.what());
    }
  }

  // The forward through the graph from inputs in the GPU's page-locked memory (FlowGraphRunner::host_tensor, filled
  // before the timing, as a user fills such buffers) into an h there too (forward_into): no host copy on the way up
  // or down, so its bound is the issue's min(transfer, kernel_fw). Then forward+backward the same way (dh = h, the
  // gradients into page-locked tensors through backward_into), over the largest power of two of tokens whose
  // gradients fit the memory budget too; its bound is min(transfer_fwbw, kernel_fwbw).
  void pinned_run(const Case& c, const std::vector<ForwardInputs>& pieces, double budget, double bound,
                  double fwbw_bound) {
    if (1.2 * c.bytes(c.up + c.down, c.S) > budget) {
      for (const RowKind* row : {&kForwardPinned, &kFwbwPinned})
        report_.skipped(c, *row,
                        "the inputs and h (" + gib_text(c.bytes(c.up + c.down, c.S)) +
                            ") exceed the memory budget of " + gib_text(budget));
      return;
    }
    std::optional<graph::FlowGraphRunner> runner;
    ForwardInputs pinned;
    Tensor h;
    try {
      runner.emplace(plan_.devices);
      runner->set_balancing(graph::Balancing::fastest);
      pinned = tile_pieces(pieces, c.S,
                           [&](Shape shape, DType dtype) { return runner->host_tensor(std::move(shape), dtype); });
      h = runner->host_tensor({1, c.p.NH, c.S, c.p.DV}, plan_.dtype);
      (void)runner->forward(pieces[0].args(), options_);  // warm-up: programs, pools
      const ForwardArgs a = pinned.args();
      const Timed t = timed([&] { (void)runner->forward_into(h.view(), a, options_); });
      report_.run(c, kForwardPinned, static_cast<double>(c.S), t.seconds, "min(transfer, kernel_fw)", bound,
                  {{"devices", plan_.devices},
                   {"timed_runs", t.runs},
                   {"note", "inputs and h in FlowGraphRunner::host_tensor memory, forward_into"}});
    } catch (const std::exception& e) {
      report_.failed(c, kForwardPinned, e.what());
      report_.failed(c, kFwbwPinned, std::string("no pinned forward: ") + e.what());
      return;
    }
    // The gradients (q, k, v and the gates again) beside the inputs and h.
    const double have = c.bytes(c.up + c.down, c.S);
    std::int64_t T = c.S;
    while (T > plan_.chunk && 1.2 * (have + c.bytes(c.up, T)) > budget)
      T = static_cast<std::int64_t>(std::bit_floor(static_cast<std::uint64_t>(T - 1)));
    if (1.2 * (have + c.bytes(c.up, T)) > budget) {
      report_.skipped(c, kFwbwPinned,
                      "the gradients of even " + std::to_string(T) + " tokens exceed the memory budget of " +
                          gib_text(budget) + " beside the pinned inputs");
      return;
    }
    try {
      const ForwardArgs a = sequence_slice(pinned.args(), 0, T);
      const TensorView hT = sequence_slice(h.view(), 0, T);
      const DType gate_dtype = pinned.i.dtype();
      Tensor dq = runner->host_tensor({1, c.p.NH, T, c.p.DK}, plan_.dtype);
      Tensor dk = runner->host_tensor({1, c.p.NH, T, c.p.DK}, plan_.dtype);
      Tensor dv = runner->host_tensor({1, c.p.NH, T, c.p.DV}, plan_.dtype);
      Tensor di = runner->host_tensor({1, c.p.NH, T}, gate_dtype);
      Tensor df = runner->host_tensor({1, c.p.NH, T}, gate_dtype);
      const GradientViews grads{dq.view(), dk.view(), dv.view(), di.view(), df.view()};
      StateCheckpoints kept;  // the forward keeps the states its pieces leave; the backward starts there
      auto fwbw = [&] {
        (void)runner->forward_into(hT, a, options_, 0, &kept);
        BackwardArgs b;
        b.inputs = a;
        b.dh = hT;  // dh = h
        b.checkpoints = &kept;
        (void)runner->backward_into(grads, b, options_);
      };
      fwbw();  // warm-up: the backward's programs and stream
      const Timed t = timed(fwbw);
      json extra{{"devices", plan_.devices},
                 {"tokens_measured", T},
                 {"timed_runs", t.runs},
                 {"kept_state_bytes", kept.bytes()},
                 {"note",
                  "inputs, h (= dh) and the gradients in FlowGraphRunner::host_tensor memory, forward_into "
                  "keeping its states and backward_into starting from them"}};
      report_.run(c, kFwbwPinned, static_cast<double>(T), t.seconds, "min(transfer_fwbw, kernel_fwbw)", fwbw_bound,
                  extra);
    } catch (const std::exception& e) {
      report_.failed(c, kFwbwPinned, e.what());
    }
  }

  // The median of --repeats timed calls, fewer when they take more than 20 s together (a long run is its own
  // average): the row says how many ran.
  struct Timed {
    double seconds = 0;
    std::int64_t runs = 0;
  };
  Timed timed(const std::function<void()>& fn) const {
    Timed t;
    t.seconds = median_seconds(plan_.repeats, fn, false, 20.0, &t.runs);
    return t;
  }

  // Two calls timed in turns, max(--repeats, 5) each (fewer when a round takes more than 20 s): medians of each. `b`
  // may be empty (then only `a` is timed). Five: the two are often the same engine (fastest keeps the GPU alone),
  // and three pairs left their medians 3% apart on the H200 host.
  std::pair<Timed, Timed> timed_in_turns(const std::function<void()>& a, const std::function<void()>& b) const {
    std::vector<double> ta, tb;
    double total = 0;
    auto time = [&](const std::function<void()>& fn, std::vector<double>& into) {
      const auto t0 = Clock::now();
      fn();
      into.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      total += into.back();
    };
    for (std::int64_t rep = 0; rep < std::max<std::int64_t>(plan_.repeats, 5) && (rep == 0 || total < 20.0); ++rep) {
      time(a, ta);
      if (b) time(b, tb);
    }
    auto medians = [](const std::vector<double>& t) {
      return Timed{median_of(t), static_cast<std::int64_t>(t.size())};
    };
    return {medians(ta), medians(tb)};
  }

  // A forward of the whole host inputs through the graph over `spec`, warmed up on a piece (the call owns its runner).
  // `used` (optional): after each call, the devices its plan gave work.
  std::function<void()> forward_call(const std::string& spec, const ForwardInputs& host,
                                     const std::vector<ForwardInputs>& pieces,
                                     std::vector<std::string>* used = nullptr) {
    auto runner = std::make_shared<graph::FlowGraphRunner>(spec);
    runner->set_balancing(graph::Balancing::fastest);  // several devices: measured once (in the warm-up), kept
    (void)runner->forward(pieces[0].args(), options_);
    return [this, runner, a = host.args(), used] {
      (void)runner->forward(a, options_);
      if (used) *used = runner->last_plan().devices;
    };
  }

  // The same through a StreamSession over `spec`, two pieces in flight behind the one taken.
  std::function<void()> stream_call(const std::string& spec, const Case& c, const std::vector<ForwardInputs>& pieces,
                                    std::vector<std::string>* used = nullptr) {
    StreamConfig cfg;
    cfg.B = 1;
    cfg.NH = c.p.NH;
    cfg.DHQK = c.p.DK;
    cfg.DHHV = c.p.DV;
    cfg.options = options_;
    cfg.devices = spec;
    {
      StreamSession warm(cfg);
      (void)warm.push(pieces[0].args());
    }
    return [cfg, &c, &pieces, used] {
      StreamSession session(cfg);
      std::deque<std::uint64_t> in_flight;
      for (std::int64_t t0 = 0; t0 < c.S; t0 += c.piece) {
        const ForwardInputs& l = pieces[static_cast<std::size_t>(t0 / c.piece) % pieces.size()];
        in_flight.push_back(session.submit(sequence_slice(l.args(), 0, std::min(c.piece, c.S - t0))));
        if (in_flight.size() > 2) {
          (void)session.take(in_flight.front());
          in_flight.pop_front();
        }
      }
      for (; !in_flight.empty(); in_flight.pop_front()) (void)session.take(in_flight.front());
      if (used && session.runner()) *used = session.runner()->last_plan().devices;
    };
  }

  // The .npy runs: the file-read bound, the CLI forward (and at the smallest size first a cold one, for the
  // start-up row) and the Python forward. Returns the CLI run.
  std::optional<ChildRun> file_runs(const Case& c, const std::vector<ForwardInputs>& pieces, double fw_bound,
                                    double pinned_bound, bool smallest) {
    const double files_bytes = c.bytes(c.up + c.down, c.S) + static_cast<double>(64 << 20);
    const double free_bytes = static_cast<double>(disk_free(work_.path));
    if (files_bytes > free_bytes) {
      const std::string why = "the .npy inputs and h (" + gib_text(files_bytes) + ") exceed the free disk space of " +
                              gib_text(free_bytes) + " in " + work_.path.string();
      for (const RowKind* kind : {&kFileRead, &kFileIo, &kForwardFiles, &kForwardPython, &kForwardPythonPinned})
        report_.skipped(c, *kind, why);
      if (smallest) report_.skipped(c, kStartup, why);
      return std::nullopt;
    }
    const fs::path dir = work_.path / (c.p.name + "_" + std::to_string(c.S));
    fs::create_directory(dir);  // not create_directories: a work directory a signal removed is not made again
    const RemovedAtEnd files_go{dir};
    NpyInputs files;
    double file_bound = INFINITY;
    try {
      files = write_inputs(dir, c, pieces, plan_.dtype);
      const double secs = read_back_seconds(files.all());
      double bytes = 0;
      for (const auto& f : files.all()) bytes += static_cast<double>(fs::file_size(f));
      file_bound = static_cast<double>(c.S) / secs;
      char note[96];
      std::snprintf(note, sizeof note, "%.2f GB/s, pread after POSIX_FADV_DONTNEED", bytes / secs * 1e-9);
      report_.bound(c, kFileRead, file_bound, {{"GBps", bytes / secs * 1e-9}, {"seconds", secs}, {"note", note}});
    } catch (const std::exception& e) {
      report_.failed(c, kFileRead, e.what());
      report_.skipped(c, kFileIo, "no .npy inputs");
      for (const RowKind* kind : {&kForwardFiles, &kForwardPython, &kForwardPythonPinned})
        report_.skipped(c, *kind, "no .npy inputs");
      if (smallest) report_.skipped(c, kStartup, "no .npy inputs");
      return std::nullopt;
    }
    const double file_io_bound = file_io(c, files, dir);
    std::optional<ChildRun> cli = cli_forward(c, files, dir, std::min(fw_bound, file_bound), file_io_bound, smallest);
    python_forward(c, files, dir, fw_bound, pinned_bound);
    return cli;
  }

  // The file_io bound (tokens/s; NaN when it failed, as its row says): the inputs read back while h's bytes are
  // written and synced beside them, a slice at a time, as the CLI forward does on the same disk.
  double file_io(const Case& c, const NpyInputs& files, const fs::path& dir) {
    try {
      const auto h_bytes = static_cast<std::size_t>(c.bytes(c.down, c.S));
      const auto slice = static_cast<std::size_t>(c.bytes(c.down, std::min(plan_.stream_tokens, c.S)));
      const double secs = read_while_writing_seconds(files.all(), dir, h_bytes, slice);
      double bytes = static_cast<double>(h_bytes);
      for (const auto& f : files.all()) bytes += static_cast<double>(fs::file_size(f));
      char note[160];
      std::snprintf(note, sizeof note,
                    "%.2f GB/s of reads and writes together (h's bytes written and fdatasynced a slice at a time "
                    "beside the reads)",
                    bytes / secs * 1e-9);
      report_.bound(c, kFileIo, static_cast<double>(c.S) / secs,
                    {{"GBps", bytes / secs * 1e-9}, {"seconds", secs}, {"note", note}});
      return static_cast<double>(c.S) / secs;
    } catch (const std::exception& e) {
      report_.failed(c, kFileIo, e.what());
      return NAN;
    }
  }

  std::optional<ChildRun> cli_forward(const Case& c, const NpyInputs& files, const fs::path& dir, double bound,
                                      double file_io_bound, bool smallest) {
    const double budget = static_cast<double>(memory_budget(plan_));
    const double slices = 3 * c.bytes(c.up + c.down, std::min(plan_.stream_tokens, c.S));
    if (slices > budget) {
      const std::string why = "three slices of " + std::to_string(plan_.stream_tokens) + " tokens (" +
                              gib_text(slices) + ") exceed the memory budget of " + gib_text(budget);
      report_.skipped(c, kForwardFiles, why);
      if (smallest) report_.skipped(c, kStartup, why);
      return std::nullopt;
    }
    std::vector<std::string> args{exe_.string(), "--json", "forward", "--q",   files.q, "--k",  files.k,
                                  "--v",         files.v,  "--i",     files.i, "--f",   files.f};
    if (plan_.dtype == DType::bf16) args.insert(args.end(), {"--dtype", "bfloat16"});
    args.insert(args.end(), {"--chunk-size", std::to_string(plan_.chunk), "--devices", plan_.devices, "--stream-tokens",
                             std::to_string(plan_.stream_tokens), "--memory-limit",
                             std::to_string(static_cast<std::uint64_t>(budget)), "--out", (dir / "h.npy").string()});
    const std::map<std::string, std::string> env{{"MLSTM_PROGRAM_CACHE", cache_.string()}};
    auto run_once = [&] {
      for (const auto& f : files.all()) drop_cached(f);  // from the disk, as the file-read bound
      ChildRun r = spawn(args, env, dir);
      std::error_code ec;
      fs::remove(dir / "h.npy", ec);
      if (!r.ok() || !r.result.is_object()) throw Error("mlstm forward: " + r.failure());
      return r;
    };
    std::optional<ChildRun> cold;
    try {
      if (smallest) cold = run_once();  // fills the (empty) program cache: the first run of the start-up row
      ChildRun r = run_once();
      // Against the issue's bound (the reads alone), and, beside it, against min(transfer, host copies,
      // kernel_fw, file_io): the reads with h's writes.
      const double io_bound = std::min(bound, file_io_bound);
      report_.run(
          c, kForwardFiles, static_cast<double>(c.S), r.seconds, "min(transfer, host copies, kernel_fw, file_read)",
          bound,
          {{"ratio_vs_file_io",
            std::isfinite(file_io_bound) ? json(static_cast<double>(c.S) / r.seconds / io_bound) : json(nullptr)},
           {"devices", r.result.value("devices", json::array())},
           {"stream_tokens", plan_.stream_tokens},
           {"peak_rss_mib", r.peak_rss_mib()},
           {"first_token_seconds", r.result.value("first_token_seconds", json(nullptr))}});
      if (smallest) startup_row(c, *cold, r, startup_floor(env, dir));
      return r;
    } catch (const std::exception& e) {
      report_.failed(c, kForwardFiles, e.what());
      if (smallest) report_.skipped(c, kStartup, "the CLI forward failed");
      return std::nullopt;
    }
  }

  // The floor under a run's first token: a process of its own that only opens the run's devices (mlstm devices
  // --open), after the CLI runs (the driver as warm as for the second one). Seconds from its start to the devices
  // open; NaN when it failed (the row says so).
  double startup_floor(const std::map<std::string, std::string>& env, const fs::path& dir) const {
    const ChildRun r = spawn({exe_.string(), "--json", "devices", "--open", plan_.devices}, env, dir);
    if (!r.ok() || !r.result.is_object()) return NAN;
    return r.result.value("opened_after_seconds", NAN);
  }

  void startup_row(const Case& c, const ChildRun& cold, const ChildRun& warm, double floor) {
    const json first = warm.result.value("first_token_seconds", json(nullptr));
    if (!first.is_number()) {
      report_.failed(c, kStartup, "the CLI forward reported no first_token_seconds");
      return;
    }
    const json cold_first = cold.result.value("first_token_seconds", json(nullptr));
    char note[320];
    std::snprintf(note, sizeof note,
                  "first token after %.3f s of the second CLI run's %.3f s (the first run, on an empty program "
                  "cache: %.3f s); opening the devices alone, in a process of its own, takes %.3f s (%.3f of the run)",
                  first.get<double>(), warm.seconds, cold_first.is_number() ? cold_first.get<double>() : NAN, floor,
                  floor / warm.seconds);
    json extra{{"first_token_seconds", first},
               {"cold_first_token_seconds", cold_first},
               {"run_seconds", warm.seconds},
               {"devices_open_floor_seconds", std::isfinite(floor) ? json(floor) : json(nullptr)},
               {"note", note}};
    // Under MLSTM_TRACE=1 (inherited by the runs) the second run's trace comes with the row: what its first
    // token waited for.
    if (trace_enabled()) extra["trace"] = trace_lines(warm.err);
    report_.ratio(c, kStartup, first.get<double>() / warm.seconds, extra);
  }

  // Python's forward from numpy arrays in ordinary memory, then (forward_python_pinned) from host_array()s with h
  // into one (out=), the arrays copied there before the timing as a user fills such buffers: its bound is
  // min(transfer, kernel_fw), as the C++ page-locked row's.
  void python_forward(const Case& c, const NpyInputs& files, const fs::path& dir, double bound, double pinned_bound) {
    if (!python_) python_ = find_python(exe_, dir);
    if (!python_->missing.empty()) {
      for (const RowKind* kind : {&kForwardPython, &kForwardPythonPinned}) report_.skipped(c, *kind, python_->missing);
      return;
    }
    // numpy arrays, the library's copies of them, h and its numpy copy; the host_array()s and their h beside them.
    const double need = 1.2 * 2 * c.bytes(c.up + c.down, c.S), budget = static_cast<double>(memory_budget(plan_));
    const double need_pinned = need + 1.2 * c.bytes(c.up + c.down, c.S);
    if (need > budget) {
      for (const RowKind* kind : {&kForwardPython, &kForwardPythonPinned})
        report_.skipped(
            c, *kind,
            "the arrays and their copies (" + gib_text(need) + ") exceed the memory budget of " + gib_text(budget));
      return;
    }
    const bool pinned = need_pinned <= budget;
    if (!pinned)
      report_.skipped(c, kForwardPythonPinned,
                      "the arrays, their copies and host_array()s (" + gib_text(need_pinned) +
                          ") exceed the memory budget of " + gib_text(budget));
    try {
      const json a{{"files", {{"q", files.q}, {"k", files.k}, {"v", files.v}, {"i", files.i}, {"f", files.f}}},
                   {"devices", plan_.devices},
                   {"chunk", plan_.chunk},
                   {"warm_up_tokens", c.piece},
                   {"pinned", pinned},
                   {"dtype", plan_.dtype == DType::bf16 ? "bfloat16" : ""}};
      std::map<std::string, std::string> env = python_->env;
      env["MLSTM_PROGRAM_CACHE"] = cache_.string();
      const ChildRun r = spawn({python_->interpreter, "-c", kPythonForward, a.dump()}, env, dir);
      const json seconds = r.result.is_object() ? r.result.value("seconds", json(nullptr)) : json(nullptr);
      if (!r.ok() || !seconds.is_number()) throw Error("python forward: " + r.failure());
      report_.run(c, kForwardPython, static_cast<double>(c.S), seconds.get<double>(),
                  "min(transfer, host copies, kernel_fw)", bound,
                  {{"devices", plan_.devices},
                   {"note", "timed in the child after loading the files and a warm-up on the first piece"}});
      if (pinned) {
        const json s = r.result.value("pinned_seconds", json(nullptr));
        if (!s.is_number()) throw Error("python forward: no pinned_seconds in " + r.result.dump());
        report_.run(c, kForwardPythonPinned, static_cast<double>(c.S), s.get<double>(), "min(transfer, kernel_fw)",
                    pinned_bound,
                    {{"devices", plan_.devices},
                     {"note", "the arrays copied into host_array()s before the timing; h into one (out=)"}});
      }
    } catch (const std::exception& e) {
      report_.failed(c, kForwardPython, e.what());
      if (pinned) report_.failed(c, kForwardPythonPinned, e.what());
    }
  }

  // Peak RSS at the largest size over that at the smallest: of the CLI forward children where they ran at both,
  // else of `mlstm run --mode stream` children at both (synthetic pieces, no files).
  void peak_rss_row(const Problem& p, const std::map<std::int64_t, double>& cli_rss) {
    const Case small = case_of(p, plan_.tokens.front()), large = case_of(p, plan_.tokens.back());
    if (plan_.tokens.size() < 2) {
      report_.skipped(large, kPeakRss, "needs two --system-tokens");
      return;
    }
    std::string source = "the peak_rss_mib (VmHWM) the CLI forward children report";
    std::map<std::int64_t, double> rss = cli_rss;
    if (!rss.count(small.S) || !rss.count(large.S)) {
      std::string ran;
      for (const auto& [S, mib] : cli_rss) ran += (ran.empty() ? "" : ", ") + std::to_string(S);
      source = "the peak_rss_mib (VmHWM) `mlstm run --mode stream` children report: the CLI forward ran at " +
               (ran.empty() ? std::string("neither size") : ran + " only");
      for (const Case& c : {small, large}) {
        if (const std::string why = pieces_refusal(c); !why.empty()) {
          report_.skipped(large, kPeakRss, why + " (" + std::to_string(c.S) + " tokens)");
          return;
        }
      }
      try {
        for (const Case& c : {small, large}) rss[c.S] = run_rss(c);
      } catch (const std::exception& e) {
        report_.failed(large, kPeakRss, e.what());
        return;
      }
    }
    const double a = rss.at(small.S), b = rss.at(large.S);
    report_.ratio(
        large, kPeakRss, b / a,
        {{"peak_rss_mib", {a, b}},
         {"sizes", {small.S, large.S}},
         {"note", std::to_string(std::lround(a)) + " MiB at " + std::to_string(small.S) + " tokens, " +
                      std::to_string(std::lround(b)) + " MiB at " + std::to_string(large.S) + " (" + source + ")"}});
  }

  // Peak RSS (MiB) of `mlstm run --mode stream` on the case: its pieces through a StreamSession over --devices.
  double run_rss(const Case& c) {
    const ChildRun r = spawn({exe_.string(),
                              "--json",
                              "run",
                              "--batch",
                              "1",
                              "--heads",
                              std::to_string(c.p.NH),
                              "--seq-len",
                              std::to_string(c.S),
                              "--dqk",
                              std::to_string(c.p.DK),
                              "--dhv",
                              std::to_string(c.p.DV),
                              "--dtype",
                              std::string(dtype_name(plan_.dtype)),
                              "--chunk-size",
                              std::to_string(plan_.chunk),
                              "--piece",
                              std::to_string(c.piece),
                              "--devices",
                              plan_.devices,
                              "--mode",
                              "stream",
                              "--check-tokens",
                              "0"},
                             {{"MLSTM_PROGRAM_CACHE", cache_.string()}}, work_.path);
    if (!r.ok()) throw Error("mlstm run: " + r.failure());
    return r.peak_rss_mib();
  }

  const SystemPlan& plan_;
  Report& report_;
  WorkDir work_;
  std::vector<std::shared_ptr<opencl::Device>> gpus_;
  MlstmOptions options_;
  fs::path exe_, cache_;
  std::optional<Python> python_;
};

}  // namespace

void refuse_system_options(const BenchOptions& bo) {
  for (const char* name : kSystemOnly) {
    if (option_given(bo, name)) throw InvalidArgument(name, "has an effect only with --system");
  }
}

int cmd_bench_system(const BenchOptions& bo, bool as_json) {
  // First, before any other thread starts (the devices' own among them): they inherit the blocked signals.
  StopOnSignal stopper;
  const SystemPlan plan = check_system(bo);
  Report report(plan, as_json);
  {
    SystemBench bench(plan, report);
    bench.run();
  }
  if (as_json) std::printf("%s\n", report.document().dump().c_str());
  if (std::fflush(stdout) != 0) throw Error(std::string("writing stdout: ") + std::strerror(errno));
  return report.errors() > 0 ? 1 : 0;
}

}  // namespace mlstm::cli
