// Element types and the 16-bit float conversions (round to nearest, ties to even).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace mlstm {

enum class DType { f64, f32, f16, bf16 };

constexpr std::size_t dtype_size(DType t) noexcept {
  switch (t) {
    case DType::f64:
      return 8;
    case DType::f32:
      return 4;
    case DType::f16:
      return 2;
    case DType::bf16:
      return 2;
  }
  return 0;
}

constexpr std::string_view dtype_name(DType t) noexcept {
  switch (t) {
    case DType::f64:
      return "float64";
    case DType::f32:
      return "float32";
    case DType::f16:
      return "float16";
    case DType::bf16:
      return "bfloat16";
  }
  return "?";
}

// Accepts "float64|f64|double", "float32|f32|float", "float16|f16|half", "bfloat16|bf16".
// Throws InvalidArgument(argument, ...) listing the accepted names otherwise.
DType parse_dtype(std::string_view name, const std::string& argument = "dtype");

// bfloat16: the upper half of a float32, rounded to nearest even; NaN stays a (quiet) NaN.
inline std::uint16_t float_to_bf16(float f) noexcept {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0) {
    return static_cast<std::uint16_t>((u >> 16) | 0x0040u);  // quiet NaN, sign kept
  }
  const std::uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>((u + rounding_bias) >> 16);
}

inline float bf16_to_float(std::uint16_t b) noexcept {
  const std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE binary16 with subnormals, infinities and NaN; round to nearest even.
std::uint16_t float_to_half(float f) noexcept;
float half_to_float(std::uint16_t h) noexcept;

// Convert `count` elements between any two dtypes (same dtype: memcpy).
void convert_elements(const void* src, DType src_type, void* dst, DType dst_type, std::size_t count);

// Reads one element as double / writes one element from double (slow; for tests and checks).
double load_element(const void* base, DType t, std::size_t index) noexcept;
void store_element(void* base, DType t, std::size_t index, double value) noexcept;

}  // namespace mlstm
