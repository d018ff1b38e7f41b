// Whether an MPI launcher started this process, read from the environment the launchers set (Open MPI's
// OMPI_COMM_WORLD_*, PMI's PMI_*, PMIx's PMIX_RANK), so that main() knows before MPI is initialised.
#include <cstdlib>
#include <string>

#include "commands.hpp"

namespace mlstm::cli {

namespace {

int env_int(std::initializer_list<const char*> names, int fallback) {
  for (const char* name : names) {
    const char* v = std::getenv(name);
    if (v == nullptr || *v == '\0') continue;
    char* end = nullptr;
    const long x = std::strtol(v, &end, 10);
    if (end != v && *end == '\0' && x >= 0 && x < (1L << 30)) return static_cast<int>(x);
  }
  return fallback;
}

}  // namespace

bool launched_by_mpi() { return env_int({"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"}, -1) >= 0; }
int launcher_rank() { return env_int({"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"}, 0); }
int launcher_size() { return env_int({"OMPI_COMM_WORLD_SIZE", "PMI_SIZE"}, 1); }

}  // namespace mlstm::cli
