#include "mlstm/core/env.hpp"

#include <charconv>
#include <cstdlib>

#include "mlstm/core/error.hpp"

namespace mlstm::env {

std::optional<std::string> get(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::string(v);
}

std::optional<std::int64_t> whole_number(std::string_view text) {
  std::int64_t n = 0;
  const char* const end = text.data() + text.size();
  if (text.empty() || text.front() == '-') return std::nullopt;
  const auto [stop, ec] = std::from_chars(text.data(), end, n);
  if (ec != std::errc() || stop != end) return std::nullopt;
  return n;
}

bool flag(const char* name) { return one_of(name, {"0", "1"}).value_or("0") == "1"; }

namespace {

// The variable as an integer in [min, max]; nullopt when unset; `expected` opens the refusal's message.
std::optional<std::int64_t> integer(const char* name, const std::string& expected, std::int64_t min, std::int64_t max) {
  const auto v = get(name);
  if (!v) return std::nullopt;
  const auto n = whole_number(*v);
  if (!n || *n < min || *n > max)
    throw InvalidArgument(name, expected + " up to " + std::to_string(max) + " (got '" + *v + "')");
  return *n;
}

}  // namespace

std::optional<std::int64_t> positive_count(const char* name, const char* what, std::int64_t max) {
  return integer(name, "expected a positive count of " + std::string(what), 1, max);
}

std::optional<std::int64_t> index(const char* name, const char* what, std::int64_t max) {
  return integer(name, "expected " + std::string(what) + " from 0", 0, max);
}

std::optional<std::string> one_of(const char* name, std::initializer_list<const char*> values, const char* what) {
  const auto v = get(name);
  if (!v) return std::nullopt;
  std::string list;
  std::size_t i = 0;
  for (const char* value : values) {
    if (*v == value) return v;
    list += (i == 0 ? "" : i + 1 == values.size() ? " or " : ", ") + std::string(value);
    ++i;
  }
  if (what) list.append(" ").append(what);
  throw InvalidArgument(name, "expected " + list + " (got '" + *v + "')");
}

}  // namespace mlstm::env
