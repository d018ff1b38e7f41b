// Output paths a subcommand writes when the user names none (bench: bench.csv / bench.json; bench --system:
// bench_system.csv / bench_system.json, in the working directory). A file already there is replaced only if an
// earlier run of the same subcommand wrote it (it begins as that subcommand's output begins); anything else is the
// user's, and the run is refused before it measures (exit 2, naming the option that would choose another path).
#pragma once

#include <string>
#include <string_view>

#include "commands.hpp"

namespace mlstm::cli {

// Whether the user gave bench's option `name` (e.g. "--csv") on the command line.
bool option_given(const BenchOptions& bo, const std::string& name);

// InvalidArgument(option) when `path` holds something bench did not write (why_not_replaceable: an empty file or
// one that begins with `signature` is replaced).
void refuse_foreign_default_output(const std::string& path, const std::string& option, std::string_view signature);
// The same for bench's --csv and --json-out, each where the user left it at its default.
void refuse_foreign_default_outputs(const BenchOptions& bo, const std::string& csv, std::string_view csv_signature,
                                    const std::string& json_out, std::string_view json_signature);

}  // namespace mlstm::cli
