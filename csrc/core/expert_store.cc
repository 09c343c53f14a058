#include "pregated/expert_store.h"

#include <cstring>
#include <string>

namespace pregated {

expert_store::~expert_store() { release(); }

status expert_store::init(backend* be, int32_t num_layers, int32_t num_experts,
                          const expert_spec& spec) {
  release();
  PREGATED_RETURN_IF_ERROR(spec.validate());
  if (num_layers <= 0 || num_experts <= 0) {
    return invalid_argument("expert store needs at least one layer and one expert, got " +
                            std::to_string(num_layers) + " layers x " +
                            std::to_string(num_experts) + " experts");
  }
  be_ = be;
  num_layers_ = num_layers;
  num_experts_ = num_experts;
  spec_ = spec;
  const size_t layer_bytes = spec.bytes() * static_cast<size_t>(num_experts);
  layers_.assign(static_cast<size_t>(num_layers), nullptr);
  for (int32_t l = 0; l < num_layers; ++l) {
    void* p = nullptr;
    status st = be->alloc_host(layer_bytes, &p);
    if (!st) {
      release();
      return {st.code(), "expert store: layer " + std::to_string(l) + " of " +
                             std::to_string(num_layers) + ": " + st.message()};
    }
    std::memset(p, 0, layer_bytes);
    layers_[static_cast<size_t>(l)] = static_cast<uint8_t*>(p);
  }
  return {};
}

void expert_store::release() {
  for (uint8_t* p : layers_) {
    if (p != nullptr) be_->free_host(p);
  }
  layers_.clear();
  num_layers_ = num_experts_ = 0;
}

int64_t expert_store::total_bytes() const {
  return static_cast<int64_t>(spec_.bytes()) * num_layers_ * num_experts_;
}

status expert_store::check_key(expert_key key) const {
  if (layers_.empty()) return {status_code::status_code_closed, "expert store is released"};
  if (key.layer < 0 || key.layer >= num_layers_) {
    return invalid_argument("layer " + std::to_string(key.layer) + " is out of range: the store has " +
                            std::to_string(num_layers_) + " MoE layers");
  }
  if (key.expert < 0 || key.expert >= num_experts_) {
    return invalid_argument("expert " + std::to_string(key.expert) +
                            " is out of range: each layer has " + std::to_string(num_experts_) +
                            " experts");
  }
  return {};
}

uint8_t* expert_store::expert(expert_key key) const {
  if (!check_key(key)) return nullptr;
  return layers_[static_cast<size_t>(key.layer)] +
         spec_.bytes() * static_cast<size_t>(key.expert);
}

status expert_store::set_part(expert_key key, int part, const void* src, size_t bytes) {
  PREGATED_RETURN_IF_ERROR(check_key(key));
  if (part < 0 || part >= spec_.num_parts()) {
    return invalid_argument("part " + std::to_string(part) + " does not exist: a " +
                            ffn_kind_name(spec_.kind) + " expert has " +
                            std::to_string(spec_.num_parts()) + " parts");
  }
  const size_t want = spec_.part_bytes(part);
  if (bytes != want) {
    return invalid_argument(std::string("part '") + spec_.part_name(part) + "' needs " +
                            std::to_string(want) + " bytes, got " + std::to_string(bytes));
  }
  std::memcpy(expert(key) + spec_.part_offset(part), src, bytes);
  return {};
}

}  // namespace pregated
