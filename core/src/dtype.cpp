#include "mlstm/core/dtype.hpp"

#include <cmath>
#include <string>

#include "mlstm/core/error.hpp"
#include "mlstm/core/memcopy.hpp"

namespace mlstm {

DType parse_dtype(std::string_view name, const std::string& argument) {
  if (name == "float64" || name == "f64" || name == "double") return DType::f64;
  if (name == "float32" || name == "f32" || name == "float") return DType::f32;
  if (name == "float16" || name == "f16" || name == "half") return DType::f16;
  if (name == "bfloat16" || name == "bf16") return DType::bf16;
  throw InvalidArgument(
      argument, "unknown dtype '" + std::string(name) + "'; expected one of float64, float32, float16, bfloat16");
}

std::uint16_t float_to_half(float f) noexcept {
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) {  // Inf or NaN
    return static_cast<std::uint16_t>(sign | 0x7c00u | (absx > 0x7f800000u ? 0x0200u : 0u));
  }
  if (absx >= 0x477ff000u) {  // rounds to >= 65520 -> Inf
    return static_cast<std::uint16_t>(sign | 0x7c00u);
  }
  if (absx < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    // value = absx as float; half subnormal unit is 2^-24.
    float af;
    std::memcpy(&af, &absx, 4);
    // Scale to units of 2^-24 and round to nearest even (rint uses the current mode: nearest even).
    const float scaled = af * 16777216.0f;  // exact (power of two)
    const auto m = static_cast<std::uint32_t>(std::nearbyint(scaled));
    return static_cast<std::uint16_t>(sign | m);  // m == 0x400 becomes the smallest normal, correctly
  }
  // normal: rebias exponent 127 -> 15, keep 10 mantissa bits with round to nearest even
  std::uint32_t mant = absx & 0x007fffffu;
  std::uint32_t exp = (absx >> 23) - 127 + 15;
  std::uint32_t h = (exp << 10) | (mant >> 13);
  const std::uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into exponent: correct
  return static_cast<std::uint16_t>(sign | h);
}

float half_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t mant = h & 0x3ffu;
  std::uint32_t x;
  if (exp == 0) {
    if (mant == 0) {
      x = sign;
    } else {  // subnormal: mant * 2^-24
      float f = static_cast<float>(mant) * (1.0f / 16777216.0f);
      std::memcpy(&x, &f, 4);
      x |= sign;
    }
  } else if (exp == 31) {
    x = sign | 0x7f800000u | (mant << 13);
  } else {
    x = sign | ((exp - 15 + 127) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

double load_element(const void* base, DType t, std::size_t index) noexcept {
  switch (t) {
    case DType::f64:
      return static_cast<const double*>(base)[index];
    case DType::f32:
      return static_cast<const float*>(base)[index];
    case DType::f16:
      return half_to_float(static_cast<const std::uint16_t*>(base)[index]);
    case DType::bf16:
      return bf16_to_float(static_cast<const std::uint16_t*>(base)[index]);
  }
  return 0.0;
}

namespace {
// double -> float rounded to odd: a float with >= 2 more mantissa bits than the 16-bit target, so a
// following round-to-nearest-even to bf16/f16 gives the correctly rounded result (no double rounding).
float to_float_round_odd(double d) noexcept {
  float f = static_cast<float>(d);
  if (std::isnan(d) || std::isinf(f) || static_cast<double>(f) == d) return f;
  if (std::fabs(static_cast<double>(f)) > std::fabs(d)) f = std::nextafter(f, 0.0f);  // truncate
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  u |= 1u;  // sticky
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace

void store_element(void* base, DType t, std::size_t index, double value) noexcept {
  switch (t) {
    case DType::f64:
      static_cast<double*>(base)[index] = value;
      break;
    case DType::f32:
      static_cast<float*>(base)[index] = static_cast<float>(value);
      break;
    case DType::f16:
      static_cast<std::uint16_t*>(base)[index] = float_to_half(to_float_round_odd(value));
      break;
    case DType::bf16:
      static_cast<std::uint16_t*>(base)[index] = float_to_bf16(to_float_round_odd(value));
      break;
  }
}

namespace {
template <class Load, class Store>
void convert_loop(std::size_t count, Load load, Store store) {
  for (std::size_t e = 0; e < count; ++e) store(e, load(e));
}
}  // namespace

void convert_elements(const void* src, DType st, void* dst, DType dt, std::size_t count) {
  if (st == dt) {
    copy_bytes(dst, src, count * dtype_size(st));
    return;
  }
  // Fast paths for the hot conversions (to/from float32).
  if (dt == DType::f32) {
    auto* out = static_cast<float*>(dst);
    switch (st) {
      case DType::f64:
        convert_loop(
            count, [&](std::size_t e) { return static_cast<const double*>(src)[e]; },
            [&](std::size_t e, double v) { out[e] = static_cast<float>(v); });
        return;
      case DType::bf16: {
        const auto* in = static_cast<const std::uint16_t*>(src);
        for (std::size_t e = 0; e < count; ++e) out[e] = bf16_to_float(in[e]);
        return;
      }
      case DType::f16: {
        const auto* in = static_cast<const std::uint16_t*>(src);
        for (std::size_t e = 0; e < count; ++e) out[e] = half_to_float(in[e]);
        return;
      }
      default:
        break;
    }
  }
  if (st == DType::f32) {
    const auto* in = static_cast<const float*>(src);
    switch (dt) {
      case DType::f64:
        for (std::size_t e = 0; e < count; ++e) static_cast<double*>(dst)[e] = in[e];
        return;
      case DType::bf16:
        for (std::size_t e = 0; e < count; ++e) static_cast<std::uint16_t*>(dst)[e] = float_to_bf16(in[e]);
        return;
      case DType::f16:
        for (std::size_t e = 0; e < count; ++e) static_cast<std::uint16_t*>(dst)[e] = float_to_half(in[e]);
        return;
      default:
        break;
    }
  }
  // General path through double (store_element rounds f64 -> 16-bit correctly).
  for (std::size_t e = 0; e < count; ++e) store_element(dst, dt, e, load_element(src, st, e));
}

}  // namespace mlstm
