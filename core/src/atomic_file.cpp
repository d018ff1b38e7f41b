#include "mlstm/core/atomic_file.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>

#include "mlstm/core/error.hpp"

namespace mlstm {

namespace {

std::string reason() { return std::strerror(errno); }

// The process umask, read without changing it (umask(2) would race with other threads creating files).
mode_t current_umask() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("Umask:", 0) == 0) return static_cast<mode_t>(std::stoul(line.substr(6), nullptr, 8));
  }
  return 022;
}

// A temporary file's name for `path` (a bare name, as in a directory listing) is ".<name>.tmp.<pid>.XXXXXX", <pid> the
// writer's process id (none in files of older versions), XXXXXX six letters or digits from mkstemp. The writer's
// pid when `candidate` is one (0 for an older file without one); nullopt when it is not.
std::optional<long> temporary_writer(const std::string& path, const std::string& candidate) {
  const std::string base = std::filesystem::path(path).filename().string();
  if (base.empty()) return std::nullopt;
  const std::string prefix = "." + base + ".tmp.";
  if (candidate.size() < prefix.size() + 6 || candidate.compare(0, prefix.size(), prefix) != 0) return std::nullopt;
  const std::string rest = candidate.substr(prefix.size());
  const std::size_t dot = rest.find('.');
  const std::string pid = dot == std::string::npos ? std::string() : rest.substr(0, dot);
  const std::string letters = dot == std::string::npos ? rest : rest.substr(dot + 1);
  if (letters.size() != 6 || (dot != std::string::npos && (pid.empty() || pid.size() > 10))) return std::nullopt;
  for (const char ch : letters) {
    const bool alnum = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9');
    if (!alnum) return std::nullopt;
  }
  long writer = 0;
  for (const char ch : pid) {
    if (ch < '0' || ch > '9') return std::nullopt;
    writer = writer * 10 + (ch - '0');
  }
  return writer;
}

// Whether process `pid` runs on this host (a kill(pid, 0) that finds it, also one we may not signal).
bool process_alive(long pid) { return pid > 0 && (::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM); }

}  // namespace

std::string write_target(const std::string& path) {
  std::error_code ec;
  const auto status = std::filesystem::symlink_status(path, ec);
  if (ec || !std::filesystem::is_symlink(status)) return path;
  const std::filesystem::path target = std::filesystem::weakly_canonical(path, ec);
  return ec || target.empty() ? path : target.string();
}

AtomicFile::AtomicFile(std::string path) : path_(write_target(path)) {
  const std::filesystem::path p(path_);
  if (p.filename().empty()) throw Error("cannot write '" + path_ + "': not a file name");
  // Renaming over a device or a FIFO (/dev/null, as root) would replace it with a regular file.
  struct stat st {};
  if (::stat(path_.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
    throw Error("cannot write '" + path_ + "': it exists and is not a regular file");
  }
  const std::filesystem::path dir = p.parent_path().empty() ? std::filesystem::path(".") : p.parent_path();
  // Debris of a writer of this path that was killed (SIGKILL, power loss) goes first; a live writer's file stays.
  remove_stale_temporaries(path_);
  std::string name(1, '.');  // hidden: ".<name>.tmp.<pid>.XXXXXX" (appends; "." + string trips GCC 12's -Wrestrict)
  name.append(p.filename().string()).append(".tmp.").append(std::to_string(::getpid())).append(".XXXXXX");
  std::string tmpl = (dir / name).string();
  fd_ = ::mkstemp(tmpl.data());
  if (fd_ < 0) throw Error("cannot write '" + path_ + "': " + reason());
  tmp_ = tmpl;
  // mkstemp creates 0600; an output gets what a plain open(O_CREAT, 0666) would give it.
  if (::fchmod(fd_, 0666 & ~current_umask()) != 0) {
    const std::string why = reason();
    discard();
    throw Error("cannot write '" + path_ + "': " + why);
  }
}

std::string partial_path_of(const std::string& path) {
  const std::filesystem::path p(path);
  std::string name(1, '.');
  name.append(p.filename().string()).append(".partial");
  return (p.parent_path() / name).string();
}

// A symbolic link is followed here too: the rename at the end lands on its target and the link stays (the partial
// file lies beside the target, so a resume through the same link finds it).
AtomicFile::AtomicFile(std::string path, Partial mode) : path_(write_target(path)), partial_(true) {
  const std::filesystem::path p(path_);
  if (p.filename().empty()) throw Error("cannot write '" + path_ + "': not a file name");
  struct stat st {};
  if (::stat(path_.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
    throw Error("cannot write '" + path_ + "': it exists and is not a regular file");
  }
  tmp_ = partial_path_of(path_);
  if (mode == Partial::fresh) {
    // A stale partial file (another run's, possibly a hard link someone made) is unlinked, not truncated.
    if (::unlink(tmp_.c_str()) != 0 && errno != ENOENT) {
      throw Error("cannot replace the partial file '" + tmp_ + "': " + reason());
    }
    fd_ = ::open(tmp_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0666);  // umask applies, as for any output
  } else {
    if (::lstat(tmp_.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
      const std::string why =
          errno == ENOENT ? "no partial file '" + tmp_ + "' to resume" : "'" + tmp_ + "' is not a regular file";
      tmp_.clear();
      throw Error("cannot resume '" + path_ + "': " + why);
    }
    fd_ = ::open(tmp_.c_str(), O_RDWR | O_CLOEXEC);
  }
  if (fd_ < 0) {
    const std::string why = reason();
    tmp_.clear();
    throw Error("cannot write '" + path_ + "': " + why);
  }
}

AtomicFile::~AtomicFile() {
  if (!committed_) discard();
}

void AtomicFile::discard() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  if (!tmp_.empty() && !partial_) ::unlink(tmp_.c_str());  // a partial file stays for a resume
  tmp_.clear();
}

void AtomicFile::fail(const std::string& what) {
  const std::string why = reason();
  discard();
  throw Error(what + " '" + path_ + "' failed: " + why);
}

void AtomicFile::write_at(std::uint64_t offset, const void* data, std::size_t size) {
  if (fd_ < 0) throw Error("cannot write '" + path_ + "': file already closed");
  if (const FdTransfer t = write_fully(fd_, data, size, offset); t.bytes < size) {
    errno = t.error != 0 ? t.error : EIO;
    fail("write to");
  }
}

std::uint64_t AtomicFile::size() const {
  struct stat st {};
  if (fd_ < 0 || ::fstat(fd_, &st) != 0) throw Error("cannot stat '" + path_ + "': " + reason());
  return static_cast<std::uint64_t>(st.st_size);
}

void AtomicFile::reserve(std::uint64_t size) {
  if (fd_ < 0) throw Error("cannot write '" + path_ + "': file already closed");
  if (::ftruncate(fd_, static_cast<off_t>(size)) != 0) fail("resizing");
  // Blocks reserved up front: a full disk fails here rather than after hours of compute. Filesystems without
  // fallocate (EOPNOTSUPP) leave the file sparse; every later write is still checked.
  const int rc = ::posix_fallocate(fd_, 0, static_cast<off_t>(size));
  if (rc != 0 && rc != EOPNOTSUPP && rc != EINVAL) {
    errno = rc;
    fail("reserving space for");
  }
}

void AtomicFile::sync() {
  if (fd_ < 0) throw Error("cannot write '" + path_ + "': file already closed");
  if (::fdatasync(fd_) != 0) fail("fdatasync of");
}

void AtomicFile::write(const void* data, std::size_t size) {
  if (fd_ < 0) throw Error("cannot write '" + path_ + "': file already closed");
  if (const FdTransfer t = write_fully(fd_, data, size); t.bytes < size) {
    const std::string why = t.error != 0 ? std::strerror(t.error) : "no progress";
    discard();
    throw Error("write to '" + path_ + "' failed: " + why);
  }
}

void AtomicFile::finish() {
  if (finished_) return;
  if (fd_ < 0) throw Error("cannot write '" + path_ + "': file already closed");
  auto fail = [&](const char* what) {
    const std::string why = reason();
    discard();
    throw Error(std::string(what) + " '" + path_ + "' failed: " + why);
  };
  if (::fsync(fd_) != 0) fail("fsync of");
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) fail("close of");
  finished_ = true;
}

void AtomicFile::commit() {
  if (committed_) throw Error("cannot write '" + path_ + "': already committed");
  finish();
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const std::string why = reason();
    discard();
    throw Error("rename onto '" + path_ + "' failed: " + why);
  }
  committed_ = true;
  tmp_.clear();
  // The rename is durable once the directory is synced; best effort (some filesystems refuse fsync on a directory).
  const std::filesystem::path dir = std::filesystem::path(path_).parent_path();
  const int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
}

bool is_atomic_temporary_of(const std::string& path, const std::string& candidate) {
  return temporary_writer(path, candidate).has_value();
}

std::size_t remove_stale_temporaries(const std::string& path) {
  const std::filesystem::path p(path);
  if (p.filename().empty()) return 0;
  const std::filesystem::path dir = p.parent_path().empty() ? std::filesystem::path(".") : p.parent_path();
  std::size_t removed = 0;
  std::error_code ec;
  std::filesystem::directory_iterator it(dir, ec), end;
  for (; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    // Only what a writer of this version leaves: a name with its pid (older names without one may be a user's file;
    // they stay), a process that no longer runs, a regular file of this user with no other link to it.
    const auto writer = temporary_writer(path, name);
    if (!writer || *writer == 0 || process_alive(*writer)) continue;
    struct stat st {};
    if (::lstat(it->path().c_str(), &st) != 0 || !S_ISREG(st.st_mode) || st.st_nlink != 1 || st.st_uid != ::geteuid())
      continue;
    if (::unlink(it->path().c_str()) == 0) ++removed;
  }
  return removed;
}

namespace {

template <typename Call>
FdTransfer transfer_fully(std::size_t n, Call call) {
  FdTransfer t;
  while (t.bytes < n) {
    const ssize_t k = call(t.bytes);
    if (k < 0 && errno == EINTR) continue;
    if (k < 0) t.error = errno;
    if (k <= 0) break;
    t.bytes += static_cast<std::size_t>(k);
  }
  return t;
}

}  // namespace

FdTransfer read_fully(int fd, void* dst, std::size_t n, std::optional<std::uint64_t> offset) {
  char* p = static_cast<char*>(dst);
  return transfer_fully(n, [&](std::size_t done) {
    return offset ? ::pread(fd, p + done, n - done, static_cast<off_t>(*offset + done))
                  : ::read(fd, p + done, n - done);
  });
}

FdTransfer write_fully(int fd, const void* src, std::size_t n, std::optional<std::uint64_t> offset) {
  const char* p = static_cast<const char*>(src);
  return transfer_fully(n, [&](std::size_t done) {
    return offset ? ::pwrite(fd, p + done, n - done, static_cast<off_t>(*offset + done))
                  : ::write(fd, p + done, n - done);
  });
}

std::optional<std::string> why_not_replaceable(const std::string& path, std::string_view signature) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return std::nullopt;  // nothing there to lose
    return "cannot be read: " + reason();
  }
  if (!S_ISREG(st.st_mode)) return std::string("exists and is not a regular file");
  if (st.st_size == 0) return std::nullopt;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "cannot be read: " + reason();
  std::string head(signature.size(), '\0');
  const std::size_t got = read_fully(fd, head.data(), head.size()).bytes;
  ::close(fd);
  if (got == signature.size() && head == signature) return std::nullopt;
  return "exists and does not begin with '" + std::string(signature) + "' (not an output of this kind)";
}

AtomicFileGroup::AtomicFileGroup() = default;
AtomicFileGroup::~AtomicFileGroup() = default;

AtomicFile& AtomicFileGroup::add(const std::string& path) {
  if (committed_) throw Error("cannot write '" + path + "': the group is already committed");
  files_.push_back(std::make_unique<AtomicFile>(path));
  return *files_.back();
}

void AtomicFileGroup::commit() {
  if (committed_) throw Error("the group of output files is already committed");
  for (auto& f : files_) f->finish();  // every file complete and on the disk before the first rename
  committed_ = true;
  for (auto& f : files_) f->commit();
}

void write_file_atomically(const std::string& path, const std::function<void(AtomicFile&)>& writer) {
  AtomicFile file(path);
  writer(file);
  file.commit();
}

void write_file_atomically(const std::string& path, std::string_view bytes) {
  write_file_atomically(path, [&](AtomicFile& f) { f.write(bytes); });
}

}  // namespace mlstm
