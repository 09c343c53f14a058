// The expert cache: which expert each slot of the slab holds, in which state, and which slot
// to give up when a new expert must come in. A plain data structure: the runtime locks it.
//
// Choosing a slot costs no scan over the slots: the empty slots are kept in a set (lowest
// first), and the slots that may be evicted (bound, not pinned) in eviction order (LRU: last use;
// LFU: uses, then last use). A victim is the first of that order that no forward holds, and that
// is not loading or an unused prefetch (those only for a demand load, as a last resort). So what
// a slot's order depends on (its last use, its expert's uses, whether it is pinned or bound) is
// changed through this class only (and its copy state, which the count of loads follows); its
// refs and flags may be written directly.
#pragma once

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "pregated/status.h"
#include "pregated/types.h"

namespace pregated {

enum class slot_state {
  slot_state_empty = 0,
  slot_state_queued = 1,  // a copy is waiting in the prefetch queue
  slot_state_issued = 2,  // the copy was handed to the copy engine (may still be in flight)
  slot_state_ready = 3,   // the copy has completed
};

const char* slot_state_name(slot_state s);

struct slot_info {
  expert_key key;
  slot_state state = slot_state::slot_state_empty;
  int32_t refs = 0;           // MoE forwards using the slot right now
  bool pinned = false;        // never evicted
  bool prefetched = false;    // loaded by a prefetch that its layer has not consumed yet
  bool copied_as_prefetch = false;  // its copy started as a prefetch (counted in prefetch_issued)
  bool demanded = false;      // a forward waits for this load: it goes ahead of prefetches
  bool refill = false;        // loaded after a device-path block read it in place, for later
                              // blocks: neither a prefetch nor a demand load
  uint64_t generation = 0;    // bumped whenever the slot is bound to a new load
  uint64_t last_use = 0;      // LRU clock
};

class expert_cache {
 public:
  status init(int32_t num_slots, int32_t num_layers, int32_t num_experts, eviction_policy policy);

  int32_t num_slots() const { return static_cast<int32_t>(slots_.size()); }
  eviction_policy policy() const { return policy_; }
  slot_info& slot(int32_t i) { return slots_[i]; }
  const slot_info& slot(int32_t i) const { return slots_[i]; }

  // Slot holding `key` (in any non-empty state), or -1.
  int32_t find(expert_key key) const;

  // A slot for a new load: an empty one if any, else the policy's victim among the slots that
  // may be given up (no references, not pinned). A prefetch never displaces a load in flight or
  // a prefetched expert its layer has not used yet; a demand load does, as a last resort.
  // Returns -1 when nothing can be given up.
  int32_t choose_slot(bool for_prefetch) const;

  // Bind `slot` to `key` in state queued, unpinned; what it held is evicted. Returns true on eviction.
  bool assign(int32_t slot, expert_key key);
  // Pin (never evicted) or unpin the bound `slot`.
  void set_pinned(int32_t slot, bool pinned);
  // Forget what the slot holds.
  void clear(int32_t slot);
  // Record a use of the expert in `slot` (LRU clock, LFU count).
  void touch(int32_t slot);
  // Move the slot to the recent end of the LRU clock without counting a use (a prefetch hit).
  void refresh(int32_t slot);

  uint64_t frequency(expert_key key) const { return freq_[index(key)]; }
  int32_t pinned_count() const { return pinned_; }
  // Move a bound slot's copy along (queued -> issued -> ready); what counts the loads.
  void set_state(int32_t slot, slot_state state);
  // Slots whose copy is queued or issued (not ready yet).
  int32_t loading_count() const { return loading_; }

  // Bumped whenever which expert a slot holds, or whether its copy is done, may have changed:
  // the device slot table is rebuilt when it differs from the version it was built at.
  uint64_t version() const { return version_; }
  void changed() { ++version_; }
  // The device slot table's contents: for every expert (layer-major), the slot holding it
  // ready (its copy completed), else -1.
  void ready_table(int32_t* out) const;
  // Every expert of `layer` holds a slot of its own, ready and pinned.
  bool layer_resident(int32_t layer) const;
  // What is wrong with what stands in for scans (the empty slots, the eviction order, the pinned
  // and loading counts) against the slots themselves; empty when they agree (runtime::check).
  std::string check_order() const;

 private:
  size_t index(expert_key key) const {
    return static_cast<size_t>(key.layer) * static_cast<size_t>(num_experts_) +
           static_cast<size_t>(key.expert);
  }
  // A bound, unpinned slot's place in the eviction order: (uses under LFU else 0, last use, slot).
  struct order_key {
    uint64_t uses;
    uint64_t last_use;
    int32_t slot;
    bool operator<(const order_key& o) const {
      return uses != o.uses ? uses < o.uses : last_use != o.last_use ? last_use < o.last_use : slot < o.slot;
    }
  };
  order_key key_of(int32_t slot) const;
  bool listed(const slot_info& s) const { return s.state != slot_state::slot_state_empty && !s.pinned; }
  // Empties the slot (a new generation) and forgets its binding, pin and load; whether it was bound.
  bool unbind(slot_info& s);
  // Applies `change` to the slot and moves it to its new place in the eviction order (in, out).
  template <class Change>
  void update(int32_t slot, Change change);

  eviction_policy policy_ = eviction_policy::eviction_policy_lru;
  int32_t num_experts_ = 0;
  std::vector<slot_info> slots_;
  std::vector<int32_t> slot_of_;  // expert index -> slot or -1
  std::vector<uint64_t> freq_;    // uses of each expert over the cache's life (LFU)
  uint64_t clock_ = 0;
  uint64_t version_ = 1;
  std::set<int32_t> empty_;     // empty slots
  std::set<order_key> order_;   // bound, unpinned slots, the next victim first
  int32_t pinned_ = 0;
  int32_t loading_ = 0;  // slots queued or issued
};

}  // namespace pregated
