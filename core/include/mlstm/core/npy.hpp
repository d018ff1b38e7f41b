// NumPy .npy files: read (format 1.0, 2.0, 3.0) and write (1.0, or 2.0 when the header needs it).
// C order, little-endian. dtypes <f8 <f4 <f2, and bfloat16 stored as a uint16 array (<u2) when asked for.
#pragma once

#include <optional>
#include <string>
#include <utility>

#include "mlstm/core/tensor.hpp"

namespace mlstm::npy {

// Reads `path`. `argument` names the file in errors (e.g. "--q"). `as_dtype` = DType::bf16 reads a <u2
// array as bfloat16 bits; otherwise a <u2 array is refused. Errors (mlstm::InvalidArgument naming
// `argument`): missing/unreadable file, bad magic or header, Fortran order, big-endian or unsupported
// dtype (named), truncated data.
Tensor read(const std::string& path, const std::string& argument, std::optional<DType> as_dtype = std::nullopt);

// Reads only tokens [s0, s1) along axis 2 of a (B,NH,S,...) or (B,NH,S) array, without loading the rest
// of the file (B*NH reads): streaming long sequences from disk with flat memory. Same errors as read(),
// plus InvalidArgument when the range is outside [0, S] or the array has fewer than 3 dimensions.
Tensor read_seq_slice(const std::string& path, const std::string& argument, std::int64_t s0, std::int64_t s1,
                      std::optional<DType> as_dtype = std::nullopt);
// The shape and dtype stored in a .npy file's header (reads the header only).
std::pair<Shape, DType> read_header(const std::string& path, const std::string& argument,
                                    std::optional<DType> as_dtype = std::nullopt);

// Parses a whole .npy image held in memory (what read() does after loading the file); the fuzz target.
Tensor parse(const std::string& bytes, const std::string& argument, std::optional<DType> as_dtype = std::nullopt);

// Writes a contiguous copy of `t`; bfloat16 is written as <u2. Atomic (write_file_atomically): a failure
// throws mlstm::Error and leaves the old file, if any, and no temporary file.
void write(const std::string& path, ConstTensorView t);
std::string serialize(ConstTensorView t);

}  // namespace mlstm::npy
