// Tensors and dtypes: the 16-bit conversions round to nearest, ties to even (checked against an
// independent oracle, exhaustively where feasible), float64 -> 16 bits rounds once; strided views,
// reshape errors and the shape-check messages.
#include <gtest/gtest.h>

#include <memory>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "mlstm/core/error.hpp"
#include "mlstm/core/tensor.hpp"

namespace mlstm {
namespace {

float bits_to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
double bits_to_double(std::uint64_t u) {
  double d;
  std::memcpy(&d, &u, 8);
  return d;
}

// ---- an independent oracle for rounding to a 16-bit format -----------------------------------------

// Every non-negative finite value of a 16-bit format (patterns 0 .. inf_pattern - 1, in increasing
// order), followed by the value the next pattern would have if the exponent range went on (2^16 for
// float16, 2^128 for bfloat16), which stands for +Inf: IEEE rounding sends x to Inf exactly when
// rounding with an unbounded exponent gives that value.
struct Format16 {
  std::uint16_t inf_pattern;
  std::vector<double> values;  // values[p] for pattern p
  double (*decode)(std::uint16_t);
};

Format16 make_format(std::uint16_t inf_pattern, double beyond_max, double (*decode)(std::uint16_t)) {
  Format16 f{inf_pattern, {}, decode};
  for (std::uint32_t p = 0; p < inf_pattern; ++p) f.values.push_back(decode(static_cast<std::uint16_t>(p)));
  f.values.push_back(beyond_max);
  return f;
}
const Format16& half_format() {
  static const Format16 f = make_format(0x7c00u, 65536.0, [](std::uint16_t h) -> double { return half_to_float(h); });
  return f;
}
const Format16& bf16_format() {
  static const Format16 f =
      make_format(0x7f80u, std::ldexp(1.0, 128), [](std::uint16_t b) -> double { return bf16_to_float(b); });
  return f;
}

// Correctly rounded (nearest, ties to the even pattern) 16-bit pattern of any double that is not NaN.
// The midpoint of two neighbours is exact in double (they have at most 11 significant bits), so the
// comparison with it is exact too.
std::uint16_t oracle_round(double x, const Format16& f) {
  const std::uint16_t sign = std::signbit(x) ? 0x8000u : 0u;
  const double a = std::fabs(x);
  const auto& v = f.values;
  if (a >= v.back()) return static_cast<std::uint16_t>(sign | f.inf_pattern);
  const auto hi = static_cast<std::size_t>(std::lower_bound(v.begin(), v.end(), a) - v.begin());  // v[hi] >= a
  if (v[hi] == a) return static_cast<std::uint16_t>(sign | hi);
  const std::size_t lo = hi - 1;
  const double mid = (v[lo] + v[hi]) / 2;
  std::size_t pick;
  if (a < mid)
    pick = lo;
  else if (a > mid)
    pick = hi;
  else
    pick = (lo % 2 == 0) ? lo : hi;
  return static_cast<std::uint16_t>(sign | pick);
}

bool is_nan16(std::uint16_t p, const Format16& f) {
  return (p & 0x7fffu) > f.inf_pattern;  // exponent all ones, mantissa nonzero
}

// A double with a uniformly random exponent in [lo_exp, hi_exp] and random mantissa and sign.
double random_double(std::mt19937_64& rng, int lo_exp, int hi_exp) {
  std::uniform_int_distribution<int> e(lo_exp, hi_exp);
  const std::uint64_t mant = rng() & ((std::uint64_t{1} << 52) - 1);
  const double m = 1.0 + std::ldexp(static_cast<double>(mant), -52);
  return (rng() & 1 ? -1.0 : 1.0) * std::ldexp(m, e(rng));
}

// ---- bfloat16 ------------------------------------------------------------------------------------

TEST(BFloat16, RoundsToNearestEven) {
  // 1 + 2^-8 is exactly halfway between bf16 1.0 and 1 + 2^-7: ties go to the even (1.0).
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3f808000u)), 0x3f80u);
  // 1 + 3*2^-8 is halfway between 1+2^-7 (odd) and 1+2^-6: goes up to the even one.
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3f818000u)), 0x3f82u);
  // Just above / below halfway.
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3f808001u)), 0x3f81u);
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3f817fffu)), 0x3f81u);
  // Negative ties mirror the positive ones.
  EXPECT_EQ(float_to_bf16(bits_to_float(0xbf808000u)), 0xbf80u);
  EXPECT_EQ(float_to_bf16(bits_to_float(0xbf818000u)), 0xbf82u);
  EXPECT_EQ(float_to_bf16(-1.0f), 0xbf80u);
  EXPECT_EQ(float_to_bf16(-0.0f), 0x8000u);
  EXPECT_EQ(bf16_to_float(0x3f80u), 1.0f);
  // A carry out of the mantissa moves to the next binade.
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3fffffffu)), 0x4000u);
}

TEST(BFloat16, OverflowInfinityNaNAndSubnormals) {
  EXPECT_EQ(float_to_bf16(bits_to_float(0x7f7f7fffu)), 0x7f7fu);  // below the halfway point: largest bf16
  EXPECT_EQ(float_to_bf16(bits_to_float(0x7f7f8000u)), 0x7f80u);  // tie; 0x7f7f is odd -> Inf
  EXPECT_EQ(float_to_bf16(bits_to_float(0x7f7fffffu)), 0x7f80u);  // FLT_MAX -> Inf
  EXPECT_EQ(float_to_bf16(bits_to_float(0xff7fffffu)), 0xff80u);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80u);
  EXPECT_EQ(float_to_bf16(-std::numeric_limits<float>::infinity()), 0xff80u);
  // NaN stays NaN, also when its payload is only in the bits that are dropped; the sign is kept.
  for (std::uint32_t nan : {0x7fc00000u, 0x7f800001u, 0x7f80ffffu, 0xff800001u, 0xffc00000u}) {
    const std::uint16_t b = float_to_bf16(bits_to_float(nan));
    EXPECT_TRUE(std::isnan(bf16_to_float(b))) << std::hex << nan;
    EXPECT_EQ(b & 0x8000u, (nan >> 16) & 0x8000u) << std::hex << nan;
  }
  // Subnormals are rounded like every other value.
  EXPECT_EQ(float_to_bf16(bits_to_float(0x00008000u)), 0x0000u);  // tie -> even (0)
  EXPECT_EQ(float_to_bf16(bits_to_float(0x00008001u)), 0x0001u);
  EXPECT_EQ(float_to_bf16(bits_to_float(0x00018000u)), 0x0002u);  // tie -> even (up)
  EXPECT_EQ(float_to_bf16(bits_to_float(0x007fffffu)), 0x0080u);  // largest subnormal -> smallest normal
  EXPECT_EQ(bf16_to_float(0x0001u), std::ldexp(1.0f, -133));
}

TEST(BFloat16, EveryValueRoundTripsAndRandomFloatsMatchTheOracle) {
  const auto& fmt = bf16_format();
  for (std::uint32_t p = 0; p < 0x10000u; ++p) {
    const float f = bf16_to_float(static_cast<std::uint16_t>(p));
    if (std::isnan(f)) {
      ASSERT_TRUE(is_nan16(static_cast<std::uint16_t>(p), fmt)) << std::hex << p;
      continue;
    }
    ASSERT_EQ(float_to_bf16(f), p) << std::hex << p;
  }
  std::mt19937_64 rng(0x5eed);
  for (int n = 0; n < 300000; ++n) {
    const float f = bits_to_float(static_cast<std::uint32_t>(rng()));
    if (std::isnan(f)) continue;
    ASSERT_EQ(float_to_bf16(f), oracle_round(f, fmt)) << std::hex << float_bits(f);
  }
  // Exactly halfway between neighbours (the low 16 bits 0x8000), everywhere.
  for (std::uint32_t hi = 0; hi < 0x7f80u; hi += 3) {
    const float f = bits_to_float((hi << 16) | 0x8000u);
    ASSERT_EQ(float_to_bf16(f), oracle_round(f, fmt)) << std::hex << float_bits(f);
  }
}

// ---- float16 -------------------------------------------------------------------------------------

TEST(Float16, RoundsToNearestEvenWithSubnormalsAndOverflow) {
  EXPECT_EQ(float_to_half(1.0f), 0x3c00u);
  EXPECT_EQ(float_to_half(-0.0f), 0x8000u);
  EXPECT_EQ(float_to_half(65504.0f), 0x7bffu);                        // largest half
  EXPECT_EQ(float_to_half(65519.0f), 0x7bffu);                        // below the halfway point
  EXPECT_EQ(float_to_half(std::nextafter(65520.0f, 0.0f)), 0x7bffu);  // just below it
  EXPECT_EQ(float_to_half(65520.0f), 0x7c00u);                        // halfway to 65536 -> even -> Inf
  EXPECT_EQ(float_to_half(-65520.0f), 0xfc00u);
  EXPECT_EQ(float_to_half(1e10f), 0x7c00u);
  EXPECT_EQ(float_to_half(std::numeric_limits<float>::infinity()), 0x7c00u);
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -24)), 0x0001u);  // smallest subnormal
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -25)), 0x0000u);  // halfway to 0 -> even (0)
  EXPECT_EQ(float_to_half(std::nextafter(std::ldexp(1.0f, -25), 1.0f)), 0x0001u);
  EXPECT_EQ(float_to_half(-std::ldexp(1.0f, -25)), 0x8000u);
  EXPECT_EQ(float_to_half(std::ldexp(3.0f, -25)), 0x0002u);         // 1.5 units -> 2 (even)
  EXPECT_EQ(float_to_half(std::ldexp(2047.0f, -25)), 0x0400u);      // largest subnormal + half unit: tie -> even normal
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -14)), 0x0400u);         // smallest normal
  EXPECT_EQ(float_to_half(1.0f + std::ldexp(1.0f, -11)), 0x3c00u);  // tie to even
  EXPECT_EQ(float_to_half(1.0f + std::ldexp(3.0f, -11)), 0x3c02u);  // tie to even (up)
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -30)), 0x0000u);         // underflow to zero
  for (std::uint32_t nan : {0x7fc00000u, 0x7f800001u, 0x7f801fffu, 0xff800001u}) {
    const std::uint16_t h = float_to_half(bits_to_float(nan));
    EXPECT_TRUE(std::isnan(half_to_float(h))) << std::hex << nan;
    EXPECT_EQ(h & 0x8000u, (nan >> 16) & 0x8000u) << std::hex << nan;
  }
  EXPECT_EQ(half_to_float(0x0001u), std::ldexp(1.0f, -24));
  EXPECT_EQ(half_to_float(0x03ffu), std::ldexp(1023.0f, -24));
  EXPECT_EQ(half_to_float(0xfbffu), -65504.0f);
  EXPECT_TRUE(std::isinf(half_to_float(0x7c00u)));
}

TEST(Float16, EveryValueRoundTripsAndRandomFloatsMatchTheOracle) {
  const auto& fmt = half_format();
  for (std::uint32_t h = 0; h < 0x10000u; ++h) {
    const float f = half_to_float(static_cast<std::uint16_t>(h));
    if (std::isnan(f)) {
      ASSERT_TRUE(is_nan16(static_cast<std::uint16_t>(h), fmt)) << std::hex << h;
      continue;
    }
    ASSERT_EQ(float_to_half(f), h) << std::hex << h;
  }
  std::mt19937_64 rng(0xf16);
  for (int n = 0; n < 300000; ++n) {
    // Exponents where float16 is interesting (underflow .. overflow), and any float.
    const float f =
        n % 2 ? static_cast<float>(random_double(rng, -27, 17)) : bits_to_float(static_cast<std::uint32_t>(rng()));
    if (std::isnan(f)) continue;
    ASSERT_EQ(float_to_half(f), oracle_round(f, fmt)) << std::hex << float_bits(f);
  }
  // Every midpoint between neighbouring halves, and its float neighbours.
  for (std::size_t p = 0; p + 1 < fmt.values.size(); ++p) {
    const float mid = static_cast<float>((fmt.values[p] + fmt.values[p + 1]) / 2);  // exact in float
    for (float f : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e30f)}) {
      ASSERT_EQ(float_to_half(f), oracle_round(f, fmt)) << std::hex << float_bits(f);
      ASSERT_EQ(float_to_half(-f), oracle_round(-f, fmt)) << std::hex << float_bits(f);
    }
  }
}

// ---- float64 -> 16 bits: one rounding, not two ---------------------------------------------------

std::uint16_t f64_to_16(double x, DType t) {
  const Tensor out = Tensor::from(std::vector<double>{x}, {1}, t);
  return out.data<std::uint16_t>()[0];
}

TEST(Conversions, DoubleToSixteenBitsRoundsOnce) {
  // Just above the bf16 midpoint 1 + 2^-8: float32 rounding would land exactly on the tie (and then round
  // down to even); the correct result rounds up.
  EXPECT_EQ(f64_to_16(1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40), DType::bf16), 0x3f81u);
  // Just below the midpoint 1 + 3*2^-8: float32 would round up onto the tie and then up to even (0x3f82);
  // the correct result rounds down.
  EXPECT_EQ(f64_to_16(1.0 + std::ldexp(3.0, -8) - std::ldexp(1.0, -40), DType::bf16), 0x3f81u);
  EXPECT_EQ(f64_to_16(-(1.0 + std::ldexp(3.0, -8) - std::ldexp(1.0, -40)), DType::bf16), 0xbf81u);
  // Exact ties still go to even.
  EXPECT_EQ(f64_to_16(1.0 + std::ldexp(1.0, -8), DType::bf16), 0x3f80u);
  EXPECT_EQ(f64_to_16(1.0 + std::ldexp(3.0, -8), DType::bf16), 0x3f82u);
  // The float16 analogues.
  EXPECT_EQ(f64_to_16(1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40), DType::f16), 0x3c01u);
  EXPECT_EQ(f64_to_16(1.0 + std::ldexp(3.0, -11) - std::ldexp(1.0, -40), DType::f16), 0x3c01u);
  EXPECT_EQ(f64_to_16(std::ldexp(1.0, -25) + std::ldexp(1.0, -60), DType::f16), 0x0001u);  // subnormal, above tie
  EXPECT_EQ(f64_to_16(65520.0 - 1e-9, DType::f16), 0x7bffu);
  EXPECT_EQ(f64_to_16(65520.0, DType::f16), 0x7c00u);
  // Beyond the float32 range.
  EXPECT_EQ(f64_to_16(1e39, DType::bf16), 0x7f80u);
  EXPECT_EQ(f64_to_16(-1e300, DType::bf16), 0xff80u);
  EXPECT_EQ(f64_to_16(1e-50, DType::bf16), 0x0000u);
  EXPECT_EQ(f64_to_16(-1e-50, DType::bf16), 0x8000u);
  EXPECT_EQ(f64_to_16(1e-50, DType::f16), 0x0000u);
  EXPECT_TRUE(std::isnan(bf16_to_float(f64_to_16(std::nan(""), DType::bf16))));
  EXPECT_TRUE(std::isnan(half_to_float(f64_to_16(std::nan(""), DType::f16))));
  EXPECT_EQ(f64_to_16(std::numeric_limits<double>::infinity(), DType::f16), 0x7c00u);
}

TEST(Conversions, DoubleToSixteenBitsMatchesTheOracle) {
  std::mt19937_64 rng(0xd0b1e);
  for (DType t : {DType::bf16, DType::f16}) {
    const auto& fmt = t == DType::bf16 ? bf16_format() : half_format();
    std::vector<double> xs;
    // Random doubles over the format's range and beyond.
    for (int n = 0; n < 100000; ++n)
      xs.push_back(t == DType::bf16 ? random_double(rng, -140, 130) : random_double(rng, -28, 17));
    // Midpoints between neighbours, nudged by less than a float32 ulp either way (double rounding bait).
    for (std::size_t p = 0; p + 1 < fmt.values.size(); p += (t == DType::bf16 ? 7 : 1)) {
      const double mid = (fmt.values[p] + fmt.values[p + 1]) / 2;
      for (double nudge : {0.0, 1e-12, -1e-12, 1e-15, -1e-15}) xs.push_back(mid * (1.0 + nudge));
      xs.push_back(std::nextafter(mid, 0.0));
      xs.push_back(std::nextafter(mid, 1e300));
    }
    // The bf16 overflow threshold (2 - 2^-8) 2^127, halfway from the largest bf16 to 2^128: a tie that
    // goes to Inf (even), and its double neighbours.
    for (std::uint64_t bits : {0x47eff00000000000ull, 0x47eff00000000001ull, 0x47efefffffffffffull}) {
      xs.push_back(bits_to_double(bits));
      xs.push_back(-bits_to_double(bits));
    }
    const Tensor out = Tensor::from(xs, {static_cast<std::int64_t>(xs.size())}, t);
    for (std::size_t e = 0; e < xs.size(); ++e) {
      ASSERT_EQ(out.data<std::uint16_t>()[e], oracle_round(xs[e], fmt))
          << dtype_name(t) << " x=" << xs[e] << " bits " << std::hex << [&] {
               std::uint64_t u;
               std::memcpy(&u, &xs[e], 8);
               return u;
             }();
    }
  }
}

// ---- views, copies, reshape ------------------------------------------------------------------------

// copy_rows: blocks of 3 MiB + 5 bytes (several parallel slices and a short last one) between different
// strides, and small copies (one call); bytes outside the blocks stay untouched. reshaped() of an rvalue
// takes the storage over.
// Tensor::adopt: memory another object owns (a GPU's page-locked memory) is kept while any tensor holding it lives,
// through moves and reshapes, and released once with the last one; a copy is ordinary memory of its own.
TEST(TensorAdopt, TheOwnerGoesWithTheLastHolder) {
  auto owned = std::make_shared<std::vector<float>>(6, 1.5f);
  std::weak_ptr<std::vector<float>> watch = owned;
  auto* data = reinterpret_cast<std::byte*>(owned->data());
  Tensor t = Tensor::adopt(data, {2, 3}, DType::f32, std::move(owned));
  EXPECT_EQ(t.bytes(), data);
  EXPECT_EQ(t.get({1, 2}), 1.5);
  Tensor copy = t;
  EXPECT_NE(copy.bytes(), data);
  EXPECT_EQ(copy.get({1, 2}), 1.5);
  Tensor moved = std::move(t).reshaped({3, 2});
  EXPECT_EQ(moved.bytes(), data);
  EXPECT_FALSE(watch.expired());
  moved = Tensor();
  EXPECT_TRUE(watch.expired()) << "the owner is released with the last tensor over its memory";
  EXPECT_EQ(copy.get({0, 0}), 1.5);
  EXPECT_THROW(Tensor::adopt(data, {2}, DType::f32, nullptr), InvalidArgument);
  EXPECT_THROW(Tensor::adopt(data, {-1}, DType::f32, std::make_shared<int>(0)), InvalidArgument);
}

TEST(TensorCopies, CopyRowsAndMovingReshape) {
  const std::size_t row = (std::size_t{3} << 20) + 5, rows = 3, src_stride = row + 17, dst_stride = row + 4096;
  std::vector<std::byte> src(rows * src_stride), dst(rows * dst_stride, std::byte{0xAB});
  for (std::size_t e = 0; e < src.size(); ++e) src[e] = static_cast<std::byte>((e * 131 + 7) & 0xFF);
  copy_rows(dst.data(), dst_stride, src.data(), src_stride, rows, row);
  for (std::size_t r = 0; r < rows; ++r) {
    EXPECT_EQ(std::memcmp(dst.data() + r * dst_stride, src.data() + r * src_stride, row), 0) << "row " << r;
    EXPECT_EQ(dst[r * dst_stride + row], std::byte{0xAB}) << "row " << r;
  }
  std::vector<std::byte> small(10, std::byte{0});
  copy_rows(small.data(), 5, src.data(), 100, 2, 3);
  EXPECT_EQ(small[0], src[0]);
  EXPECT_EQ(small[5], src[100]);
  EXPECT_EQ(small[3], std::byte{0});

  Tensor t = Tensor::from(std::vector<float>{1, 2, 3, 4, 5, 6}, {1, 6});
  const std::byte* storage = t.bytes();
  const Tensor copy = t.reshaped({2, 3});
  EXPECT_NE(copy.bytes(), storage);
  const Tensor moved = std::move(t).reshaped({3, 2});
  EXPECT_EQ(moved.bytes(), storage);
  EXPECT_EQ(moved.shape(), (Shape{3, 2}));
  EXPECT_EQ(moved.data<float>()[5], 6.f);
}

TEST(TensorView, StridedCopyAndSelect) {
  std::vector<float> v(24);
  for (int e = 0; e < 24; ++e) v[static_cast<std::size_t>(e)] = static_cast<float>(e);
  Tensor t = Tensor::from(v, {2, 3, 4});
  // Transposed view of the last two dims: shape (2,4,3), strides (12,1,4).
  ConstTensorView tv(t.bytes(), DType::f32, {2, 4, 3}, {12, 1, 4});
  EXPECT_FALSE(tv.is_contiguous());
  Tensor c = Tensor::copy_of(tv, DType::f64);
  EXPECT_TRUE(t.view().is_contiguous());
  EXPECT_EQ(c.shape(), (Shape{2, 4, 3}));
  for (std::int64_t a = 0; a < 2; ++a)
    for (std::int64_t b = 0; b < 4; ++b)
      for (std::int64_t d = 0; d < 3; ++d) ASSERT_EQ(c.get({a, b, d}), t.get({a, d, b}));
  // Every other element of the last dim (stride 2), and a sub-view through select0.
  ConstTensorView every_other(t.bytes(), DType::f32, {2, 3, 2}, {12, 4, 2});
  Tensor e = Tensor::copy_of(every_other);
  EXPECT_EQ(e.dtype(), DType::f32);
  EXPECT_EQ(e.to_vector(), (std::vector<double>{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22}));
  EXPECT_EQ(t.view().select0(1).get({2, 3}), 23.0);
  EXPECT_EQ(ConstTensorView(t).select0(1).shape(), (Shape{3, 4}));
  EXPECT_EQ(tv.select0(1).get({3, 2}), 23.0);
  EXPECT_EQ(t.to(DType::bf16).get({1, 2, 3}), 23.0);
}

// A range of the sequence axis of a (B,NH,S,D) tensor (what graph segments are), large enough for the
// parallel copy, with and without a dtype conversion; and a view with an extent-1 dimension of odd stride.
TEST(TensorView, SequenceRangeCopiesRunByRun) {
  const std::int64_t B = 3, NH = 5, S = 1000, D = 96, s0 = 123, len = 700;
  std::vector<float> v(static_cast<std::size_t>(B * NH * S * D));
  for (std::size_t e = 0; e < v.size(); ++e) v[e] = static_cast<float>(e % 65536) * 0.25f;
  const Tensor t = Tensor::from(v, {B, NH, S, D});
  const ConstTensorView seg(t.bytes() + static_cast<std::size_t>(s0 * D) * 4, DType::f32, {B, NH, len, D},
                            {NH * S * D, S * D, D, 1});
  ASSERT_FALSE(seg.is_contiguous());
  for (DType dt : {DType::f32, DType::bf16, DType::f64}) {
    const Tensor c = Tensor::copy_of(seg, dt), whole = Tensor::copy_of(t.view(), dt);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < NH; ++h)
        for (std::int64_t s = 0; s < len; s += 37)
          for (std::int64_t d = 0; d < D; d += 5)
            ASSERT_EQ(c.get({b, h, s, d}), whole.get({b, h, s0 + s, d}))
                << dtype_name(dt) << " at " << b << "," << h << "," << s << "," << d;
  }
  // Extent-1 dimension with an arbitrary stride inside an otherwise contiguous layout.
  const ConstTensorView odd(t.bytes(), DType::f32, {2, 1, 4}, {4, 999, 1});
  EXPECT_EQ(Tensor::copy_of(odd).to_vector(), (std::vector<double>{0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75}));
}

TEST(TensorView, StridedConversionRoundsCorrectly) {
  // Ties of bf16 (1 + odd * 2^-8) and of f16 (1 + odd * 2^-11), some nudged by 2^-40, read through a
  // transposed float64 view.
  std::vector<double> v;
  for (int n = 0; n < 64; ++n) {
    const double nudge = n % 3 == 0 ? std::ldexp(1.0, -40) : n % 3 == 1 ? -std::ldexp(1.0, -40) : 0.0;
    v.push_back(1.0 + std::ldexp(2.0 * n + 1.0, -8) + nudge);
    v.push_back(-(1.0 + std::ldexp(2.0 * n + 1.0, -11) + nudge));
  }
  const Tensor base = Tensor::from(v, {16, 8});
  const ConstTensorView transposed(base.bytes(), DType::f64, {8, 16}, {1, 8});
  for (DType t : {DType::bf16, DType::f16}) {
    const auto& fmt = t == DType::bf16 ? bf16_format() : half_format();
    const Tensor strided = Tensor::copy_of(transposed, t);
    for (std::int64_t a = 0; a < 8; ++a) {
      for (std::int64_t b = 0; b < 16; ++b) {
        ASSERT_EQ(strided.data<std::uint16_t>()[a * 16 + b], oracle_round(transposed.get({a, b}), fmt))
            << dtype_name(t) << " (" << a << "," << b << ")";
      }
    }
  }
}

TEST(TensorErrors, ReshapeAndConstruction) {
  Tensor t = Tensor::from(std::vector<float>{1, 2, 3, 4, 5, 6}, {2, 3});
  try {
    (void)t.reshaped({4, 2});
    ADD_FAILURE() << "no exception";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "shape");
    EXPECT_NE(std::string(e.what()).find("(2,3)"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("(4,2)"), std::string::npos) << e.what();
  }
  const Tensor r = t.reshaped({3, 2});
  EXPECT_EQ(r.shape(), (Shape{3, 2}));
  EXPECT_EQ(r.get({2, 1}), 6.0);
  EXPECT_EQ(t.reshaped({6}).to_vector(), t.to_vector());
  EXPECT_THROW(Tensor({2, -1}, DType::f32), InvalidArgument);
  try {
    (void)Tensor::from(std::vector<float>{1, 2, 3}, {2, 2});
    ADD_FAILURE() << "no exception";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "values");
  }
  // Copies are deep.
  Tensor copy = t;
  copy.set({0, 0}, 42.0);
  EXPECT_EQ(t.get({0, 0}), 1.0);
}

TEST(TensorErrors, ShapeChecksNameTheArgumentAndTheLayout) {
  Tensor t = Tensor::zeros({2, 3}, DType::f32);
  try {
    check_shape(t.view(), {2, 4}, "k", "(B,NH)");
    ADD_FAILURE() << "no exception";
  } catch (const InvalidArgument& e) {
    const std::string what = e.what();
    EXPECT_EQ(e.argument(), "k");
    EXPECT_EQ(what.rfind("k: ", 0), 0u) << what;  // the message starts with the argument
    EXPECT_NE(what.find("(B,NH)"), std::string::npos) << what;
    EXPECT_NE(what.find("(2,4)"), std::string::npos) << what;
    EXPECT_NE(what.find("(2,3)"), std::string::npos) << what;
  }
  try {
    check_shape(t.view(), {2, 3, 1}, "c0", "(B,NH,DHQK)");
    ADD_FAILURE() << "no exception";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "c0");
    EXPECT_NE(std::string(e.what()).find("3 dimensions"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(check_shape(t.view(), {2, 3}, "k", "(B,NH)"));
  try {
    check_dims(ConstTensorView(), 4, "q", "(B,NH,S,DHQK)");
    ADD_FAILURE() << "no exception";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "q");
    EXPECT_NE(std::string(e.what()).find("missing"), std::string::npos) << e.what();
  }
  const ConstTensorView reversed(t.bytes(), DType::f32, {2, 3}, {3, -1});
  try {
    check_dims(reversed, 2, "v", "(B,NH)");
    ADD_FAILURE() << "no exception";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "v");
    EXPECT_NE(std::string(e.what()).find("negative strides"), std::string::npos) << e.what();
  }
  Tensor bad = Tensor::from(std::vector<float>{1.f, NAN, 2.f}, {3});
  try {
    check_finite(bad.view(), "v");
    ADD_FAILURE() << "no exception";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "v");
    EXPECT_NE(std::string(e.what()).find("element 1"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(check_finite(t.view(), "t"));
}

TEST(DTypes, NamesSizesAndParsing) {
  EXPECT_EQ(parse_dtype("bf16"), DType::bf16);
  EXPECT_EQ(parse_dtype("bfloat16"), DType::bf16);
  EXPECT_EQ(parse_dtype("half"), DType::f16);
  EXPECT_EQ(parse_dtype("float32"), DType::f32);
  EXPECT_EQ(parse_dtype("double"), DType::f64);
  try {
    parse_dtype("int8", "--dtype");
    ADD_FAILURE() << "no exception";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "--dtype");
    EXPECT_NE(std::string(e.what()).find("bfloat16"), std::string::npos) << e.what();
  }
  EXPECT_EQ(dtype_size(DType::bf16), 2u);
  EXPECT_EQ(dtype_size(DType::f64), 8u);
  EXPECT_EQ(dtype_name(DType::f16), "float16");
  for (DType t : {DType::f64, DType::f32, DType::f16, DType::bf16}) EXPECT_EQ(parse_dtype(dtype_name(t)), t);
}

}  // namespace
}  // namespace mlstm
