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
  empty_.clear();
  for (int32_t i = 0; i < num_slots; ++i) empty_.insert(empty_.end(), i);
  order_.clear();
  pinned_ = 0;
  loading_ = 0;
  return {};
}

int32_t expert_cache::find(expert_key key) const { return slot_of_[index(key)]; }

expert_cache::order_key expert_cache::key_of(int32_t slot) const {
  const slot_info& s = slots_[static_cast<size_t>(slot)];
  const uint64_t uses = policy_ == eviction_policy::eviction_policy_lfu ? freq_[index(s.key)] : 0;
  return {uses, s.last_use, slot};
}

template <class Change>
void expert_cache::update(int32_t slot, Change change) {
  slot_info& s = slots_[static_cast<size_t>(slot)];
  // The node moves to its new place (no allocation): touches are the common case.
  std::set<order_key>::node_type node;
  if (listed(s)) node = order_.extract(key_of(slot));
  change(s);
  if (!listed(s)) return;
  if (node.empty()) {
    order_.insert(key_of(slot));
  } else {
    node.value() = key_of(slot);
    order_.insert(std::move(node));
  }
}

int32_t expert_cache::choose_slot(bool for_prefetch) const {
  if (!empty_.empty()) return *empty_.begin();
  // The first in eviction order that no forward holds: a clean victim (ready, not an unused
  // prefetch) at once; else, for a demand load only, the first loading or prefetched one.
  int32_t fallback = -1;
  for (const order_key& k : order_) {
    const slot_info& s = slots_[static_cast<size_t>(k.slot)];
    if (s.refs > 0) continue;
    if (s.state == slot_state::slot_state_ready && !s.prefetched) return k.slot;
    if (!for_prefetch && fallback < 0) fallback = k.slot;
  }
  return fallback;
}

namespace {
bool loading(slot_state st) { return st == slot_state::slot_state_queued || st == slot_state::slot_state_issued; }
}  // namespace

bool expert_cache::unbind(slot_info& s) {
  const bool bound = s.state != slot_state::slot_state_empty;
  if (bound) slot_of_[index(s.key)] = -1;
  pinned_ -= s.pinned ? 1 : 0;
  loading_ -= loading(s.state) ? 1 : 0;
  const uint64_t gen = s.generation + 1;
  s = slot_info{};
  s.generation = gen;
  return bound;
}

bool expert_cache::assign(int32_t slot, expert_key key) {
  ++version_;
  bool evicted = false;
  update(slot, [&](slot_info& s) {
    evicted = unbind(s);
    s.key = key;
    s.state = slot_state::slot_state_queued;
    ++loading_;
    s.last_use = ++clock_;
    slot_of_[index(key)] = slot;
  });
  if (!evicted) empty_.erase(slot);
  return evicted;
}

void expert_cache::set_pinned(int32_t slot, bool pinned) {
  const slot_info& now = slots_[static_cast<size_t>(slot)];
  if (now.pinned == pinned || now.state == slot_state::slot_state_empty) return;
  update(slot, [&](slot_info& s) { s.pinned = pinned; });
  pinned_ += pinned ? 1 : -1;
}

void expert_cache::set_state(int32_t slot, slot_state state) {
  slot_info& s = slots_[static_cast<size_t>(slot)];
  if (s.state == slot_state::slot_state_empty || state == slot_state::slot_state_empty) return;  // clear() empties
  loading_ += (loading(state) ? 1 : 0) - (loading(s.state) ? 1 : 0);
  s.state = state;
}

void expert_cache::clear(int32_t slot) {
  ++version_;
  bool was_bound = false;
  update(slot, [&](slot_info& s) { was_bound = unbind(s); });
  if (was_bound) empty_.insert(slot);
}

void expert_cache::touch(int32_t slot) {
  update(slot, [&](slot_info& s) {
    s.last_use = ++clock_;
    ++freq_[index(s.key)];
  });
}

void expert_cache::refresh(int32_t slot) {
  update(slot, [&](slot_info& s) { s.last_use = ++clock_; });
}

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

std::string expert_cache::check_order() const {
  std::string problems;
  int32_t pinned = 0, loads = 0;
  size_t listed_slots = 0, empty_slots = 0;
  for (int32_t i = 0; i < num_slots(); ++i) {
    const slot_info& s = slots_[static_cast<size_t>(i)];
    const std::string who = "slot " + std::to_string(i) + ": ";
    pinned += s.pinned ? 1 : 0;
    loads += loading(s.state) ? 1 : 0;
    const bool empty = s.state == slot_state::slot_state_empty;
    empty_slots += empty ? 1 : 0;
    if (empty != (empty_.count(i) != 0)) {
      problems += who + (empty ? "empty but not" : "bound but") + " in the set of empty slots\n";
    }
    if (listed(s)) {
      ++listed_slots;
      if (order_.count(key_of(i)) == 0) {
        problems += who + "may be evicted but is not in the eviction order (or under a stale key)\n";
      }
    }
  }
  auto count = [&](const char* what, size_t kept, size_t actual) {
    if (kept != actual) {
      problems += std::string(what) + ": " + std::to_string(kept) + " kept, " + std::to_string(actual) + " found\n";
    }
  };
  count("slots in the eviction order", order_.size(), listed_slots);
  count("empty slots", empty_.size(), empty_slots);
  count("pinned slots", static_cast<size_t>(pinned_), static_cast<size_t>(pinned));
  count("slots loading", static_cast<size_t>(loading_), static_cast<size_t>(loads));
  return problems;
}

}  // namespace pregated
