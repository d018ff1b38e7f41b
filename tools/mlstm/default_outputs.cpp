#include "default_outputs.hpp"

#include <string>

#include <CLI/Option.hpp>

#include "mlstm/core/atomic_file.hpp"
#include "mlstm/core/error.hpp"

namespace mlstm::cli {

bool option_given(const BenchOptions& bo, const std::string& name) {
  const auto it = bo.options.find(name);
  return it != bo.options.end() && it->second && it->second->count() > 0;
}

void refuse_foreign_default_output(const std::string& path, const std::string& option, std::string_view signature) {
  if (const auto why = why_not_replaceable(path, signature)) {
    throw InvalidArgument(option, "'" + path + "' (the default of " + option + ") " + *why +
                                      "; name the output with " + option + " (or move the file)");
  }
}

void refuse_foreign_default_outputs(const BenchOptions& bo, const std::string& csv, std::string_view csv_signature,
                                    const std::string& json_out, std::string_view json_signature) {
  if (!option_given(bo, "--csv")) refuse_foreign_default_output(csv, "--csv", csv_signature);
  if (!option_given(bo, "--json-out")) refuse_foreign_default_output(json_out, "--json-out", json_signature);
}

}  // namespace mlstm::cli
