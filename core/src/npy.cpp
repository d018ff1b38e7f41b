#include "mlstm/core/npy.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "mlstm/core/atomic_file.hpp"
#include "mlstm/core/error.hpp"

namespace mlstm::npy {

namespace {

constexpr char kMagic[] = "\x93NUMPY";

// Value of `key` in a Python dict literal header, as raw text ("'<f4'", "False", "(2, 3)").
std::string header_value(const std::string& header, const std::string& key, const std::string& argument) {
  const std::string quoted = "'" + key + "'";
  const auto at = header.find(quoted);
  if (at == std::string::npos) throw InvalidArgument(argument, "bad .npy header: no " + quoted + " key");
  auto pos = header.find(':', at + quoted.size());
  if (pos == std::string::npos) throw InvalidArgument(argument, "bad .npy header near " + quoted);
  ++pos;
  while (pos < header.size() && std::isspace(static_cast<unsigned char>(header[pos]))) ++pos;
  if (pos >= header.size()) throw InvalidArgument(argument, "bad .npy header near " + quoted);
  std::size_t end;
  if (header[pos] == '\'') {
    end = header.find('\'', pos + 1);
    if (end == std::string::npos) throw InvalidArgument(argument, "bad .npy header: unterminated string");
    return header.substr(pos + 1, end - pos - 1);
  }
  if (header[pos] == '[') {  // a structured dtype (a list of fields); its text would be cut at the first comma
    throw InvalidArgument(argument, "structured .npy dtypes (a list of fields in " + quoted +
                                        ") are not supported; expected float64, float32, float16 or bfloat16 as "
                                        "uint16");
  }
  if (header[pos] == '(') {
    end = header.find(')', pos);
    if (end == std::string::npos) throw InvalidArgument(argument, "bad .npy header: unterminated shape");
    return header.substr(pos, end - pos + 1);
  }
  end = header.find_first_of(",}", pos);
  if (end == std::string::npos) throw InvalidArgument(argument, "bad .npy header near " + quoted);
  auto v = header.substr(pos, end - pos);
  while (!v.empty() && std::isspace(static_cast<unsigned char>(v.back()))) v.pop_back();
  return v;
}

Shape parse_shape(const std::string& text, const std::string& argument) {
  Shape shape;
  std::size_t pos = 1;  // after '('
  while (pos < text.size()) {
    while (pos < text.size() && (std::isspace(static_cast<unsigned char>(text[pos])) || text[pos] == ',')) ++pos;
    if (pos >= text.size() || text[pos] == ')') break;
    if (!std::isdigit(static_cast<unsigned char>(text[pos]))) {
      throw InvalidArgument(argument, "bad .npy header: shape " + text);
    }
    std::int64_t d = 0;
    while (pos < text.size() && std::isdigit(static_cast<unsigned char>(text[pos]))) {
      d = d * 10 + (text[pos] - '0');
      if (d > (std::int64_t{1} << 40))
        throw InvalidArgument(argument, "bad .npy header: dimension too large in " + text);
      ++pos;
    }
    shape.push_back(d);
  }
  return shape;
}

}  // namespace

namespace {

struct HeaderInfo {
  Shape shape;
  DType dtype;
  std::size_t data_offset;
};

struct RawHeader {
  Shape shape;
  std::string descr;  // as written ("<f4", "<i8", ...)
  std::size_t data_offset;
};

// Decodes and checks the header at the start of `bytes` (a prefix of the file is enough), but for its dtype.
RawHeader decode_raw_header(const std::string& bytes, const std::string& argument) {
  if (bytes.size() < 10 || std::memcmp(bytes.data(), kMagic, 6) != 0) {
    throw InvalidArgument(argument, "not a .npy file (bad magic)");
  }
  const auto major = static_cast<unsigned char>(bytes[6]);
  std::size_t header_len, offset;
  if (major == 1) {
    header_len =
        static_cast<unsigned char>(bytes[8]) | (static_cast<std::size_t>(static_cast<unsigned char>(bytes[9])) << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) throw InvalidArgument(argument, "truncated .npy header");
    header_len = 0;
    for (int b = 0; b < 4; ++b)
      header_len |= static_cast<std::size_t>(static_cast<unsigned char>(bytes[8 + b])) << (8 * b);
    offset = 12;
  } else {
    throw InvalidArgument(argument, "unsupported .npy format version " + std::to_string(major));
  }
  if (bytes.size() < offset + header_len) throw InvalidArgument(argument, "truncated .npy header");
  const std::string header = bytes.substr(offset, header_len);
  const std::string descr = header_value(header, "descr", argument);
  const std::string fortran = header_value(header, "fortran_order", argument);
  const Shape shape = parse_shape(header_value(header, "shape", argument), argument);
  // The element count must fit (fuzzing found dims whose product overflowed int64 in shape_numel): the
  // product of the nonzero dims (shape_numel multiplies in order, so a zero dim after huge ones does not
  // help) stays within 2^57 elements, 2^60 bytes, far beyond any file, so every size from the shape is exact.
  std::int64_t numel = 1;
  for (const std::int64_t d : shape) {
    if (d != 0 && (__builtin_mul_overflow(numel, d, &numel) || numel > (std::int64_t{1} << 57))) {
      throw InvalidArgument(argument, "bad .npy header: shape " + shape_to_string(shape) + " has too many elements");
    }
  }
  if (fortran != "False") {
    throw InvalidArgument(argument, "Fortran-ordered .npy arrays are not supported; save with np.ascontiguousarray");
  }
  if (descr.size() < 3) throw InvalidArgument(argument, "unsupported .npy dtype '" + descr + "'");
  return {shape, descr, offset + header_len};
}

// Decodes and checks the header at the start of `bytes` (a prefix of the file is enough).
// `exact`: the file must hold `as_dtype` (where given); otherwise as_dtype only says how to read a <u2 array.
HeaderInfo decode_header(const std::string& bytes, const std::string& argument, std::optional<DType> as_dtype,
                         bool exact = true) {
  const RawHeader raw = decode_raw_header(bytes, argument);
  const std::string& descr = raw.descr;
  const Shape& shape = raw.shape;
  const char order = descr[0];
  const std::string kind = descr.substr(1);
  if (order == '>' && kind != "u1" && kind != "i1") {
    throw InvalidArgument(argument, "big-endian .npy arrays ('" + descr + "') are not supported");
  }
  DType dtype;
  if (kind == "f8")
    dtype = DType::f64;
  else if (kind == "f4")
    dtype = DType::f32;
  else if (kind == "f2")
    dtype = DType::f16;
  else if (kind == "u2" && as_dtype == DType::bf16)
    dtype = DType::bf16;
  else if (kind == "u2") {
    throw InvalidArgument(argument, "uint16 .npy array: pass the dtype bfloat16 to read it as bfloat16 bits");
  } else {
    throw InvalidArgument(argument, "unsupported .npy dtype '" + descr +
                                        "'; expected float64, float32, float16 or "
                                        "bfloat16 as uint16");
  }
  if (exact && as_dtype && *as_dtype != dtype) {
    throw InvalidArgument(argument, "expected dtype " + std::string(dtype_name(*as_dtype)) + ", file holds " +
                                        std::string(dtype_name(dtype)));
  }
  return {shape, dtype, raw.data_offset};
}

}  // namespace

Tensor parse(const std::string& bytes, const std::string& argument, std::optional<DType> as_dtype) {
  const HeaderInfo h = decode_header(bytes, argument, as_dtype);
  const auto numel = static_cast<std::size_t>(shape_numel(h.shape));
  const std::size_t need = numel * dtype_size(h.dtype);
  if (bytes.size() - h.data_offset < need) {
    throw InvalidArgument(argument, "truncated .npy data: shape " + shape_to_string(h.shape) + " needs " +
                                        std::to_string(need) + " bytes, file has " +
                                        std::to_string(bytes.size() - h.data_offset));
  }
  Tensor t(h.shape, h.dtype);
  if (need) std::memcpy(t.bytes(), bytes.data() + h.data_offset, need);
  return t;
}

void require_regular_file(const std::string& path, const std::string& argument) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || S_ISREG(st.st_mode)) return;  // missing: the open that follows names it
  const char* what = S_ISDIR(st.st_mode)    ? "a directory"
                     : S_ISFIFO(st.st_mode) ? "a FIFO or pipe"
                     : S_ISCHR(st.st_mode)  ? "a character device"
                     : S_ISBLK(st.st_mode)  ? "a block device"
                     : S_ISSOCK(st.st_mode) ? "a socket"
                                            : "not a file";
  throw InvalidArgument(argument, "'" + path + "' is not a regular file (" + what + "); give a .npy file");
}

namespace {

std::string read_prefix(std::ifstream& in, std::size_t n) {
  std::string s(n, '\0');
  in.read(s.data(), static_cast<std::streamsize>(n));
  s.resize(static_cast<std::size_t>(in.gcount()));
  in.clear();
  return s;
}

}  // namespace

std::pair<Shape, DType> read_header(const std::string& path, const std::string& argument, std::optional<DType> as_dtype,
                                    bool exact) {
  require_regular_file(path, argument);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InvalidArgument(argument, "cannot open '" + path + "'");
  const auto h = decode_header(read_prefix(in, 1 << 16), argument + " ('" + path + "')", as_dtype, exact);
  return {h.shape, h.dtype};
}

namespace {

// The (rows, inner) split of `shape` around `axis`: a slice of that axis is `rows` runs of len * inner elements.
std::pair<std::int64_t, std::int64_t> rows_and_inner(const Shape& shape, int axis) {
  std::int64_t rows = 1, inner = 1;
  for (std::size_t d = 0; d < shape.size(); ++d) {
    if (static_cast<int>(d) < axis) rows *= shape[d];
    if (static_cast<int>(d) > axis) inner *= shape[d];
  }
  return {rows, inner};
}

void check_axis(int axis) {
  if (axis != 0 && axis != 2)
    throw InvalidArgument("axis", "slices are read along axis 0 or 2, got " + std::to_string(axis));
}

}  // namespace

SeqSliceReader::SeqSliceReader(const std::string& path, const std::string& argument, std::optional<DType> as_dtype,
                               int axis, bool exact)
    : path_(path), argument_(argument), axis_(axis) {
  check_axis(axis);
  require_regular_file(path, argument);
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw InvalidArgument(argument, "cannot open '" + path + "'");
  try {
    const std::string where = argument + " ('" + path + "')";
    struct stat st {};
    if (::fstat(fd_, &st) != 0)
      throw InvalidArgument(where, std::string("cannot read the file: ") + std::strerror(errno));
    if (!S_ISREG(st.st_mode)) {  // replaced since the check above
      require_regular_file(path, argument);
      throw InvalidArgument(argument, "'" + path + "' is not a regular file; give a .npy file");
    }
    std::string prefix(std::min<std::size_t>(1 << 16, static_cast<std::size_t>(st.st_size)), '\0');
    prefix.resize(read_fully(fd_, prefix.data(), prefix.size(), 0).bytes);
    const auto h = decode_header(prefix, where, as_dtype, exact);
    if (axis_ == 2 && h.shape.size() < 3)
      throw InvalidArgument(argument, "expected (B,NH,S,...), got " + shape_to_string(h.shape));
    if (h.shape.empty()) throw InvalidArgument(argument, "expected an array of (N,...), got a scalar");
    // A truncated file is refused before any slice is allocated (its header may promise any size).
    const auto file_size = static_cast<std::size_t>(st.st_size);
    const std::size_t need = static_cast<std::size_t>(shape_numel(h.shape)) * dtype_size(h.dtype);
    if (file_size < h.data_offset || file_size - h.data_offset < need) {
      throw InvalidArgument(argument, "truncated .npy data in '" + path + "': shape " + shape_to_string(h.shape) +
                                          " needs " + std::to_string(need) + " bytes");
    }
    shape_ = h.shape;
    dtype_ = h.dtype;
    data_offset_ = h.data_offset;
  } catch (...) {
    ::close(fd_);
    throw;
  }
}

SeqSliceReader::~SeqSliceReader() {
  if (fd_ >= 0) ::close(fd_);
}

Tensor SeqSliceReader::read(std::int64_t s0, std::int64_t s1) const {
  const std::int64_t S = seq_len();
  if (s0 < 0 || s1 < s0 || s1 > S) {
    throw InvalidArgument(argument_, std::string(axis_ == 0 ? "row" : "token") + " range [" + std::to_string(s0) +
                                         ", " + std::to_string(s1) + ") outside [0, " + std::to_string(S) + "]");
  }
  const auto [rows, inner] = rows_and_inner(shape_, axis_);
  Shape out_shape = shape_;
  out_shape[static_cast<std::size_t>(axis_)] = s1 - s0;
  Tensor out(out_shape, dtype_);
  const std::size_t es = dtype_size(dtype_);
  const std::size_t row_bytes = static_cast<std::size_t>((s1 - s0) * inner) * es;
  for (std::int64_t r = 0; r < rows; ++r) {
    auto* dst = reinterpret_cast<char*>(out.bytes()) + static_cast<std::size_t>(r) * row_bytes;
    const std::size_t at = data_offset_ + static_cast<std::size_t>((r * S + s0) * inner) * es;
    const FdTransfer t = read_fully(fd_, dst, row_bytes, at);
    if (t.error != 0) throw Error(argument_ + ": reading '" + path_ + "' failed: " + std::strerror(t.error));
    if (t.bytes < row_bytes)
      throw InvalidArgument(argument_, "truncated .npy data in '" + path_ + "' (the file shrank)");
  }
  return out;
}

Tensor read_seq_slice(const std::string& path, const std::string& argument, std::int64_t s0, std::int64_t s1,
                      std::optional<DType> as_dtype) {
  return SeqSliceReader(path, argument, as_dtype).read(s0, s1);
}

struct SeqSliceWriter::File {
  explicit File(const std::string& path, bool resume)
      : file(path, resume ? AtomicFile::Partial::resume : AtomicFile::Partial::fresh) {}
  AtomicFile file;
};

SeqSliceWriter::SeqSliceWriter(const std::string& path, Shape shape, DType dtype, bool resume, int axis)
    : shape_(std::move(shape)), dtype_(dtype), axis_(axis) {
  check_axis(axis);
  if (shape_.size() < (axis == 2 ? 3u : 1u))
    throw InvalidArgument("shape", std::string("expected ") + (axis == 2 ? "(B,NH,S,...)" : "(N,...)") + ", got " +
                                       shape_to_string(shape_));
  const std::string header = header_bytes(shape_, dtype_);
  data_offset_ = header.size();
  const std::uint64_t total = data_offset_ + static_cast<std::uint64_t>(shape_numel(shape_)) * dtype_size(dtype_);
  file_ = std::make_unique<File>(path, resume);
  if (!resume) {
    file_->file.reserve(total);
    file_->file.write_at(0, header.data(), header.size());
    return;
  }
  // The partial file must be exactly what this writer would have made: same header, same size.
  const std::string& partial = file_->file.temporary_path();
  if (file_->file.size() != total) {
    throw Error("cannot resume '" + path + "': the partial file '" + partial + "' has " +
                std::to_string(file_->file.size()) + " bytes, " + shape_to_string(shape_) + " needs " +
                std::to_string(total));
  }
  std::ifstream in(partial, std::ios::binary);
  std::string have(header.size(), '\0');
  in.read(have.data(), static_cast<std::streamsize>(have.size()));
  if (!in || have != header) {
    throw Error("cannot resume '" + path + "': the partial file '" + partial + "' does not hold a " +
                shape_to_string(shape_) + " " + std::string(dtype_name(dtype_)) + " array");
  }
}

SeqSliceWriter::~SeqSliceWriter() = default;

const std::string& SeqSliceWriter::partial_path() const noexcept { return file_->file.temporary_path(); }

void SeqSliceWriter::write(std::int64_t s0, ConstTensorView slice) {
  const Shape& s = slice.shape();
  const auto ax = static_cast<std::size_t>(axis_);
  const std::int64_t S = shape_[ax];
  bool ok = slice.dtype() == dtype_ && s.size() == shape_.size() && s0 >= 0 && s0 + s[ax] <= S;
  for (std::size_t d = 0; ok && d < s.size(); ++d) ok = d == ax || s[d] == shape_[d];
  if (!ok) {
    throw InvalidArgument("slice", shape_to_string(s) + " " + std::string(dtype_name(slice.dtype())) + " at token " +
                                       std::to_string(s0) + " does not fit " + shape_to_string(shape_) + " " +
                                       std::string(dtype_name(dtype_)));
  }
  // One contiguous copy when the slice is strided, then one pwrite per (b, h) row of len * inner elements.
  const Tensor owned = slice.is_contiguous() ? Tensor() : Tensor::copy_of(slice);
  const std::byte* src = owned.empty() ? slice.bytes() : owned.bytes();
  const auto [rows, inner] = rows_and_inner(shape_, axis_);
  const std::size_t es = dtype_size(dtype_);
  const std::size_t row_bytes = static_cast<std::size_t>(s[ax] * inner) * es;
  if (row_bytes == 0) return;
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::uint64_t at = data_offset_ + static_cast<std::uint64_t>((r * S + s0) * inner) * es;
    file_->file.write_at(at, src + static_cast<std::size_t>(r) * row_bytes, row_bytes);
  }
}

void SeqSliceWriter::sync() { file_->file.sync(); }

void SeqSliceWriter::commit() { file_->file.commit(); }

namespace {

Tensor read_file(const std::string& path, const std::string& argument, std::optional<DType> as_dtype, bool exact) {
  require_regular_file(path, argument);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InvalidArgument(argument, "cannot open '" + path + "'");
  const std::string where = argument + " ('" + path + "')";
  // The header is checked first, then the file's size against it; only then is the tensor allocated and the
  // data read straight into it (memory: about the file's size, whatever the header claims).
  const auto h = decode_header(read_prefix(in, 1 << 16), where, as_dtype, exact);
  in.seekg(0, std::ios::end);
  const auto end = in.tellg();
  if (end < 0) throw InvalidArgument(where, "cannot read the file (not a regular file?)");
  const auto file_size = static_cast<std::size_t>(end);
  const std::size_t need = static_cast<std::size_t>(shape_numel(h.shape)) * dtype_size(h.dtype);
  if (file_size < h.data_offset || file_size - h.data_offset < need) {
    throw InvalidArgument(where, "truncated .npy data: shape " + shape_to_string(h.shape) + " needs " +
                                     std::to_string(need) + " bytes, file has " +
                                     std::to_string(file_size < h.data_offset ? 0 : file_size - h.data_offset));
  }
  Tensor t(h.shape, h.dtype);
  in.seekg(static_cast<std::streamoff>(h.data_offset));
  if (need == 0) return t;  // an empty array (a zero extent): nothing to read; the caller checks its shape
  in.read(reinterpret_cast<char*>(t.bytes()), static_cast<std::streamsize>(need));
  if (!in || static_cast<std::size_t>(in.gcount()) != need) throw InvalidArgument(where, "read error in .npy data");
  return t;
}

}  // namespace

Tensor read(const std::string& path, const std::string& argument, std::optional<DType> as_dtype) {
  return read_file(path, argument, as_dtype, true);
}

Tensor read_any(const std::string& path, const std::string& argument, std::optional<DType> uint16_as) {
  return read_file(path, argument, uint16_as, false);
}

namespace {
void check_offsets_dtype(const RawHeader& h, const std::string& argument) {
  if (h.descr == ">i8") throw InvalidArgument(argument, "big-endian .npy arrays ('>i8') are not supported");
  if (h.descr != "<i8") {
    throw InvalidArgument(argument, "offsets must be int64 ('<i8'), the file holds '" + h.descr +
                                        "'; save with np.asarray(offsets, dtype=np.int64)");
  }
}
}  // namespace

std::vector<std::int64_t> parse_offsets(const std::string& bytes, const std::string& argument) {
  const RawHeader h = decode_raw_header(bytes, argument);
  check_offsets_dtype(h, argument);
  if (h.shape.size() != 1) {
    throw InvalidArgument(argument, "offsets must be one-dimensional (N+1,), got shape " + shape_to_string(h.shape));
  }
  const auto count = static_cast<std::size_t>(h.shape[0]);
  if (count < 2) {
    throw InvalidArgument(argument,
                          "needs N + 1 >= 2 offsets (0, then the end of each sequence), got " + std::to_string(count));
  }
  if ((bytes.size() - std::min(bytes.size(), h.data_offset)) / sizeof(std::int64_t) < count) {
    throw InvalidArgument(argument, "truncated .npy data: shape " + shape_to_string(h.shape) + " needs " +
                                        std::to_string(count * sizeof(std::int64_t)) + " bytes");
  }
  std::vector<std::int64_t> out(count);
  if (count) std::memcpy(out.data(), bytes.data() + h.data_offset, count * sizeof(std::int64_t));
  return out;
}

std::vector<std::int64_t> read_offsets(const std::string& path, const std::string& argument) {
  require_regular_file(path, argument);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InvalidArgument(argument, "cannot open '" + path + "'");
  const std::string where = argument + " ('" + path + "')";
  // Checked before the data is read: the header, then the file's size against the count it gives.
  const std::string prefix = read_prefix(in, 1 << 16);
  const RawHeader h = decode_raw_header(prefix, where);
  in.seekg(0, std::ios::end);
  const auto end = in.tellg();
  if (end < 0) throw InvalidArgument(where, "cannot read the file (not a regular file?)");
  const auto size = static_cast<std::size_t>(end);
  // The dtype first: an int32 file of the same count is half the size, and its error is the dtype, not truncation.
  check_offsets_dtype(h, where);
  if (h.shape.size() == 1 && size >= h.data_offset &&
      (size - h.data_offset) / sizeof(std::int64_t) < static_cast<std::size_t>(h.shape[0])) {
    throw InvalidArgument(where, "truncated .npy data: shape " + shape_to_string(h.shape) + " needs " +
                                     std::to_string(static_cast<std::size_t>(h.shape[0]) * sizeof(std::int64_t)) +
                                     " bytes, file has " + std::to_string(size - h.data_offset));
  }
  std::string bytes(size, '\0');
  in.seekg(0);
  in.read(bytes.data(), static_cast<std::streamsize>(size));
  if (!in) throw InvalidArgument(where, "read error in .npy data");
  return parse_offsets(bytes, where);
}

void write_offsets(const std::string& path, std::span<const std::int64_t> offsets) {
  std::string header = header_bytes({static_cast<std::int64_t>(offsets.size())}, DType::f64);
  const auto at = header.find("<f8");
  header.replace(at, 3, "<i8");
  std::string bytes = header;
  bytes.append(reinterpret_cast<const char*>(offsets.data()), offsets.size() * sizeof(std::int64_t));
  write_file_atomically(path, bytes);
}

std::string header_bytes(const Shape& shape_in, DType dtype) {
  std::string descr;
  switch (dtype) {
    case DType::f64:
      descr = "<f8";
      break;
    case DType::f32:
      descr = "<f4";
      break;
    case DType::f16:
      descr = "<f2";
      break;
    case DType::bf16:
      descr = "<u2";
      break;
  }
  std::ostringstream shape;
  shape << '(';
  for (std::size_t d = 0; d < shape_in.size(); ++d)
    shape << shape_in[d] << (shape_in.size() == 1 || d + 1 < shape_in.size() ? "," : "");
  shape << ')';
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape.str() + ", }";
  // Pad so that the data starts on a 64-byte boundary, header ends with '\n'.
  const bool v2 = header.size() + 11 > 65535;
  const std::size_t prefix = v2 ? 12 : 10;
  const std::size_t total = ((prefix + header.size() + 1 + 63) / 64) * 64;
  header.append(total - prefix - header.size() - 1, ' ');
  header.push_back('\n');
  std::string out(kMagic, 6);
  out.push_back(static_cast<char>(v2 ? 2 : 1));
  out.push_back(0);
  const std::size_t len = header.size();
  out.push_back(static_cast<char>(len & 0xff));
  out.push_back(static_cast<char>((len >> 8) & 0xff));
  if (v2) {
    out.push_back(static_cast<char>((len >> 16) & 0xff));
    out.push_back(static_cast<char>((len >> 24) & 0xff));
  }
  out += header;
  return out;
}

std::string serialize(ConstTensorView view) {
  const Tensor t = Tensor::copy_of(view);
  std::string out = header_bytes(t.shape(), t.dtype());
  out.append(reinterpret_cast<const char*>(t.bytes()), t.nbytes());
  return out;
}

void write_to(AtomicFile& file, ConstTensorView t) {
  file.write(header_bytes(t.shape(), t.dtype()));
  if (t.is_contiguous()) {
    file.write(t.bytes(), t.nbytes());  // no copy of the array
  } else {
    const Tensor copy = Tensor::copy_of(t);
    file.write(copy.bytes(), copy.nbytes());
  }
}

void write(const std::string& path, ConstTensorView t) {
  // A failed write leaves the old file and no debris.
  write_file_atomically(path, [&](AtomicFile& f) { write_to(f, t); });
}

}  // namespace mlstm::npy
