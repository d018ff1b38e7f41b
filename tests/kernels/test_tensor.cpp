// Tensors and dtypes: 16-bit conversions round to nearest even; views, strides and shape errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "mlstm/error.hpp"
#include "mlstm/tensor.hpp"

namespace mlstm {
namespace {

float bits_to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

TEST(BFloat16, RoundsToNearestEven) {
  // 1 + 2^-8 is exactly halfway between bf16 1.0 and 1 + 2^-7: ties go to the even (1.0).
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3f808000u)), 0x3f80u);
  // 1 + 3*2^-8 is halfway between 1+2^-7 (odd) and 1+2^-6: goes up to even.
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3f818000u)), 0x3f82u);
  // Just above halfway rounds up.
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3f808001u)), 0x3f81u);
  EXPECT_EQ(float_to_bf16(-1.0f), 0xbf80u);
  EXPECT_EQ(bf16_to_float(0x3f80u), 1.0f);
  // Overflow to infinity; NaN stays NaN.
  EXPECT_TRUE(std::isinf(bf16_to_float(float_to_bf16(bits_to_float(0x7f7fffffu)))));
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(bits_to_float(0x7f800001u)))));  // signalling payload low bits
}

TEST(Float16, RoundsToNearestEvenWithSubnormalsAndOverflow) {
  EXPECT_EQ(float_to_half(1.0f), 0x3c00u);
  EXPECT_EQ(float_to_half(65504.0f), 0x7bffu);           // largest half
  EXPECT_EQ(float_to_half(65519.0f), 0x7bffu);           // below the halfway point
  EXPECT_EQ(float_to_half(65520.0f), 0x7c00u);           // halfway to 65536 -> even -> Inf
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -24)), 0x0001u);  // smallest subnormal
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -25)), 0x0000u);  // halfway to 0 -> even (0)
  EXPECT_EQ(float_to_half(std::ldexp(3.0f, -25)), 0x0002u);  // 1.5 units -> 2 (even)
  EXPECT_EQ(float_to_half(1.0f + std::ldexp(1.0f, -11)), 0x3c00u);  // tie to even
  EXPECT_EQ(float_to_half(1.0f + std::ldexp(3.0f, -11)), 0x3c02u);  // tie to even (up)
  EXPECT_TRUE(std::isnan(half_to_float(float_to_half(std::nanf("")))));
  EXPECT_EQ(half_to_float(0x0001u), std::ldexp(1.0f, -24));
  EXPECT_EQ(half_to_float(0xfbffu), -65504.0f);
  // Every half converts to float and back unchanged.
  for (std::uint32_t h = 0; h < 0x10000u; ++h) {
    const float f = half_to_float(static_cast<std::uint16_t>(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(float_to_half(f), h) << std::hex << h;
  }
}

TEST(Conversions, DoubleToSixteenBitsRoundsOnce) {
  // A double just above the bf16 halfway point 1 + 2^-8, which float32 rounding would put exactly on the
  // tie (and so round down): the correct bf16 result rounds up.
  const double x = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40);
  Tensor t = Tensor::from(std::vector<double>{x}, {1}, DType::bf16);
  EXPECT_EQ(t.data<std::uint16_t>()[0], 0x3f81u);
  const double y = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);  // f16 analogue
  Tensor u = Tensor::from(std::vector<double>{y}, {1}, DType::f16);
  EXPECT_EQ(u.data<std::uint16_t>()[0], 0x3c01u);
}

TEST(TensorView, StridedCopyAndSelect) {
  std::vector<float> v(24);
  for (int e = 0; e < 24; ++e) v[static_cast<std::size_t>(e)] = static_cast<float>(e);
  Tensor t = Tensor::from(v, {2, 3, 4});
  // Transposed view of the last two dims: shape (2,4,3), strides (12,1,4).
  ConstTensorView tv(t.bytes(), DType::f32, {2, 4, 3}, {12, 1, 4});
  EXPECT_FALSE(tv.is_contiguous());
  Tensor c = Tensor::copy_of(tv, DType::f64);
  EXPECT_EQ(c.get({1, 2, 1}), t.get({1, 1, 2}));
  EXPECT_EQ(c.get({0, 3, 2}), 11.0);
  EXPECT_EQ(t.view().select0(1).get({2, 3}), 23.0);
  EXPECT_EQ(t.to(DType::bf16).get({1, 2, 3}), 23.0);
}

TEST(TensorErrors, ShapeChecksNameTheArgument) {
  Tensor t = Tensor::zeros({2, 3}, DType::f32);
  EXPECT_THROW(t.reshaped({4, 2}), InvalidArgument);
  try {
    check_shape(t.view(), {2, 4}, "k", "(B,NH)");
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "k");
    EXPECT_NE(std::string(e.what()).find("(2,4)"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("(2,3)"), std::string::npos) << e.what();
  }
  try {
    check_dims(ConstTensorView(), 4, "q", "(B,NH,S,DHQK)");
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "q");
  }
  Tensor bad = Tensor::from(std::vector<float>{1.f, NAN, 2.f}, {3});
  try {
    check_finite(bad.view(), "v");
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "v");
    EXPECT_NE(std::string(e.what()).find("element 1"), std::string::npos) << e.what();
  }
  EXPECT_EQ(parse_dtype("bf16"), DType::bf16);
  EXPECT_THROW(parse_dtype("int8"), InvalidArgument);
}

}  // namespace
}  // namespace mlstm
