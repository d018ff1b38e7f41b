// The on-disk OpenCL program cache (Device::program_from_text): a second Device builds nothing, corrupt and
// foreign entries are rebuilt and rewritten, MLSTM_PROGRAM_CACHE=off turns it off, and a cache that cannot be
// written never fails the run. Every test uses its own temporary directory, never the user's home.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "mlstm/devices/opencl/device.hpp"
#include "opencl_test_util.hpp"

namespace mlstm {
namespace {

namespace fs = std::filesystem;
using testing::ScopedEnv;

const std::string kSource =
    "__kernel void axpb(__global float* x) { const size_t i = get_global_id(0); x[i] = x[i] * A + B; }";
const std::string kOptions = "-DA=2.0f -DB=1.0f";
constexpr std::size_t kCount = 64;

struct TempDir {
  fs::path path;
  TempDir() {
    std::string t = (fs::temp_directory_path() / "mlstm-program-cache-XXXXXX").string();
    if (::mkdtemp(t.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path = t;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
};

opencl::DeviceInfo first_info() { return opencl::select_devices("0").front(); }

// A fresh Device (its own context and in-memory cache) using `dir` as its disk cache.
std::unique_ptr<opencl::Device> fresh_device(const fs::path& dir) {
  auto dev = std::make_unique<opencl::Device>(first_info());
  dev->set_program_cache(dir.string());
  return dev;
}

// Gets the program through the cache and runs it on 0..kCount-1: the results.
std::vector<float> run_axpb(opencl::Device& dev, const std::string& options = kOptions) {
  cl_program p = dev.program_from_text("axpb", kSource, options);
  cl_kernel k = dev.kernel(p, "axpb");
  std::vector<float> x(kCount);
  for (std::size_t i = 0; i < kCount; ++i) x[i] = static_cast<float>(i);
  opencl::Buffer buf = dev.upload(x.data(), x.size() * sizeof(float));
  cl_mem mem = buf.get();
  opencl::check(clSetKernelArg(k, 0, sizeof mem, &mem), "clSetKernelArg", dev.name());
  const std::size_t global = kCount;
  opencl::check(clEnqueueNDRangeKernel(dev.queue(), k, 1, nullptr, &global, nullptr, 0, nullptr, nullptr), "axpb",
                dev.name());
  dev.download(buf, x.data(), x.size() * sizeof(float));
  clReleaseKernel(k);
  return x;
}

std::vector<float> expected_axpb() {
  std::vector<float> y(kCount);
  for (std::size_t i = 0; i < kCount; ++i) y[i] = static_cast<float>(i) * 2.0f + 1.0f;
  return y;
}

std::vector<fs::path> entries(const fs::path& dir) {
  std::vector<fs::path> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) out.push_back(e.path());
  return out;
}

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Writes the entry of kSource/kOptions into `dir` with a first Device; returns its path.
fs::path populate(const fs::path& dir) {
  auto dev = fresh_device(dir);
  EXPECT_EQ(run_axpb(*dev), expected_axpb());
  EXPECT_EQ(dev->builds(), 1u);
  EXPECT_EQ(dev->binary_loads(), 0u);
  const auto found = entries(dir);
  EXPECT_EQ(found.size(), 1u);
  return found.empty() ? fs::path() : found.front();
}

// A fresh Device finds the entry unusable: it builds from source, runs correctly and rewrites the entry, which
// a third Device then loads.
void expect_rebuilt_and_rewritten(const fs::path& dir) {
  auto dev = fresh_device(dir);
  EXPECT_EQ(run_axpb(*dev), expected_axpb());
  EXPECT_EQ(dev->builds(), 1u);
  EXPECT_EQ(dev->binary_loads(), 0u);
  auto again = fresh_device(dir);
  EXPECT_EQ(run_axpb(*again), expected_axpb());
  EXPECT_EQ(again->builds(), 0u) << "the rebuilt entry was not rewritten";
  EXPECT_EQ(again->binary_loads(), 1u);
}

TEST(OpenCLProgramCache, SecondDeviceBuildsNothingAndLoadsFromDisk) {
  REQUIRE_OPENCL();
  TempDir dir;
  const auto cache = dir.path / "programs";  // created on the first write
  const fs::path entry = populate(cache);
  ASSERT_FALSE(entry.empty());
  EXPECT_EQ(entry.extension(), ".clbin");
  auto second = fresh_device(cache);
  EXPECT_EQ(run_axpb(*second), expected_axpb());
  EXPECT_EQ(second->builds(), 0u);
  EXPECT_EQ(second->binary_loads(), 1u);
  // Other options are another program, another entry.
  std::vector<float> want(kCount);
  for (std::size_t i = 0; i < kCount; ++i) want[i] = static_cast<float>(i) * 3.0f + 1.0f;
  EXPECT_EQ(run_axpb(*second, "-DA=3.0f -DB=1.0f"), want);
  EXPECT_EQ(second->builds(), 1u);
  EXPECT_EQ(entries(cache).size(), 2u);
  // Other source text is another entry too.
  second->program_from_text("axpb", kSource + "\n", kOptions);
  EXPECT_EQ(second->builds(), 2u);
  EXPECT_EQ(entries(cache).size(), 3u);
}

TEST(OpenCLProgramCache, ConcurrentWritersOfOneEntryLeaveAUsableEntry) {
  REQUIRE_OPENCL();
  TempDir dir;
  std::vector<std::unique_ptr<opencl::Device>> devices;
  for (int i = 0; i < 3; ++i) devices.push_back(fresh_device(dir.path));
  std::vector<std::thread> threads;
  for (auto& d : devices) threads.emplace_back([&d] { EXPECT_EQ(run_axpb(*d), expected_axpb()); });
  for (auto& t : threads) t.join();
  EXPECT_EQ(entries(dir.path).size(), 1u);  // no temporary file left behind
  auto reader = fresh_device(dir.path);
  EXPECT_EQ(run_axpb(*reader), expected_axpb());
  EXPECT_EQ(reader->builds(), 0u);
}

enum class Damage { flipped_binary, truncated, wrong_magic, empty, other_format, driver_refuses };

std::string damage_name(Damage d) {
  switch (d) {
    case Damage::flipped_binary:
      return "flipped_binary";
    case Damage::truncated:
      return "truncated";
    case Damage::wrong_magic:
      return "wrong_magic";
    case Damage::empty:
      return "empty";
    case Damage::other_format:
      return "other_format";
    case Damage::driver_refuses:
      return "driver_refuses";
  }
  return "unknown";
}

void PrintTo(Damage d, std::ostream* os) { *os << damage_name(d); }

class OpenCLProgramCacheDamage : public ::testing::TestWithParam<Damage> {};

TEST_P(OpenCLProgramCacheDamage, CorruptEntryIsRebuiltAndRewritten) {
  REQUIRE_OPENCL();
  TempDir dir;
  const fs::path entry = populate(dir.path);
  ASSERT_FALSE(entry.empty());
  std::string bytes = read_bytes(entry);
  ASSERT_GT(bytes.size(), 64u);
  switch (GetParam()) {
    case Damage::flipped_binary:  // the last bytes belong to the binary
      for (std::size_t i = bytes.size() - 16; i < bytes.size(); ++i) bytes[i] = static_cast<char>(bytes[i] ^ 0x5A);
      break;
    case Damage::truncated:
      bytes.resize(bytes.size() / 2);
      break;
    case Damage::wrong_magic:
      bytes[0] = 'X';
      break;
    case Damage::empty:
      bytes.clear();
      break;
    case Damage::other_format:  // the u32 after the 8-byte magic
      bytes[8] = static_cast<char>(bytes[8] + 1);
      break;
    case Damage::driver_refuses: {  // a binary that is not one, with a matching checksum: only the driver can tell
      std::uint32_t key_bytes = 0;
      std::memcpy(&key_bytes, bytes.data() + 12, sizeof key_bytes);
      const std::size_t binary_at = 16 + key_bytes + 16;
      ASSERT_LT(binary_at, bytes.size());
      for (std::size_t i = binary_at; i < bytes.size(); ++i) bytes[i] = static_cast<char>("garbage!"[i % 8]);
      std::uint64_t h = 0xcbf29ce484222325ULL;  // FNV-1a 64, as the cache computes it
      for (std::size_t i = binary_at; i < bytes.size(); ++i) {
        h ^= static_cast<unsigned char>(bytes[i]);
        h *= 0x100000001b3ULL;
      }
      std::memcpy(bytes.data() + binary_at - 8, &h, sizeof h);
      break;
    }
  }
  write_bytes(entry, bytes);
  expect_rebuilt_and_rewritten(dir.path);
  EXPECT_EQ(entries(dir.path).size(), 1u);
}

INSTANTIATE_TEST_SUITE_P(Kinds, OpenCLProgramCacheDamage,
                         ::testing::Values(Damage::flipped_binary, Damage::truncated, Damage::wrong_magic,
                                           Damage::empty, Damage::other_format, Damage::driver_refuses),
                         [](const auto& info) { return damage_name(info.param); });

TEST(OpenCLProgramCache, ForeignEntryWithAnotherDriverIsRebuilt) {
  REQUIRE_OPENCL();
  TempDir dir;
  const fs::path entry = populate(dir.path);
  ASSERT_FALSE(entry.empty());
  // Rewrites the driver field of the stored key ("driver=<length>:<value>") with another string of the same
  // length: the entry looks like one copied from a machine with another driver.
  const std::string driver = first_info().driver;
  ASSERT_FALSE(driver.empty());
  std::string bytes = read_bytes(entry);
  const std::string field = "driver=" + std::to_string(driver.size()) + ":" + driver + "\n";
  const auto at = bytes.find(field);
  ASSERT_NE(at, std::string::npos) << "no driver field in the entry";
  for (std::size_t i = 0; i < driver.size(); ++i) {
    char& c = bytes[at + field.size() - 1 - driver.size() + i];
    c = c == 'x' ? 'y' : 'x';
  }
  write_bytes(entry, bytes);
  expect_rebuilt_and_rewritten(dir.path);
}

TEST(OpenCLProgramCache, EntryUnderAnotherKeysNameIsRebuilt) {
  REQUIRE_OPENCL();
  TempDir dir;
  const fs::path entry = populate(dir.path);
  ASSERT_FALSE(entry.empty());
  // Learns the file name of another option set, then puts the first program's (valid) entry there: as after a
  // collision of the file-name hash, the stored key differs from the one wanted.
  const std::string other = "-DA=2.0f -DB=1.0f -DUNUSED=1";
  {
    auto dev = fresh_device(dir.path);
    run_axpb(*dev, other);
  }
  fs::path other_entry;
  for (const auto& e : entries(dir.path))
    if (e != entry) other_entry = e;
  ASSERT_FALSE(other_entry.empty());
  fs::copy_file(entry, other_entry, fs::copy_options::overwrite_existing);
  auto dev = fresh_device(dir.path);
  EXPECT_EQ(run_axpb(*dev, other), expected_axpb());
  EXPECT_EQ(dev->builds(), 1u);
  EXPECT_EQ(dev->binary_loads(), 0u);
  EXPECT_NE(read_bytes(other_entry), read_bytes(entry)) << "the foreign entry was not rewritten";
}

TEST(OpenCLProgramCache, EnvironmentChoosesTheDirectoryAndOffDisablesIt) {
  REQUIRE_OPENCL();
  TempDir dir;
  {
    const ScopedEnv knob("MLSTM_PROGRAM_CACHE", nullptr);
    const ScopedEnv xdg("XDG_CACHE_HOME", "/xdg/cache");
    const ScopedEnv home("HOME", "/home/someone");
    EXPECT_EQ(opencl::default_program_cache_dir(), "/xdg/cache/mlstm-flow/programs");
    const ScopedEnv relative_xdg("XDG_CACHE_HOME", "relative");  // ignored, as the XDG spec says
    EXPECT_EQ(opencl::default_program_cache_dir(), "/home/someone/.cache/mlstm-flow/programs");
    const ScopedEnv no_xdg("XDG_CACHE_HOME", nullptr);
    EXPECT_EQ(opencl::default_program_cache_dir(), "/home/someone/.cache/mlstm-flow/programs");
    const ScopedEnv no_home("HOME", nullptr);
    EXPECT_EQ(opencl::default_program_cache_dir(), "");
  }
  {
    const ScopedEnv knob("MLSTM_PROGRAM_CACHE", dir.path.c_str());
    auto dev = std::make_unique<opencl::Device>(first_info());
    EXPECT_EQ(dev->program_cache_dir(), dir.path.string());
    EXPECT_EQ(run_axpb(*dev), expected_axpb());
    EXPECT_EQ(entries(dir.path).size(), 1u);
  }
  {
    const ScopedEnv knob("MLSTM_PROGRAM_CACHE", "off");
    const ScopedEnv xdg("XDG_CACHE_HOME", dir.path.c_str());
    EXPECT_EQ(opencl::default_program_cache_dir(), "");
    for (int i = 0; i < 2; ++i) {
      auto dev = std::make_unique<opencl::Device>(first_info());
      EXPECT_EQ(dev->program_cache_dir(), "");
      EXPECT_EQ(run_axpb(*dev), expected_axpb());
      EXPECT_EQ(dev->builds(), 1u) << "run " << i;
      EXPECT_EQ(dev->binary_loads(), 0u) << "run " << i;
    }
    EXPECT_EQ(entries(dir.path).size(), 1u);  // nothing new, not even under XDG_CACHE_HOME
  }
}

TEST(OpenCLProgramCache, UnwritableCacheIsAWarningNotAnError) {
  REQUIRE_OPENCL();
  TempDir dir;
  // A directory below a regular file cannot be created, even by root.
  write_bytes(dir.path / "file", "not a directory");
  std::vector<fs::path> unwritable = {dir.path / "file" / "programs"};
  if (::geteuid() != 0) {
    const fs::path read_only = dir.path / "read-only";
    fs::create_directories(read_only);
    fs::permissions(read_only, fs::perms::owner_read | fs::perms::owner_exec);
    unwritable.push_back(read_only);
  }
  for (const auto& cache : unwritable) {
    for (int i = 0; i < 2; ++i) {
      auto dev = fresh_device(cache);
      EXPECT_EQ(run_axpb(*dev), expected_axpb()) << cache;
      EXPECT_EQ(dev->builds(), 1u) << cache;
    }
  }
  if (unwritable.size() > 1) {
    EXPECT_TRUE(entries(unwritable[1]).empty());
    fs::permissions(unwritable[1], fs::perms::owner_all);
  }
}

}  // namespace
}  // namespace mlstm
