#include "program_cache.hpp"

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string_view>
#include <system_error>

#include "mlstm/core/atomic_file.hpp"
#include "mlstm/core/error.hpp"

namespace mlstm::opencl::detail {

namespace {

constexpr char kMagic[8] = {'M', 'L', 'S', 'T', 'M', 'C', 'L', 'B'};

void field(std::string& out, const char* name, const std::string& value) {
  out += name;
  out += '=';
  out += std::to_string(value.size());
  out += ':';
  out += value;
  out += '\n';
}

template <class T>
void put(std::string& out, T value) {
  out.append(reinterpret_cast<const char*>(&value), sizeof value);
}

// Reads a T at `pos` of `bytes`, advancing `pos`; false when the bytes end first.
template <class T>
bool take(const std::string& bytes, std::size_t& pos, T& value) {
  if (bytes.size() - pos < sizeof value) return false;
  std::memcpy(&value, bytes.data() + pos, sizeof value);
  pos += sizeof value;
  return true;
}

}  // namespace

std::uint64_t fnv1a64(const void* data, std::size_t bytes) noexcept {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < bytes; ++i) {
    h ^= p[i];
    h *= 0x100000001b3ULL;
  }
  return h;
}

std::string ProgramKey::text() const {
  std::string t;
  field(t, "format", std::to_string(kProgramCacheFormat));
  char hash[17];
  std::snprintf(hash, sizeof hash, "%016llx", static_cast<unsigned long long>(source_hash));
  field(t, "source_fnv1a64", hash);
  field(t, "source_bytes", std::to_string(source_bytes));
  field(t, "options", options);
  field(t, "device", device);
  field(t, "vendor", vendor);
  field(t, "device_version", device_version);
  field(t, "driver", driver);
  field(t, "platform", platform);
  field(t, "platform_version", platform_version);
  return t;
}

std::string ProgramKey::file_name() const {
  const std::string t = text();
  char name[32];
  std::snprintf(name, sizeof name, "%016llx.clbin", static_cast<unsigned long long>(fnv1a64(t.data(), t.size())));
  return name;
}

std::optional<std::vector<unsigned char>> read_program_entry(const std::string& path, const ProgramKey& key,
                                                             std::string& why) {
  why.clear();
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return std::nullopt;
  std::ifstream in(path, std::ios::binary);
  if (!in.is_open()) {
    why = "cannot be opened";
    return std::nullopt;
  }
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::size_t pos = 0;
  char magic[sizeof kMagic];
  if (!take(bytes, pos, magic) || std::memcmp(magic, kMagic, sizeof kMagic) != 0) {
    why = "not a program cache entry (bad magic)";
    return std::nullopt;
  }
  std::uint32_t format = 0, key_bytes = 0;
  if (!take(bytes, pos, format) || format != kProgramCacheFormat) {
    why = "of another format version";
    return std::nullopt;
  }
  const std::string want = key.text();
  if (!take(bytes, pos, key_bytes) || bytes.size() - pos < key_bytes) {
    why = "truncated (key)";
    return std::nullopt;
  }
  if (std::string_view(bytes).substr(pos, key_bytes) != want) {
    why = "for another source, build options, device or driver (key mismatch)";
    return std::nullopt;
  }
  pos += key_bytes;
  std::uint64_t binary_bytes = 0, checksum = 0;
  if (!take(bytes, pos, binary_bytes) || !take(bytes, pos, checksum)) {
    why = "truncated (header)";
    return std::nullopt;
  }
  if (binary_bytes == 0 || bytes.size() - pos != binary_bytes) {
    why = "truncated or padded (binary length " + std::to_string(binary_bytes) + ", " +
          std::to_string(bytes.size() - pos) + " bytes present)";
    return std::nullopt;
  }
  if (fnv1a64(bytes.data() + pos, binary_bytes) != checksum) {
    why = "corrupt (checksum mismatch)";
    return std::nullopt;
  }
  return std::vector<unsigned char>(bytes.begin() + static_cast<std::ptrdiff_t>(pos), bytes.end());
}

void write_program_entry(const std::string& path, const ProgramKey& key, const std::vector<unsigned char>& binary) {
  const std::filesystem::path dir = std::filesystem::path(path).parent_path();
  std::error_code ec;
  if (!dir.empty() && !std::filesystem::is_directory(dir, ec)) {
    std::filesystem::create_directories(dir, ec);
    if (ec) throw Error("cannot create the program cache directory '" + dir.string() + "': " + ec.message());
  }
  const std::string key_text = key.text();
  std::string header(kMagic, sizeof kMagic);
  put(header, kProgramCacheFormat);
  put(header, static_cast<std::uint32_t>(key_text.size()));
  header += key_text;
  put(header, static_cast<std::uint64_t>(binary.size()));
  put(header, fnv1a64(binary.data(), binary.size()));
  write_file_atomically(path, [&](AtomicFile& f) {
    f.write(header);
    f.write(binary.data(), binary.size());
  });
}

}  // namespace mlstm::opencl::detail
