// mlstm bench --system (issue 14 item 6) on PoCL devices at tiny problems: every row is there with a positive rate
// and a finite ratio, or says why it was skipped; the CSV and JSON files are written and the work directory is
// removed; a size that cannot fit the memory given is a skipped row; bad options exit with code 2 and one line
// naming the option; SIGTERM or SIGINT mid-run removes the work directory and ends the run with that signal; a work
// directory a killed run left is removed at the next start once its owner is gone, and only then. No timing is asserted (speed lives in the benchmarks and docs/PERFORMANCE.md).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <thread>

#include "test_util.hpp"

namespace mlstm {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// The rows of one problem at one size, and those of one problem.
const std::set<std::string> kCaseIds{
    "transfer",      "transfer_fwbw",  "host_copy",      "kernel_fw",        "kernel_fwbw",
    "file_read",     "file_io",        "forward_host",   "workers_plus_gpu", "fwbw_host",
    "forward_files", "forward_python", "forward_pinned", "fwbw_pinned",      "forward_python_pinned"};

class CliBenchSystem : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::fresh_test_dir("mlstm_cli_bench_system_");
    fs::create_directories(dir_ / "work");
  }
  void TearDown() override { fs::remove_all(dir_); }
  testing::CommandRun bench(const std::string& args) {
    return testing::run_command(dir_, std::string(MLSTM_CLI_PATH) + " " + args);
  }
  // `mlstm --json bench --system <args>`, its files and work directory in the test's directory: exit code 0
  // expected, the JSON it prints.
  json system_run(const std::string& args) {
    const auto r = bench("--json bench --system " + args + " --csv " + (dir_ / "s.csv").string() + " --json-out " +
                         (dir_ / "s.json").string() + " --workdir " + (dir_ / "work").string());
    EXPECT_EQ(r.code, 0) << r.err;
    return json::parse(r.out, nullptr, false);
  }
  // Rows by (id, tokens).
  static std::map<std::pair<std::string, std::int64_t>, json> rows_of(const json& doc) {
    std::map<std::pair<std::string, std::int64_t>, json> rows;
    for (const auto& row : doc["rows"]) {
      const auto key = std::make_pair(row["id"].get<std::string>(), row["tokens"].get<std::int64_t>());
      EXPECT_EQ(rows.count(key), 0u) << "row given twice: " << row.dump();
      rows[key] = row;
    }
    return rows;
  }
  // Starts `mlstm --json bench --system <args>` (its files and work directory in the test's directory) in a child of
  // its own, SIGINT, SIGTERM and SIGHUP at their default actions and unblocked whatever the test runner set; its pid.
  pid_t start_system_run(const std::string& args) {
    std::vector<std::string> words{MLSTM_CLI_PATH, "--json", "bench", "--system"};
    std::istringstream in(args);
    for (std::string w; in >> w;) words.push_back(w);
    for (const std::string& w : {std::string("--csv"), (dir_ / "s.csv").string(), std::string("--json-out"),
                                 (dir_ / "s.json").string(), std::string("--workdir"), (dir_ / "work").string()})
      words.push_back(w);
    std::vector<char*> argv;
    for (auto& w : words) argv.push_back(w.data());
    argv.push_back(nullptr);
    const std::string out = (dir_ / "run.out").string(), err = (dir_ / "run.err").string();
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::dup2(::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644), 1);
      ::dup2(::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644), 2);
      for (const int sig : {SIGINT, SIGTERM, SIGHUP}) ::signal(sig, SIG_DFL);
      sigset_t none;
      sigemptyset(&none);
      ::sigprocmask(SIG_SETMASK, &none, nullptr);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    return pid;
  }
  // The first path under the work directory named `name`, polled every 2 ms while `pid` runs (at most 5 minutes);
  // empty when the run ended first.
  fs::path wait_for_file(pid_t pid, const std::string& name) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::minutes(5);
    while (std::chrono::steady_clock::now() < end) {
      std::error_code ec;
      for (fs::recursive_directory_iterator it(dir_ / "work", ec), stop; !ec && it != stop; it.increment(ec)) {
        if (it->path().filename() == name) return it->path();
      }
      int status = 0;
      if (::waitpid(pid, &status, WNOHANG) == pid) return {};
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return {};
  }
  // SIGTERM or SIGINT once `name` exists under the work directory: the run ends by that signal (exit status 128 + it
  // in a shell), its work directory removed, the CSV and JSON complete (the rows measured so far) with no temporary
  // file beside them, a line on stderr saying so.
  void stopped_by(int sig, const std::string& name) {
    const pid_t pid = start_system_run("--system-problems 2x16x16 --system-tokens 8192 --devices 0 --repeats 1");
    ASSERT_GT(pid, 0);
    const fs::path seen = wait_for_file(pid, name);
    if (seen.empty()) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
      FAIL() << "the run ended before " << name << " appeared: " << testing::slurp(dir_ / "run.err");
    }
    ASSERT_EQ(::kill(pid, sig), 0);
    // Promptly: neither the measurement under way nor the child waits for its end (a minute is far more than enough).
    int status = 0;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(1);
    while (::waitpid(pid, &status, WNOHANG) != pid) {
      if (std::chrono::steady_clock::now() > deadline) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, nullptr, 0);
        FAIL() << "still running a minute after the signal: " << testing::slurp(dir_ / "run.err");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    const std::string err = testing::slurp(dir_ / "run.err");
    ASSERT_TRUE(WIFSIGNALED(status)) << "exit code " << (WIFEXITED(status) ? WEXITSTATUS(status) : -1) << ": " << err;
    EXPECT_EQ(WTERMSIG(status), sig) << err;
    EXPECT_FALSE(fs::exists(seen));
    EXPECT_TRUE(fs::is_empty(dir_ / "work")) << "left: " << (*fs::directory_iterator(dir_ / "work")).path();
    EXPECT_NE(err.find(std::string("stopped by ") + (sig == SIGINT ? "SIGINT" : "SIGTERM")), std::string::npos) << err;
    for (const auto& entry : fs::directory_iterator(dir_)) {
      const std::string file = entry.path().filename().string();
      EXPECT_EQ(file.find(".tmp."), std::string::npos) << file;
    }
    if (fs::exists(dir_ / "s.json")) {
      const json saved = json::parse(testing::slurp(dir_ / "s.json"), nullptr, false);
      EXPECT_TRUE(saved.is_object() && saved["rows"].is_array());
    }
  }
  fs::path dir_;
};

// The owner record of a work directory (bench_system.cpp's .owner).
std::string first_line(const fs::path& p) {
  std::ifstream in(p);
  std::string line;
  std::getline(in, line);
  return line;
}
std::string own_start_time() {
  const std::string stat = first_line("/proc/self/stat");
  std::istringstream fields(stat.substr(stat.rfind(')') + 1));
  std::string field;
  for (int j = 3; j <= 22; ++j) fields >> field;
  return field;
}
std::string this_host() {
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  return host;
}
void write_owner(const fs::path& dir, long long pid, const std::string& start_time,
                 const std::string& host = this_host()) {
  std::ofstream(dir / ".owner") << "mlstm bench --system work directory\npid " << pid << "\nstart_time " << start_time
                                << "\nboot_id " << first_line("/proc/sys/kernel/random/boot_id") << "\nhost " << host
                                << "\n";
}
void touch(const fs::path& p) { std::ofstream(p) << "x"; }

TEST_F(CliBenchSystem, EveryRowOnATinyProblem) {
  const json doc = system_run("--system-problems 2x16x16 --system-tokens 4096,8192 --devices 0 --repeats 1");
  ASSERT_TRUE(doc.is_object());
  // The machine and the build.
  EXPECT_FALSE(doc["revision"].get<std::string>().empty());
  EXPECT_FALSE(doc["machine"]["cpu"].get<std::string>().empty());
  ASSERT_EQ(doc["machine"]["gpus"].size(), 1u);
  EXPECT_FALSE(doc["machine"]["gpus"][0]["name"].get<std::string>().empty());
  EXPECT_TRUE(doc["machine"]["gpus"][0].contains("driver"));
  EXPECT_EQ(doc["errors"], 0);
  const auto rows = rows_of(doc);
  for (const std::int64_t S : {4096, 8192}) {
    for (const auto& id : kCaseIds) EXPECT_EQ(rows.count({id, S}), 1u) << id << " at " << S;
  }
  EXPECT_EQ(rows.count({"startup", 4096}), 1u);
  EXPECT_EQ(rows.count({"peak_rss", 8192}), 1u);
  EXPECT_EQ(rows.size(), 2 * kCaseIds.size() + 2);
  for (const auto& [key, row] : rows) {
    SCOPED_TRACE(row.dump());
    EXPECT_FALSE(row.contains("error"));
    if (row.contains("skipped")) {
      // Only Python may be missing here (the module is built only where pybind11 is found).
      EXPECT_TRUE(key.first == "forward_python" || key.first == "forward_python_pinned") << key.first;
      EXPECT_FALSE(row["skipped"].get<std::string>().empty());
      continue;
    }
    if (row["kind"] == "bound") {
      EXPECT_GT(row["tokens_per_s"].get<double>(), 0);
      EXPECT_TRUE(std::isfinite(row["tokens_per_s"].get<double>()));
      continue;
    }
    EXPECT_EQ(row["kind"], "run");
    ASSERT_TRUE(row.contains("ratio"));
    EXPECT_TRUE(std::isfinite(row["ratio"].get<double>()));
    EXPECT_GT(row["ratio"].get<double>(), 0);
    EXPECT_TRUE(row["pass"].is_boolean());
    EXPECT_GT(row["target"].get<double>(), 0);
    if (row.contains("tokens_per_s")) {
      EXPECT_GT(row["tokens_per_s"].get<double>(), 0);
      EXPECT_GT(row["bound_tokens_per_s"].get<double>(), 0);
      EXPECT_TRUE(std::isfinite(row["bound_tokens_per_s"].get<double>()));
    }
  }
  // The kernel bound ran on the whole sequence, the CLI row reports the child's memory and first token.
  EXPECT_EQ(rows.at({"kernel_fw", 8192})["tokens_measured"], 8192);
  EXPECT_GT(rows.at({"forward_files", 8192})["peak_rss_mib"].get<double>(), 0);
  // Beside its bound (the reads alone), the CLI row's ratio against file_io: the reads with h's writes beside them.
  EXPECT_GT(rows.at({"forward_files", 8192})["ratio_vs_file_io"].get<double>(), 0);
  EXPECT_GT(rows.at({"file_io", 8192})["GBps"].get<double>(), 0);
  EXPECT_GT(rows.at({"startup", 4096})["first_token_seconds"].get<double>(), 0);
  // The workers+GPU row names the devices its plan gave work (fastest may leave the workers out).
  EXPECT_GE(rows.at({"workers_plus_gpu", 4096})["devices_used"].size(), 1u)
      << rows.at({"workers_plus_gpu", 4096}).dump();
  // The floor under it: the devices opened in a process of their own (devices --open), no later than the first token.
  const json& floor = rows.at({"startup", 4096})["devices_open_floor_seconds"];
  ASSERT_TRUE(floor.is_number()) << rows.at({"startup", 4096}).dump();
  EXPECT_GT(floor.get<double>(), 0);
  EXPECT_EQ(rows.at({"peak_rss", 8192})["peak_rss_mib"].size(), 2u);
  // The files: the same rows as stdout, one CSV line each after the header; the work directory is empty again.
  const json saved = json::parse(testing::slurp(dir_ / "s.json"));
  EXPECT_EQ(saved["rows"], doc["rows"]);
  const std::string csv = testing::slurp(dir_ / "s.csv");
  EXPECT_EQ(csv.rfind("kind,id,problem,", 0), 0u) << csv;
  // Probe 42: the CLI row's second ratio is a column of the CSV too (it was in the JSON only).
  EXPECT_NE(csv.find(",ratio,ratio_vs_file_io,target,"), std::string::npos) << csv.substr(0, csv.find('\n'));
  EXPECT_EQ(static_cast<std::size_t>(std::count(csv.begin(), csv.end(), '\n')), doc["rows"].size() + 1);
  EXPECT_TRUE(fs::is_empty(dir_ / "work"));
}

// A size whose inputs cannot fit the memory given is a row per measurement that says so, never left out; the
// peak-RSS row says which sizes ran.
TEST_F(CliBenchSystem, WhatDoesNotFitIsASkippedRow) {
  const json doc = system_run("--system-problems 2x16x16 --system-tokens 65536 --devices 0 --memory-limit 40000000");
  ASSERT_TRUE(doc.is_object());
  const auto rows = rows_of(doc);
  for (const auto& id : kCaseIds) {
    ASSERT_EQ(rows.count({id, 65536}), 1u) << id;
    EXPECT_NE(rows.at({id, 65536})["skipped"].get<std::string>().find("memory budget"), std::string::npos)
        << rows.at({id, 65536}).dump();
  }
  EXPECT_TRUE(rows.at({"startup", 65536}).contains("skipped"));
  EXPECT_TRUE(rows.at({"peak_rss", 65536}).contains("skipped"));
  EXPECT_TRUE(fs::exists(dir_ / "s.csv"));
  EXPECT_TRUE(fs::exists(dir_ / "s.json"));
}

// Bad input: exit code 2, one line naming the option, before anything is measured or written.
TEST_F(CliBenchSystem, BadOptionsAreRefusedNamingThem) {
  const std::string sys = "bench --system --devices 0 --system-problems 2x16x16 --system-tokens 256";
  const std::string out = (dir_ / "s.csv").string();
  const std::vector<std::pair<std::string, std::string>> cases{
      {sys + " --system-problems 2x16", "--system-problems"},
      {sys + " --system-problems 0x16x16", "--system-problems"},
      {sys + " --system-problems 2x16x16x4", "--system-problems"},
      {sys + " --system-problems 2xax16", "--system-problems"},
      {sys + " --system-tokens 0", "--system-tokens"},
      {sys + " --system-tokens -5", "--system-tokens"},
      {sys + " --system-tokens 1125899906842625", "--system-tokens"},
      {sys + " --system-tokens abc", "--system-tokens"},
      {sys + " --system-stream-tokens 0", "--system-stream-tokens"},
      {sys + " --memory-limit 0", "--memory-limit"},
      {sys + " --repeats 0", "--repeats"},
      {sys + " --chunk-sizes 0", "--chunk-sizes"},
      {sys + " --chunk-sizes 64 128", "--chunk-sizes"},
      {sys + " --dtype float64", "--dtype"},
      {sys + " --dtype nope", "--dtype"},
      {sys + " --devices workers", "--devices"},
      {sys + " --devices 0+1", "--devices"},
      {sys + " --devices 99", "--devices"},
      {sys + " --workdir " + (dir_ / "missing").string(), "--workdir"},
      {sys + " --csv " + (dir_ / "missing" / "s.csv").string(), "--csv"},
      {sys + " --csv " + out + " --json-out " + out, "--json-out"},
      {sys + " --tokens 64", "--tokens"},
      {sys + " --seq-lens 32", "--seq-lens"},
      {sys + " --graph-devices workers", "--graph-devices"},
      {sys + " --backward", "--backward"},
      {"bench --system-tokens 4096", "--system-tokens"},
      {"bench --devices 0", "--devices"},
      {"bench --workdir " + dir_.string(), "--workdir"},
  };
  for (const auto& [args, option] : cases) {
    SCOPED_TRACE(args);
    // Options given twice would be refused by the parser, not by the check under test: added where not given.
    std::string full = args;
    if (args.rfind("bench --system ", 0) == 0 && args.find("--devices") == std::string::npos) full += " --devices 0";
    if (args.find("--csv") == std::string::npos) full += " --csv " + out + " --json-out " + (dir_ / "s.json").string();
    testing::expect_refused(bench(full), 2, option);
  }
  EXPECT_FALSE(fs::exists(dir_ / "s.csv"));
  EXPECT_FALSE(fs::exists(dir_ / "s.json"));
}

// SIGTERM while a child (the CLI forward) runs, SIGINT while the .npy inputs are there: the work directory goes.
TEST_F(CliBenchSystem, SigtermRemovesTheWorkDirectory) { stopped_by(SIGTERM, "child.out"); }
TEST_F(CliBenchSystem, SigintRemovesTheWorkDirectory) { stopped_by(SIGINT, "f.npy"); }

// Work directories a killed run left: removed at the next start when the owner record names a process that is gone
// (a pid no longer running; a pid running again but started at another time), and there only the files bench makes
// (a foreign file stays, and a symbolic link, never followed); one whose owner runs, one of another host, and one
// without a record stay as they are.
TEST_F(CliBenchSystem, StaleWorkDirectoriesOfGoneRunsAreRemoved) {
  const fs::path work = dir_ / "work";
  const pid_t gone = ::fork();
  if (gone == 0) ::_exit(0);
  ASSERT_GT(gone, 0);
  ASSERT_EQ(::waitpid(gone, nullptr, 0), gone);
  auto make = [&](const std::string& suffix) {
    const fs::path d = work / ("mlstm-bench-system." + suffix);
    fs::create_directories(d / "2x16x16_4096");
    for (const char* f : {"q.npy", "k.npy", "v.npy", "i.npy", "f.npy"}) touch(d / "2x16x16_4096" / f);
    return d;
  };
  const fs::path dead = make("dead01"), reused = make("dead02"), live = make("live01"), other = make("other1"),
                 unmarked = make("nomark");
  write_owner(dead, gone, "1");
  touch(dead / "2x16x16_4096" / ".h.npy.partial");
  touch(dead / "child.out");
  fs::create_directories(dead / "programs");
  touch(dead / "programs" / "0123456789abcdef.clbin");
  write_owner(reused, ::getpid(), own_start_time() + "0");
  touch(reused / "notes.txt");
  fs::remove(reused / "2x16x16_4096" / "k.npy");
  touch(dir_ / "outside.npy");
  fs::create_symlink(dir_ / "outside.npy", reused / "2x16x16_4096" / "k.npy");
  write_owner(live, ::getpid(), own_start_time());
  write_owner(other, gone, "1", "elsewhere.invalid");

  const auto r = bench(
      "--json bench --system --system-problems 2x16x16 --system-tokens 65536 --devices 0 "
      "--memory-limit 40000000 --csv " +
      (dir_ / "s.csv").string() + " --json-out " + (dir_ / "s.json").string() + " --workdir " + work.string());
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_FALSE(fs::exists(dead)) << r.err;
  EXPECT_NE(r.err.find("removed the work directory " + dead.string()), std::string::npos) << r.err;
  // Of the reused pid's: bench's files gone, the foreign file and the link (and what it points to) left, and said.
  EXPECT_TRUE(fs::exists(reused / "notes.txt"));
  EXPECT_TRUE(fs::is_symlink(reused / "2x16x16_4096" / "k.npy"));
  EXPECT_TRUE(fs::exists(dir_ / "outside.npy"));
  for (const char* f : {"q.npy", "v.npy", "i.npy", "f.npy"}) EXPECT_FALSE(fs::exists(reused / "2x16x16_4096" / f)) << f;
  EXPECT_NE(r.err.find((reused / "notes.txt").string()), std::string::npos) << r.err;
  // Untouched: the live owner's, the other host's, the one without a record.
  for (const fs::path& d : {live, other, unmarked}) {
    SCOPED_TRACE(d.string());
    for (const char* f : {"q.npy", "k.npy", "v.npy", "i.npy", "f.npy"}) EXPECT_TRUE(fs::exists(d / "2x16x16_4096" / f));
  }
  EXPECT_TRUE(fs::exists(live / ".owner"));
  EXPECT_TRUE(fs::exists(other / ".owner"));
  // And the run's own is gone: no other directory there.
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(work)) names.insert(e.path().filename().string());
  EXPECT_EQ(names, (std::set<std::string>{"mlstm-bench-system.dead02", "mlstm-bench-system.live01",
                                          "mlstm-bench-system.other1", "mlstm-bench-system.nomark"}));
}

}  // namespace
}  // namespace mlstm
