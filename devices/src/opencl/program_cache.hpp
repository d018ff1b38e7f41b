// The on-disk cache of compiled OpenCL programs: entry files holding a program's binary
// (CL_PROGRAM_BINARIES) with the key it was built for. Device::program_from_text is the only user: it looks up
// its in-memory cache, then an entry here, and builds from source only when both miss. Not installed.
//
// Entry file "<16 hex digits>.clbin" (the digits: FNV-1a 64 of the key text), native byte order:
//   8 bytes  magic "MLSTMCLB"
//   u32      format version (kProgramCacheFormat)
//   u32      key text length, then the key text (ProgramKey::text(): one "name=<length>:<value>" line per field)
//   u64      binary length
//   u64      FNV-1a 64 of the binary
//   the binary
// An entry is used only when every field matches what the running process expects (key text byte for byte,
// binary length equal to the rest of the file, checksum); anything else is reported as the reason and the
// program is rebuilt from source.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace mlstm::opencl::detail {

// Bump when the entry layout or the key's fields change: older entries then stop matching.
inline constexpr std::uint32_t kProgramCacheFormat = 1;

std::uint64_t fnv1a64(const void* data, std::size_t bytes) noexcept;

// Everything that can change the compiled program: the full source (by hash and length), the build options,
// the device and its driver, the platform.
struct ProgramKey {
  std::uint64_t source_hash = 0, source_bytes = 0;
  std::string options, device, vendor, device_version, driver, platform, platform_version;

  std::string text() const;       // the key as stored in an entry (the format version included)
  std::string file_name() const;  // "<FNV-1a 64 of text() in hex>.clbin"
};

// The binary of the entry at `path` for `key`. nullopt when there is none usable: `why` is then empty when the
// file does not exist, else the reason it was refused (cannot be read, bad magic, other format, other key,
// truncated, checksum mismatch).
std::optional<std::vector<unsigned char>> read_program_entry(const std::string& path, const ProgramKey& key,
                                                             std::string& why);

// Writes the entry atomically (temporary file, fsync, rename), creating the directory if needed; concurrent
// writers of the same entry each rename a complete file. Throws mlstm::Error naming the path on failure.
void write_program_entry(const std::string& path, const ProgramKey& key, const std::vector<unsigned char>& binary);

}  // namespace mlstm::opencl::detail
