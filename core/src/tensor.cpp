#include "mlstm/core/tensor.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <sstream>

#include "mlstm/core/error.hpp"
#include "mlstm/core/memcopy.hpp"

namespace mlstm {

std::string shape_to_string(const Shape& shape) {
  std::ostringstream os;
  os << '(';
  for (std::size_t d = 0; d < shape.size(); ++d) os << (d ? "," : "") << shape[d];
  os << ')';
  return os.str();
}

std::int64_t shape_numel(const Shape& shape) {
  // A zero extent makes the product 0 whatever the others are (and must not overflow on the way there).
  for (auto d : shape)
    if (d == 0) return 0;
  std::int64_t n = 1;
  for (auto d : shape) {
    if (__builtin_mul_overflow(n, d, &n))
      throw InvalidArgument("shape", "shape " + shape_to_string(shape) + " has too many elements");
  }
  return n;
}

std::size_t shape_nbytes(const Shape& shape, DType dtype) {
  for (auto d : shape)
    if (d < 0) throw InvalidArgument("shape", "negative dimension in " + shape_to_string(shape));
  for (auto d : shape)
    if (d == 0) return 0;
  std::int64_t bytes = static_cast<std::int64_t>(dtype_size(dtype));
  for (auto d : shape) {
    if (__builtin_mul_overflow(bytes, d, &bytes)) {
      throw InvalidArgument("shape", "shape " + shape_to_string(shape) + " " + std::string(dtype_name(dtype)) +
                                         " is more than 2^63 bytes");
    }
  }
  return static_cast<std::size_t>(bytes);
}

Shape contiguous_strides(const Shape& shape) {
  Shape strides(shape.size());
  std::int64_t s = 1;
  for (std::size_t d = shape.size(); d-- > 0;) {
    strides[d] = s;
    s *= shape[d];
  }
  return strides;
}

namespace {

constexpr std::size_t kHugePage = std::size_t{2} << 20;
// Tensors of this size or more get a mapping of their own (map_storage).
constexpr std::size_t kMapFrom = std::size_t{8} << 20;

// `bytes` (a multiple of the page size) of fresh memory in an anonymous mapping of its own, 2 MiB aligned and asked to be
// backed by transparent huge pages, returned to the system when freed. Two reasons:
//  - the first write to fresh memory then faults once per 2 MiB instead of once per 4 KiB (on the H200 host a
//    parallel copy into a fresh 1 GiB buffer ran at 19 GB/s with 4 KiB pages and 31 GB/s with huge pages, and
//    50 GB/s into touched memory);
//  - glibc's malloc raises its mmap threshold to the size of each mapped block it frees (up to 32 MiB), after
//    which blocks of that size come from its heaps and stay there: a stream that allocates and frees an h of
//    20 MiB per piece grew the CLI's peak RSS by 15-33% between 1M and 8M tokens.
std::byte* map_storage(std::size_t bytes) {
  const std::size_t length = bytes + kHugePage;
  void* mapped = ::mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapped == MAP_FAILED) throw std::bad_alloc();
  const auto base = reinterpret_cast<std::uintptr_t>(mapped);
  const std::uintptr_t start = (base + kHugePage - 1) & ~(std::uintptr_t{kHugePage} - 1), end = start + bytes;
  if (start > base) (void)::munmap(mapped, start - base);
  if (base + length > end) (void)::munmap(reinterpret_cast<void*>(end), base + length - end);
  (void)::madvise(reinterpret_cast<void*>(start), bytes, MADV_HUGEPAGE);  // advice: without THP, 4 KiB pages
  return reinterpret_cast<std::byte*>(start);
}

}  // namespace

void Tensor::FreeAligned::operator()(std::byte* p) noexcept {
  if (owner) {
    owner.reset();
  } else if (mapped != 0) {
    (void)::munmap(p, mapped);
  } else {
    std::free(p);
  }
}

Tensor::Tensor(Shape shape, DType dtype) : dtype_(dtype), shape_(std::move(shape)) {
  for (auto d : shape_) {
    if (d < 0) throw InvalidArgument("shape", "negative dimension in " + shape_to_string(shape_));
  }
  std::size_t bytes = nbytes();
  if (bytes > std::numeric_limits<std::size_t>::max() - 2 * kHugePage) throw std::bad_alloc();
  if (bytes >= kMapFrom) {
    static const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    bytes = (bytes + page - 1) / page * page;
    storage_ = std::unique_ptr<std::byte[], FreeAligned>(map_storage(bytes), FreeAligned{bytes});
    return;
  }
  bytes = std::max<std::size_t>((bytes + 63) / 64 * 64, 64);
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  storage_.reset(static_cast<std::byte*>(p));
}

Tensor Tensor::adopt(std::byte* data, Shape shape, DType dtype, std::shared_ptr<void> owner) {
  if (!owner) throw InvalidArgument("owner", "Tensor::adopt needs the owner of the memory");
  if (!data) throw InvalidArgument("data", "Tensor::adopt needs memory");
  Tensor t;
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  for (auto d : t.shape_) {
    if (d < 0) throw InvalidArgument("shape", "negative dimension in " + shape_to_string(t.shape_));
  }
  (void)t.numel();  // overflow check
  t.storage_ = std::unique_ptr<std::byte[], FreeAligned>(data, FreeAligned{std::move(owner)});
  return t;
}

Tensor Tensor::zeros(Shape shape, DType dtype) {
  Tensor t(std::move(shape), dtype);
  std::memset(t.bytes(), 0, t.nbytes());
  return t;
}

Tensor Tensor::full(Shape shape, DType dtype, double value) {
  Tensor t(std::move(shape), dtype);
  const auto n = static_cast<std::size_t>(t.numel());
  for (std::size_t e = 0; e < n; ++e) store_element(t.bytes(), dtype, e, value);
  return t;
}

Tensor Tensor::from(const std::vector<float>& values, Shape shape, DType dtype) {
  if (static_cast<std::int64_t>(values.size()) != shape_numel(shape)) {
    throw InvalidArgument("values",
                          std::to_string(values.size()) + " values do not fill shape " + shape_to_string(shape));
  }
  Tensor t(std::move(shape), dtype);
  convert_elements(values.data(), DType::f32, t.bytes(), dtype, values.size());
  return t;
}

Tensor Tensor::from(const std::vector<double>& values, Shape shape, DType dtype) {
  if (static_cast<std::int64_t>(values.size()) != shape_numel(shape)) {
    throw InvalidArgument("values",
                          std::to_string(values.size()) + " values do not fill shape " + shape_to_string(shape));
  }
  Tensor t(std::move(shape), dtype);
  convert_elements(values.data(), DType::f64, t.bytes(), dtype, values.size());
  return t;
}

Tensor Tensor::copy_of(ConstTensorView view, DType dtype) {
  Tensor t(view.shape(), dtype);
  copy_elements(view, 0, view.numel(), dtype, t.bytes());
  return t;
}

void copy_elements(ConstTensorView view, std::int64_t first, std::int64_t count, DType dtype, std::byte* out) {
  if (count <= 0) return;
  const std::size_t in_size = dtype_size(view.dtype()), out_size = dtype_size(dtype);
  // Split the index space into an outer part and the longest trailing run of dimensions that is
  // contiguous in the view: each run (or the part of it in range) is converted with one convert_elements
  // call (memcpy when the dtypes agree). Graph segments (a range of the sequence axis of a (B,NH,S,D)
  // tensor) are runs of len*D elements, so this is a few large copies rather than an element-by-element walk.
  const int nd = view.dims();
  std::int64_t run = 1;
  int inner = nd;  // dimensions [inner, nd) form the contiguous run
  while (inner > 0) {
    const auto d = static_cast<std::size_t>(inner - 1);
    if (view.shape()[d] != 1 && view.strides()[d] != run) break;
    run *= view.shape()[d];
    --inner;
  }
  // Elements [e, end) of the view, written from out + (e - first).
  auto copy_range = [&](std::int64_t e, std::int64_t end) {
    while (e < end) {
      const std::int64_t r = e / run, within = e % run, n = std::min(end - e, run - within);
      // Offset of run r: its outer multi-index from r (row-major over dimensions [0, inner)).
      std::int64_t off = 0, rem = r;
      for (int d = inner - 1; d >= 0; --d) {
        const auto ud = static_cast<std::size_t>(d);
        off += (rem % view.shape()[ud]) * view.strides()[ud];
        rem /= view.shape()[ud];
      }
      convert_elements(view.bytes() + static_cast<std::size_t>(off + within) * in_size, view.dtype(),
                       out + static_cast<std::size_t>(e - first) * out_size, dtype, static_cast<std::size_t>(n));
      e += n;
    }
  };
  constexpr std::int64_t kSlice = std::int64_t{1} << 18;  // elements per parallel slice
  if (count <= kSlice) {
    copy_range(first, first + count);
    return;
  }
  tbb::parallel_for(std::int64_t{0}, (count + kSlice - 1) / kSlice,
                    [&](std::int64_t j) { copy_range(first + j * kSlice, first + std::min(count, (j + 1) * kSlice)); });
}

Tensor::Tensor(const Tensor& other) : dtype_(other.dtype_), shape_(other.shape_) {
  if (other.storage_) {
    Tensor t(shape_, dtype_);
    std::memcpy(t.bytes(), other.bytes(), nbytes());
    storage_ = std::move(t.storage_);
  }
}

Tensor& Tensor::operator=(const Tensor& other) {
  if (this != &other) {
    Tensor t(other);
    *this = std::move(t);
  }
  return *this;
}

Tensor Tensor::reshaped(Shape shape) const& { return Tensor(*this).reshaped(std::move(shape)); }

Tensor Tensor::reshaped(Shape shape) && {
  if (shape_numel(shape) != numel()) {
    throw InvalidArgument("shape", "cannot reshape " + shape_to_string(shape_) + " to " + shape_to_string(shape));
  }
  Tensor t(std::move(*this));
  t.shape_ = std::move(shape);
  return t;
}

std::vector<double> Tensor::to_vector() const {
  std::vector<double> out(static_cast<std::size_t>(numel()));
  if (!out.empty()) convert_elements(bytes(), dtype_, out.data(), DType::f64, out.size());
  return out;
}

void Tensor::set(std::initializer_list<std::int64_t> index, double value) noexcept {
  store_element(bytes(), dtype_, static_cast<std::size_t>(view().offset(index)), value);
}

void check_dims(ConstTensorView t, int dims, const std::string& argument, const std::string& layout) {
  if (t.empty()) throw InvalidArgument(argument, "missing; expected a tensor of shape " + layout);
  if (t.dims() != dims) {
    throw InvalidArgument(argument, "expected shape " + layout + " with " + std::to_string(dims) + " dimensions, got " +
                                        shape_to_string(t.shape()));
  }
  for (auto s : t.strides()) {
    if (s < 0) throw InvalidArgument(argument, "negative strides are not supported");
  }
}

void check_shape(ConstTensorView t, const Shape& expected, const std::string& argument, const std::string& layout) {
  check_dims(t, static_cast<int>(expected.size()), argument, layout);
  if (t.shape() != expected) {
    throw InvalidArgument(argument, "expected shape " + layout + " = " + shape_to_string(expected) + ", got " +
                                        shape_to_string(t.shape()));
  }
}

void check_finite(ConstTensorView t, const std::string& argument) {
  if (t.empty()) return;
  Tensor c = Tensor::copy_of(t, DType::f64);
  const auto* p = c.data<double>();
  for (std::int64_t e = 0; e < c.numel(); ++e) {
    if (!std::isfinite(p[e])) {
      throw InvalidArgument(argument, "element " + std::to_string(e) + " is " +
                                          (std::isnan(p[e]) ? "NaN" : "infinite") + "; inputs must be finite");
    }
  }
}

void copy_rows(std::byte* dst, std::size_t dst_stride, const std::byte* src, std::size_t src_stride, std::size_t rows,
               std::size_t row_bytes) {
  constexpr std::size_t kSlice = std::size_t{1} << 20;
  const std::size_t slices = (row_bytes + kSlice - 1) / kSlice;
  if (rows * row_bytes <= kSlice) {
    for (std::size_t r = 0; r < rows; ++r) copy_bytes(dst + r * dst_stride, src + r * src_stride, row_bytes);
    return;
  }
  tbb::parallel_for(
      tbb::blocked_range<std::size_t>(0, rows * slices), [&](const tbb::blocked_range<std::size_t>& range) {
        for (std::size_t j = range.begin(); j != range.end(); ++j) {
          const std::size_t r = j / slices, off = (j % slices) * kSlice;
          copy_bytes(dst + r * dst_stride + off, src + r * src_stride + off, std::min(kSlice, row_bytes - off));
        }
      });
}

namespace {

// The row stride (elements) of a (B,NH,len,D) view whose rows of len*D elements are contiguous, one every
// strides[1] elements; InvalidArgument(argument) for other layouts.
std::int64_t row_stride(ConstTensorView t, const char* argument) {
  const Shape& st = t.strides();
  if (t.dims() != 4 || st[3] != 1 || (t.dim(2) > 1 && st[2] != t.dim(3)) || (t.dim(0) > 1 && st[0] != t.dim(1) * st[1]))
    throw InvalidArgument(argument, "must be (B,NH,len,D) rows of len*D contiguous elements, one every strides[1]");
  return st[1];
}

}  // namespace

void check_output_rows(ConstTensorView out, const Shape& shape, DType dtype, const std::string& argument) {
  if (out.shape() != shape || out.dtype() != dtype)
    throw InvalidArgument(argument, "expected " + std::string(dtype_name(dtype)) + " of shape " +
                                        shape_to_string(shape) + ", got " + std::string(dtype_name(out.dtype())) +
                                        " of shape " + shape_to_string(out.shape()));
  const std::int64_t stride = row_stride(out, argument.c_str());
  if (out.dim(1) > 1 && stride < out.dim(2) * out.dim(3))
    throw InvalidArgument(argument, "its rows overlap (strides[1] = " + std::to_string(stride) + " < " +
                                        std::to_string(out.dim(2) * out.dim(3)) + ")");
}

void copy_piece_rows(ConstTensorView piece, TensorView out) {
  if (piece.shape() != out.shape() || piece.dtype() != out.dtype())
    throw InvalidArgument("out", "expected " + std::string(dtype_name(piece.dtype())) + " of shape " +
                                     shape_to_string(piece.shape()) + ", got " + std::string(dtype_name(out.dtype())) +
                                     " of shape " + shape_to_string(out.shape()));
  const std::size_t es = dtype_size(out.dtype()), row = static_cast<std::size_t>(out.dim(2) * out.dim(3)) * es;
  const auto src_stride = static_cast<std::size_t>(row_stride(piece, "piece")) * es;
  const auto dst_stride = static_cast<std::size_t>(row_stride(out, "out")) * es;
  copy_rows(out.bytes(), dst_stride, piece.bytes(), src_stride, static_cast<std::size_t>(out.dim(0) * out.dim(1)), row);
}

}  // namespace mlstm
