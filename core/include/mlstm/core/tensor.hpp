// A small owning tensor (host memory) and non-owning views with shape, strides (in elements) and dtype.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "mlstm/core/dtype.hpp"

namespace mlstm {

using Shape = std::vector<std::int64_t>;

std::string shape_to_string(const Shape& shape);  // "(2,3,4)"
std::int64_t shape_numel(const Shape& shape);
// Bytes of an array of `shape` and `dtype`; InvalidArgument("shape") for a negative dimension or where they do not
// fit 63 bits (a zero extent gives 0 whatever the others are).
std::size_t shape_nbytes(const Shape& shape, DType dtype);
Shape contiguous_strides(const Shape& shape);

// Non-owning view. `Byte` is std::byte (mutable) or const std::byte (read-only).
template <class Byte>
class BasicTensorView {
 public:
  BasicTensorView() = default;
  BasicTensorView(Byte* data, DType dtype, Shape shape)
      : data_(data), dtype_(dtype), shape_(std::move(shape)), strides_(contiguous_strides(shape_)) {}
  BasicTensorView(Byte* data, DType dtype, Shape shape, Shape strides)
      : data_(data), dtype_(dtype), shape_(std::move(shape)), strides_(std::move(strides)) {}
  // A mutable view converts to a read-only one.
  template <class Other>
  requires(std::is_const_v<Byte> && !std::is_const_v<Other>)
      BasicTensorView(const BasicTensorView<Other>& other)  // NOLINT(google-explicit-constructor)
      : data_(other.bytes()), dtype_(other.dtype()), shape_(other.shape()), strides_(other.strides()) {}

  bool empty() const noexcept { return data_ == nullptr; }
  Byte* bytes() const noexcept { return data_; }
  template <class T>
  auto* data() const noexcept {
    using Ptr = std::conditional_t<std::is_const_v<Byte>, const T*, T*>;
    return reinterpret_cast<Ptr>(data_);
  }
  DType dtype() const noexcept { return dtype_; }
  const Shape& shape() const noexcept { return shape_; }
  const Shape& strides() const noexcept { return strides_; }
  int dims() const noexcept { return static_cast<int>(shape_.size()); }
  std::int64_t dim(int i) const { return shape_.at(static_cast<std::size_t>(i < 0 ? dims() + i : i)); }
  // InvalidArgument("shape") when the count or the bytes overflow (a shape is checked before it is allocated).
  std::int64_t numel() const { return shape_numel(shape_); }
  std::size_t nbytes() const { return shape_nbytes(shape_, dtype_); }
  bool is_contiguous() const noexcept { return strides_ == contiguous_strides(shape_); }

  // Element offset of a multi-index (no bounds check beyond the index count).
  std::int64_t offset(std::initializer_list<std::int64_t> index) const noexcept {
    std::int64_t off = 0;
    std::size_t d = 0;
    for (auto i : index) off += i * strides_[d++];
    return off;
  }
  // Slow element access as double, for tests and checks.
  double get(std::initializer_list<std::int64_t> index) const noexcept {
    return load_element(data_, dtype_, static_cast<std::size_t>(offset(index)));
  }
  // Sub-view: index `i` along dimension 0.
  BasicTensorView select0(std::int64_t i) const {
    Shape s(shape_.begin() + 1, shape_.end()), st(strides_.begin() + 1, strides_.end());
    return BasicTensorView(data_ + i * strides_[0] * static_cast<std::int64_t>(dtype_size(dtype_)), dtype_, s, st);
  }

 private:
  Byte* data_ = nullptr;
  DType dtype_ = DType::f32;
  Shape shape_;
  Shape strides_;
};

using TensorView = BasicTensorView<std::byte>;
using ConstTensorView = BasicTensorView<const std::byte>;

// Owning, contiguous, host memory (64-byte aligned). Copying a Tensor copies its data.
class Tensor {
 public:
  Tensor() = default;
  Tensor(Shape shape, DType dtype);  // uninitialised contents
  static Tensor zeros(Shape shape, DType dtype);
  static Tensor full(Shape shape, DType dtype, double value);
  static Tensor from(const std::vector<float>& values, Shape shape, DType dtype = DType::f32);
  static Tensor from(const std::vector<double>& values, Shape shape, DType dtype = DType::f64);
  // Copy of any (possibly strided) view, converted to `dtype`.
  static Tensor copy_of(ConstTensorView view, DType dtype);
  static Tensor copy_of(ConstTensorView view) { return copy_of(view, view.dtype()); }
  // A tensor over `data` (contiguous, `shape` and `dtype`), memory another object owns: page-locked host memory
  // of a GPU, say (opencl::Device::pinned_tensor). `owner` is kept while the tensor lives and dropped when it is
  // freed, so the memory goes when the last holder goes. A copy of the tensor is ordinary memory.
  static Tensor adopt(std::byte* data, Shape shape, DType dtype, std::shared_ptr<void> owner);

  Tensor(const Tensor& other);
  Tensor& operator=(const Tensor& other);
  Tensor(Tensor&&) noexcept = default;
  Tensor& operator=(Tensor&&) noexcept = default;

  bool empty() const noexcept { return !storage_; }
  DType dtype() const noexcept { return dtype_; }
  const Shape& shape() const noexcept { return shape_; }
  int dims() const noexcept { return static_cast<int>(shape_.size()); }
  std::int64_t dim(int i) const { return shape_.at(static_cast<std::size_t>(i < 0 ? dims() + i : i)); }
  // InvalidArgument("shape") when the count or the bytes overflow (a shape is checked before it is allocated).
  std::int64_t numel() const { return shape_numel(shape_); }
  std::size_t nbytes() const { return shape_nbytes(shape_, dtype_); }

  template <class T>
  T* data() noexcept {
    return reinterpret_cast<T*>(storage_.get());
  }
  template <class T>
  const T* data() const noexcept {
    return reinterpret_cast<const T*>(storage_.get());
  }
  std::byte* bytes() noexcept { return storage_.get(); }
  const std::byte* bytes() const noexcept { return storage_.get(); }

  TensorView view() noexcept { return TensorView(storage_.get(), dtype_, shape_); }
  ConstTensorView view() const noexcept { return ConstTensorView(storage_.get(), dtype_, shape_); }
  operator ConstTensorView() const noexcept { return view(); }  // NOLINT(google-explicit-constructor)
  operator TensorView() noexcept { return view(); }             // NOLINT(google-explicit-constructor)

  Tensor to(DType dtype) const { return copy_of(view(), dtype); }
  // Same data, new shape with the same element count (InvalidArgument otherwise).
  Tensor reshaped(Shape shape) const&;
  Tensor reshaped(Shape shape) &&;        // takes the storage over: no copy
  std::vector<double> to_vector() const;  // all elements as double

  double get(std::initializer_list<std::int64_t> index) const noexcept { return view().get(index); }
  void set(std::initializer_list<std::int64_t> index, double value) noexcept;

 private:
  struct FreeAligned {
    // (Constructors, not a default member initializer: unique_ptr asks whether this is default-constructible
    // before the end of Tensor, where an initializer would not be parsed yet.)
    FreeAligned() noexcept : mapped(0) {}
    explicit FreeAligned(std::size_t bytes) noexcept : mapped(bytes) {}
    explicit FreeAligned(std::shared_ptr<void> o) noexcept : mapped(0), owner(std::move(o)) {}
    std::size_t mapped;           // bytes of a mapping of the tensor's own (large tensors), else 0: from aligned_alloc
    std::shared_ptr<void> owner;  // adopt(): the memory's owner (nothing is freed here), else null
    void operator()(std::byte* p) noexcept;
  };
  std::unique_ptr<std::byte[], FreeAligned> storage_;
  DType dtype_ = DType::f32;
  Shape shape_;
};

// Argument checks shared by every entry point. Each throws InvalidArgument naming `argument`.
void check_shape(ConstTensorView t, const Shape& expected, const std::string& argument, const std::string& layout);
void check_dims(ConstTensorView t, int dims, const std::string& argument, const std::string& layout);
// Throws InvalidArgument if any element is NaN or infinite (names the first bad flat index).
void check_finite(ConstTensorView t, const std::string& argument);

// Elements [first, first + count) of `view` (any strides) in row-major order, converted to `dtype` and written
// contiguously to `out`; large counts in parallel slices (TBB). Tensor::copy_of is the whole view.
void copy_elements(ConstTensorView view, std::int64_t first, std::int64_t count, DType dtype, std::byte* out);

// `rows` blocks of `row_bytes`, from src (one every src_stride bytes) to dst (one every dst_stride bytes),
// in parallel slices of about 1 MiB (TBB): result copies of hundreds of MB, first touch of fresh pages
// included, run at memory speed instead of one core's; blocks of 256 KiB or more bypass the caches (copy_bytes,
// memcopy.hpp). One block: copy_rows(dst, 0, src, 0, 1, bytes).
void copy_rows(std::byte* dst, std::size_t dst_stride, const std::byte* src, std::size_t src_stride, std::size_t rows,
               std::size_t row_bytes);

// Copies `piece` into `out`, both (B,NH,len,D) of one dtype whose rows (len*D elements) are contiguous, one
// every strides[1] elements (a whole piece, or a slice of a longer sequence); InvalidArgument("piece"/"out")
// for other shapes or layouts. In parallel (copy_rows).
void copy_piece_rows(ConstTensorView piece, TensorView out);
// Checks an output the caller gives (an h to write into): `shape` and `dtype`, rows of shape[2]*shape[3] contiguous
// elements that do not overlap, one every strides[1] elements. InvalidArgument(argument) saying what is wrong.
void check_output_rows(ConstTensorView out, const Shape& shape, DType dtype, const std::string& argument);

}  // namespace mlstm
