// NumPy .npy files: read (format 1.0, 2.0, 3.0) and write (1.0, or 2.0 when the header needs it).
// C order, little-endian. dtypes <f8 <f4 <f2, and bfloat16 stored as a uint16 array (<u2) when asked for.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "mlstm/core/tensor.hpp"

namespace mlstm {
class AtomicFile;
}

namespace mlstm::npy {

// Refuses (mlstm::InvalidArgument naming `argument`) a `path` that exists and is not a regular file: a directory,
// a FIFO or pipe (`<(cat q.npy)`), a character or block device, a socket. Opening a FIFO blocks until a writer
// comes, and its bytes can be read only once, while a .npy file is read twice (its header, then its data). A
// missing file is left to the open that follows. Every reader below calls it before it opens `path`.
void require_regular_file(const std::string& path, const std::string& argument);

// Reads `path`. `argument` names the file in errors (e.g. "--q"). `as_dtype` = DType::bf16 reads a <u2
// array as bfloat16 bits; otherwise a <u2 array is refused. Errors (mlstm::InvalidArgument naming
// `argument`): missing/unreadable file, bad magic or header, Fortran order, big-endian or unsupported
// dtype (named), truncated data.
Tensor read(const std::string& path, const std::string& argument, std::optional<DType> as_dtype = std::nullopt);
// The same for arrays whose dtype is their own (gates, states, gradients beside bfloat16 inputs): any supported
// dtype as it is, a <u2 array as `uint16_as` (bfloat16 bits) where given, else refused as read() refuses it.
Tensor read_any(const std::string& path, const std::string& argument, std::optional<DType> uint16_as);

// Reads only tokens [s0, s1) along axis 2 of a (B,NH,S,...) or (B,NH,S) array, without loading the rest
// of the file (B*NH reads): streaming long sequences from disk with flat memory. Same errors as read(),
// plus InvalidArgument when the range is outside [0, S] or the array has fewer than 3 dimensions.
Tensor read_seq_slice(const std::string& path, const std::string& argument, std::int64_t s0, std::int64_t s1,
                      std::optional<DType> as_dtype = std::nullopt);
// The shape and dtype stored in a .npy file's header (reads the header only). `exact` false: as read_any.
std::pair<Shape, DType> read_header(const std::string& path, const std::string& argument,
                                    std::optional<DType> as_dtype = std::nullopt, bool exact = true);

// Parses a whole .npy image held in memory (what read() does after loading the file); the fuzz target.
Tensor parse(const std::string& bytes, const std::string& argument, std::optional<DType> as_dtype = std::nullopt);

// The offsets of packed sequences (cu_seqlens): a one-dimensional int64 ('<i8') array; any other dtype, byte order
// or shape is refused (InvalidArgument naming `argument`). The header and the file's size are checked before the
// data is read. parse_offsets: the same from a whole file image (the fuzz target).
std::vector<std::int64_t> read_offsets(const std::string& path, const std::string& argument);
std::vector<std::int64_t> parse_offsets(const std::string& bytes, const std::string& argument);
// Writes offsets as a (N+1,) int64 array, atomically.
void write_offsets(const std::string& path, std::span<const std::int64_t> offsets);

// Writes a contiguous copy of `t`; bfloat16 is written as <u2. Atomic (write_file_atomically): a failure
// throws mlstm::Error and leaves the old file, if any, and no temporary file.
void write(const std::string& path, ConstTensorView t);
// The same into an output file being written (one of an AtomicFileGroup's: several outputs, all or none).
void write_to(AtomicFile& file, ConstTensorView t);
std::string serialize(ConstTensorView t);
// The header serialize() writes for an array of `shape` and `dtype` (magic, version, dict, padding to 64 bytes).
std::string header_bytes(const Shape& shape, DType dtype);

// Sequence slices of one (B,NH,S,...) or (B,NH,S) array on disk, for streaming files of any size with flat
// memory. The constructor opens the file once and checks the header (as read() does: magic, version, byte
// order, dtype, Fortran order, element count) and the file's size against it; read() copies tokens [s0, s1)
// with one pread per (b, h) row, every read checked. The file is not mapped: memory is exactly the slices
// asked for, and an address-space limit (RLIMIT_AS) below the file's size does not matter.
// `axis` = 0 reads slices of the leading axis instead (the (N,NH,...) states of packed sequences, one contiguous
// read each); the array then needs at least one dimension.
class SeqSliceReader {
 public:
  // `exact` false: any supported dtype, `as_dtype` only says how to read a <u2 array (as read_any).
  SeqSliceReader(const std::string& path, const std::string& argument, std::optional<DType> as_dtype = std::nullopt,
                 int axis = 2, bool exact = true);
  ~SeqSliceReader();
  SeqSliceReader(const SeqSliceReader&) = delete;
  SeqSliceReader& operator=(const SeqSliceReader&) = delete;

  const Shape& shape() const noexcept { return shape_; }
  DType dtype() const noexcept { return dtype_; }
  std::int64_t seq_len() const noexcept { return shape_[static_cast<std::size_t>(axis_)]; }
  // Tokens [s0, s1) as a contiguous (B,NH,s1-s0,...) tensor. InvalidArgument naming the argument when the
  // range is outside [0, S] or the file turns out shorter than its header said.
  Tensor read(std::int64_t s0, std::int64_t s1) const;

 private:
  std::string path_, argument_;
  Shape shape_;
  DType dtype_ = DType::f32;
  std::size_t data_offset_ = 0;
  int fd_ = -1;
  int axis_ = 2;
};

// The incremental writer of a (B,NH,S,...) array that arrives in sequence slices: a resumable AtomicFile
// (the fixed temporary file ".<name>.partial" next to `path`) holding the header of the final shape, its size
// reserved up front; write() puts a slice at its strided positions (one pwrite per (b, h) row); sync() makes
// what was written durable; commit() fsyncs and renames onto `path`, so `path` appears only complete. A
// failure throws mlstm::Error naming `path`, never leaves a half-written `path`, and keeps the partial file.
// `resume`: reopen the partial file a killed run left, refused (mlstm::Error) unless its header and size are
// exactly those of `shape` and `dtype`. `axis` = 0: slices of the leading axis (as SeqSliceReader).
class SeqSliceWriter {
 public:
  SeqSliceWriter(const std::string& path, Shape shape, DType dtype, bool resume, int axis = 2);
  ~SeqSliceWriter();
  SeqSliceWriter(const SeqSliceWriter&) = delete;
  SeqSliceWriter& operator=(const SeqSliceWriter&) = delete;

  void write(std::int64_t s0, ConstTensorView slice);  // slice: (B,NH,len,...) (axis 0: (len,...)) of the writer's
                                                       // dtype, any strides
  void sync();
  void commit();
  const std::string& partial_path() const noexcept;

 private:
  struct File;
  std::unique_ptr<File> file_;
  Shape shape_;
  DType dtype_;
  std::size_t data_offset_;
  int axis_;
};

}  // namespace mlstm::npy
