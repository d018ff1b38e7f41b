// The environment knobs' parsers (core/env.hpp): a value that is not one of the knob's is refused with
// InvalidArgument naming the variable, never ignored.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "mlstm/core/env.hpp"
#include "mlstm/core/error.hpp"
#include "test_util.hpp"

namespace mlstm {
namespace {

constexpr const char* kKnob = "MLSTM_TEST_ENV_KNOB";

// The InvalidArgument that `call` throws with the knob at `value`, or a failure.
template <class Call>
::testing::AssertionResult refused(const char* value, Call&& call) {
  const testing::ScopedEnv knob(kKnob, value);
  try {
    call();
  } catch (const InvalidArgument& e) {
    if (e.argument() != kKnob) return ::testing::AssertionFailure() << "names '" << e.argument() << "'";
    if (std::string(e.what()).find(value) == std::string::npos)
      return ::testing::AssertionFailure() << "does not quote the value: " << e.what();
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "'" << value << "' was taken";
}

TEST(Env, WholeNumbers) {
  EXPECT_EQ(env::whole_number("0"), 0);
  EXPECT_EQ(env::whole_number("17"), 17);
  EXPECT_EQ(env::whole_number("9223372036854775807"), INT64_MAX);
  for (const char* bad : {"", "-1", "-0", "+3", " 3", "3 ", "3x", "x3", "0x10", "1e3", "9223372036854775808"})
    EXPECT_FALSE(env::whole_number(bad).has_value()) << "'" << bad << "'";
}

TEST(Env, PositiveCounts) {
  const testing::ScopedEnv knob(kKnob, nullptr);
  EXPECT_FALSE(env::positive_count(kKnob, "things").has_value()) << "unset";
  knob.set("");
  EXPECT_FALSE(env::positive_count(kKnob, "things").has_value()) << "empty is unset";
  knob.set("1");
  EXPECT_EQ(env::positive_count(kKnob, "things"), 1);
  knob.set("4096");
  EXPECT_EQ(env::positive_count(kKnob, "things", 4096), 4096) << "the maximum itself";
  for (const char* bad : {"0", "-3", "x", "7x", "0x10", " 7", "7 ", "+7", "1e3", "99999999999999999999"})
    EXPECT_TRUE(refused(bad, [] { (void)env::positive_count(kKnob, "things"); })) << bad;
  EXPECT_TRUE(refused("4097", [] { (void)env::positive_count(kKnob, "things", 4096); })) << "beyond the maximum";
}

TEST(Env, Indices) {
  const testing::ScopedEnv knob(kKnob, nullptr);
  EXPECT_FALSE(env::index(kKnob, "a rank").has_value());
  knob.set("0");
  EXPECT_EQ(env::index(kKnob, "a rank"), 0);
  knob.set("3");
  EXPECT_EQ(env::index(kKnob, "a rank", 3), 3);
  for (const char* bad : {"-1", "x", "1x", " 1", "4"})
    EXPECT_TRUE(refused(bad, [] { (void)env::index(kKnob, "a rank", 3); })) << bad;
}

TEST(Env, OneOfAndFlags) {
  const testing::ScopedEnv knob(kKnob, nullptr);
  EXPECT_FALSE(env::one_of(kKnob, {"on", "off"}).has_value());
  EXPECT_FALSE(env::flag(kKnob));
  knob.set("off");
  EXPECT_EQ(env::one_of(kKnob, {"on", "off"}), "off");
  knob.set("1");
  EXPECT_TRUE(env::flag(kKnob));
  knob.set("0");
  EXPECT_FALSE(env::flag(kKnob));
  for (const char* bad : {"OFF", "of", "off ", "yes"})
    EXPECT_TRUE(refused(bad, [] { (void)env::one_of(kKnob, {"on", "off"}); })) << bad;
  for (const char* bad : {"2", "true", "on", "01"}) EXPECT_TRUE(refused(bad, [] { (void)env::flag(kKnob); })) << bad;
}

}  // namespace
}  // namespace mlstm
