#include <algorithm>

#include "mlstm/core/error.hpp"
#include "mlstm/kernel.hpp"

namespace mlstm {

std::string_view form_name(KernelForm f) noexcept {
  switch (f) {
    case KernelForm::chunkwise:
      return "chunkwise";
    case KernelForm::parallel:
      return "parallel";
    case KernelForm::sequence:
      return "sequence";
    case KernelForm::step:
      return "step";
  }
  return "?";
}

KernelRegistry::KernelRegistry(const KernelRegistry& other) {
  std::lock_guard lock(other.mutex_);
  sequence_ = other.sequence_;
  step_ = other.step_;
}

KernelRegistry& KernelRegistry::operator=(const KernelRegistry& other) {
  if (this != &other) {
    std::scoped_lock lock(mutex_, other.mutex_);
    sequence_ = other.sequence_;
    step_ = other.step_;
  }
  return *this;
}

void KernelRegistry::add_sequence(KernelInfo info, SequenceFactory factory) {
  std::lock_guard lock(mutex_);
  auto name = info.name;
  sequence_[name] = SeqEntry{std::move(info), std::move(factory)};
}

void KernelRegistry::add_step(KernelInfo info, StepFactory factory) {
  std::lock_guard lock(mutex_);
  auto name = info.name;
  step_[name] = StepEntry{std::move(info), std::move(factory)};
}

std::vector<KernelInfo> KernelRegistry::list() const {
  std::lock_guard lock(mutex_);
  std::vector<KernelInfo> out;
  for (const auto& [name, e] : sequence_) out.push_back(e.info);
  for (const auto& [name, e] : step_) out.push_back(e.info);
  std::sort(out.begin(), out.end(), [](const KernelInfo& a, const KernelInfo& b) { return a.name < b.name; });
  return out;
}

bool KernelRegistry::contains(const std::string& name) const {
  std::lock_guard lock(mutex_);
  return sequence_.count(name) > 0 || step_.count(name) > 0;
}

std::string KernelRegistry::known_names() const {
  std::vector<std::string> names;
  for (const auto& [name, e] : sequence_) names.push_back(name);
  for (const auto& [name, e] : step_) names.push_back(name + " (step)");
  std::sort(names.begin(), names.end());
  std::string s;
  for (const auto& n : names) s += (s.empty() ? "" : ", ") + n;
  return s;
}

std::unique_ptr<SequenceKernel> KernelRegistry::make_sequence(const std::string& name,
                                                              const KernelTarget& target) const {
  SequenceFactory factory;
  {
    std::lock_guard lock(mutex_);
    auto it = sequence_.find(name);
    if (it == sequence_.end()) {
      const char* hint = step_.count(name) ? " ('" : "";
      std::string extra = *hint ? std::string(hint) + name + "' is a step kernel)" : "";
      throw InvalidArgument("kernel",
                            "unknown sequence kernel '" + name + "'" + extra + "; known kernels: " + known_names());
    }
    factory = it->second.factory;
  }
  return factory(target);
}

std::unique_ptr<StepKernel> KernelRegistry::make_step(const std::string& name, const KernelTarget& target) const {
  StepFactory factory;
  {
    std::lock_guard lock(mutex_);
    auto it = step_.find(name);
    if (it == step_.end()) {
      std::string steps;  // the step kernels only (the sequence kernels are no answer here)
      for (const auto& [step_name, e] : step_) steps += (steps.empty() ? "" : ", ") + step_name;
      const std::string hint = sequence_.count(name) ? " ('" + name + "' is a sequence kernel)" : "";
      throw InvalidArgument("step_kernel", "unknown step kernel '" + name + "'" + hint + "; step kernels: " + steps);
    }
    factory = it->second.factory;
  }
  return factory(target);
}

}  // namespace mlstm
