#include "pregated/expert_cache.h"

#include <algorithm>
#include <string>

namespace pregated {

const char* slot_state_name(slot_state s) {
  switch (s) {
    case slot_state::slot_state_empty: return "empty";
    case slot_state::slot_state_queued: return "queued";
    case slot_state::slot_state_issued: return "issued";
    case slot_state::slot_state_ready: return "ready";
  }
  return "?";
}

status expert_cache::init(int32_t num_slots, int32_t num_layers, int32_t num_experts,
                          eviction_policy policy) {
  ++version_;
  if (num_slots <= 0) return invalid_argument("the expert cache needs at least one slot");
  policy_ = policy;
  num_experts_ = num_experts;
  slots_.assign(static_cast<size_t>(num_slots), slot_info{});
  const size_t n = static_cast<size_t>(num_layers) * static_cast<size_t>(num_experts);
  slot_of_.assign(n, -1);
  freq_.assign(n, 0);
  clock_ = 0;
  return {};
}

int32_t expert_cache::find(expert_key key) const { return slot_of_[index(key)]; }

bool expert_cache::evict_before(const slot_info& a, const slot_info& b) const {
  if (policy_ == eviction_policy::eviction_policy_lfu) {
    const uint64_t fa = freq_[index(a.key)], fb = freq_[index(b.key)];
    if (fa != fb) return fa < fb;
  }
  return a.last_use < b.last_use;  // LRU, and LFU's tie-break
}

int32_t expert_cache::choose_slot(bool for_prefetch) const {
  // Ranks: 0 = a clean victim; 1 = a load in flight or an unused prefetch (demand only).
  int32_t best = -1;
  int best_rank = 2;
  for (int32_t i = 0; i < num_slots(); ++i) {
    const slot_info& s = slots_[static_cast<size_t>(i)];
    if (s.state == slot_state::slot_state_empty) return i;
    if (s.refs > 0 || s.pinned) continue;
    const bool loading = s.state != slot_state::slot_state_ready;
    const int rank = (loading || s.prefetched) ? 1 : 0;
    if (for_prefetch && rank > 0) continue;
    if (rank < best_rank || (rank == best_rank && evict_before(s, slots_[static_cast<size_t>(best)]))) {
      best = i;
      best_rank = rank;
    }
  }
  return best;
}

bool expert_cache::assign(int32_t slot, expert_key key) {
  ++version_;
  slot_info& s = slots_[static_cast<size_t>(slot)];
  const bool evicted = s.state != slot_state::slot_state_empty;
  if (evicted) slot_of_[index(s.key)] = -1;
  const uint64_t gen = s.generation + 1;
  s = slot_info{};
  s.key = key;
  s.state = slot_state::slot_state_queued;
  s.generation = gen;
  s.last_use = ++clock_;
  slot_of_[index(key)] = slot;
  return evicted;
}

void expert_cache::clear(int32_t slot) {
  ++version_;
  slot_info& s = slots_[static_cast<size_t>(slot)];
  if (s.state != slot_state::slot_state_empty) slot_of_[index(s.key)] = -1;
  const uint64_t gen = s.generation + 1;
  s = slot_info{};
  s.generation = gen;
}

void expert_cache::touch(int32_t slot) {
  slot_info& s = slots_[static_cast<size_t>(slot)];
  s.last_use = ++clock_;
  ++freq_[index(s.key)];
}

void expert_cache::refresh(int32_t slot) { slots_[static_cast<size_t>(slot)].last_use = ++clock_; }

void expert_cache::ready_table(int32_t* out) const {
  std::fill(out, out + slot_of_.size(), -1);
  for (size_t i = 0; i < slots_.size(); ++i) {
    const slot_info& s = slots_[i];
    if (s.state == slot_state::slot_state_ready) out[index(s.key)] = static_cast<int32_t>(i);
  }
}

bool expert_cache::layer_resident(int32_t layer) const {
  for (int32_t e = 0; e < num_experts_; ++e) {
    const int32_t slot = slot_of_[index({layer, e})];
    if (slot < 0) return false;
    const slot_info& s = slots_[static_cast<size_t>(slot)];
    if (s.state != slot_state::slot_state_ready || !s.pinned) return false;
  }
  return true;
}

int32_t expert_cache::pinned_count() const {
  int32_t n = 0;
  for (const slot_info& s : slots_) n += s.pinned ? 1 : 0;
  return n;
}

}  // namespace pregated
