// The expert store: every expert's weights in host memory, one contiguous block per
// (layer, expert), so that one copy moves one expert.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "pregated/backend.h"
#include "pregated/status.h"
#include "pregated/types.h"

namespace pregated {

class expert_store {
 public:
  expert_store() = default;
  ~expert_store();
  expert_store(const expert_store&) = delete;
  expert_store& operator=(const expert_store&) = delete;

  // Allocates num_layers blocks of num_experts experts from backend host memory (pinned on
  // CUDA). The bytes start zeroed.
  status init(backend* be, int32_t num_layers, int32_t num_experts, const expert_spec& spec);
  void release();

  int32_t num_layers() const { return num_layers_; }
  int32_t num_experts() const { return num_experts_; }
  const expert_spec& spec() const { return spec_; }
  size_t expert_bytes() const { return spec_.bytes(); }
  int64_t total_bytes() const;

  status check_key(expert_key key) const;
  // Start of one expert's block (nullptr for a bad key).
  uint8_t* expert(expert_key key) const;
  // Copy one part (see expert_spec) of one expert in; `bytes` must match the part's size.
  status set_part(expert_key key, int part, const void* src, size_t bytes);

 private:
  backend* be_ = nullptr;
  int32_t num_layers_ = 0;
  int32_t num_experts_ = 0;
  expert_spec spec_;
  std::vector<uint8_t*> layers_;  // one host allocation per layer
};

}  // namespace pregated
