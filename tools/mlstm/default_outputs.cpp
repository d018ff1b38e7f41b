#include "default_outputs.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include <CLI/Option.hpp>

#include "mlstm/core/error.hpp"

namespace mlstm::cli {

bool option_given(const BenchOptions& bo, const std::string& name) {
  const auto it = bo.options.find(name);
  return it != bo.options.end() && it->second && it->second->count() > 0;
}

void refuse_foreign_default_output(const std::string& path, const std::string& option, std::string_view signature) {
  const std::string name = "'" + path + "' (the default of " + option + ")";
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return;  // nothing there to lose
    throw InvalidArgument(option, "cannot inspect " + name + ": " + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) throw InvalidArgument(option, name + " exists and is not a regular file");
  std::string head(signature.size(), '\0');
  std::size_t got = 0;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw InvalidArgument(option, "cannot read " + name + ": " + std::strerror(errno));
  while (got < head.size()) {
    const ssize_t n = ::read(fd, head.data() + got, head.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += static_cast<std::size_t>(n);
  }
  ::close(fd);
  if (got < signature.size() || head != signature) {
    throw InvalidArgument(option, name + " exists and was not written by this subcommand; name the output with " +
                                      option + " (or move the file)");
  }
}

void refuse_foreign_default_outputs(const BenchOptions& bo, const std::string& csv, std::string_view csv_signature,
                                    const std::string& json_out, std::string_view json_signature) {
  if (!option_given(bo, "--csv")) refuse_foreign_default_output(csv, "--csv", csv_signature);
  if (!option_given(bo, "--json-out")) refuse_foreign_default_output(json_out, "--json-out", json_signature);
}

}  // namespace mlstm::cli
