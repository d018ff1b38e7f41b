// Writing output files atomically: a temporary file in the destination's directory, every write checked,
// then flushed, fsynced, closed and renamed over the destination (and the directory fsynced). On any
// failure the temporary file is removed and the old destination, if any, is left as it was.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace mlstm {

// An output file being written. Bytes go to a hidden temporary file next to `path`; commit() makes them
// `path`; the destructor (no commit, or after an exception) removes the temporary file.
// Every failure throws mlstm::Error naming `path` and the system's reason (errno).
// A `path` that is a symbolic link writes the file it points to (the link stays; also for the partial files below). The constructor first removes
// the temporary files of earlier writers of `path` that were killed (remove_stale_temporaries).
//
// A resumable output (Partial::fresh / Partial::resume) is written at offsets into a fixed temporary file,
// partial_path_of(path) (".<name>.partial" next to `path`), instead of a mkstemp name: it survives a failure
// or a kill (neither a failed write nor the destructor removes it), so a later run can find it and continue.
// fresh replaces a stale partial file; resume opens the existing one (Error when there is none). commit() is
// the same: the final path appears only complete.
class AtomicFile {
 public:
  enum class Partial { fresh, resume };
  explicit AtomicFile(std::string path);
  AtomicFile(std::string path, Partial mode);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, std::size_t size);
  void write(std::string_view text) { write(text.data(), text.size()); }
  // Resumable files: `size` bytes at `offset` (pwrite, every byte checked); the file's size; set its size,
  // reserving the blocks (posix_fallocate where the filesystem has it: a full disk fails here, up front);
  // flush the data written so far to the disk (fdatasync).
  void write_at(std::uint64_t offset, const void* data, std::size_t size);
  std::uint64_t size() const;
  void reserve(std::uint64_t size);
  void sync();
  // fsync and close (checked): the bytes are complete and on the disk, not yet at `path`. commit() does it first.
  void finish();
  // fsync, close (checked), rename over the destination, fsync the directory. Once only.
  void commit();
  const std::string& path() const noexcept { return path_; }
  const std::string& temporary_path() const noexcept { return tmp_; }

 private:
  void discard() noexcept;
  [[noreturn]] void fail(const std::string& what);  // throws naming path_, errno; discards unless partial
  std::string path_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
  bool finished_ = false;
  bool partial_ = false;
};

// The output files of one command, all or none: each is written to its temporary file (add(), then the caller's
// writes), and commit() finishes every one (fsync, close) before it renames the first, so a failed write or a
// full disk leaves every destination as it was and no debris. (Once the renames begin, only a rename itself could
// fail, which on one filesystem it does not for want of space.) The destructor without commit() removes them all.
class AtomicFileGroup {
 public:
  AtomicFileGroup();
  ~AtomicFileGroup();
  AtomicFileGroup(const AtomicFileGroup&) = delete;
  AtomicFileGroup& operator=(const AtomicFileGroup&) = delete;
  AtomicFile& add(const std::string& path);
  void commit();

 private:
  std::vector<std::unique_ptr<AtomicFile>> files_;
  bool committed_ = false;
};

// Whether a writer whose files begin with `signature` may replace `path` without losing anything of the user's:
// nothing is there, or a regular file that is empty or begins with `signature` (an earlier output of the same
// writer). Otherwise the reason, to follow the path in a message: "exists and is not a regular file", "cannot be
// read: <errno text>", "exists and does not begin with '<signature>' (not an output of this kind)".
std::optional<std::string> why_not_replaceable(const std::string& path, std::string_view signature);

// Whole transfers over a file descriptor: short counts and EINTR retried until n bytes are moved, at `offset`
// (pread / pwrite) or at the descriptor's position when there is none. `bytes` < n says why it stopped: `error` is
// the failed call's errno, or 0 at the end of the file (read) or a write that made no progress.
struct FdTransfer {
  std::size_t bytes = 0;
  int error = 0;
};
FdTransfer read_fully(int fd, void* dst, std::size_t n, std::optional<std::uint64_t> offset = std::nullopt);
FdTransfer write_fully(int fd, const void* src, std::size_t n, std::optional<std::uint64_t> offset = std::nullopt);

// The fixed temporary file of a resumable output: ".<name>.partial" in `path`'s directory.
std::string partial_path_of(const std::string& path);
// Where an AtomicFile(path) writes: the file a symbolic link at `path` points to (the link stays a link), else
// `path`. Its temporary files, and the stale ones it removes, are next to that file (callers that must keep their
// own files apart from them look there).
std::string write_target(const std::string& path);

// Writes `path` atomically with what `writer` passes to the AtomicFile.
void write_file_atomically(const std::string& path, const std::function<void(AtomicFile&)>& writer);
void write_file_atomically(const std::string& path, std::string_view bytes);

// The name of the temporary files AtomicFile uses for `path`: ".<name>.tmp.<pid>.XXXXXX" in the same directory,
// <pid> the writer's process id, XXXXXX the six letters or digits mkstemp puts there (older versions wrote
// ".<name>.tmp.XXXXXX"). True when `candidate` (a bare file name) is one.
bool is_atomic_temporary_of(const std::string& path, const std::string& candidate);
// Removes the temporary files a killed writer (SIGKILL, power loss) left for `path`: only regular files of this
// user with one link, whose name matches the pattern with a pid exactly and whose writer is no longer a process on
// this host; nothing else (older names without a pid may be a user's own file and stay). Best effort (a file that cannot be removed is skipped); returns how many
// were removed. A live writer of the same `path` keeps its file (a writer on another host sharing the
// directory is not seen).
std::size_t remove_stale_temporaries(const std::string& path);

}  // namespace mlstm
