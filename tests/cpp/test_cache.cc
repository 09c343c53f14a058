// The expert cache on its own: eviction order and what may never be evicted.
#include <random>

#include "harness.h"
#include "pregated/expert_cache.h"

using namespace pregated;

namespace {

// Binds experts 0..n-1 of layer 0 to the slots and marks them ready.
void fill(expert_cache& c, int n) {
  for (int e = 0; e < n; ++e) {
    const int32_t s = c.choose_slot(false);
    c.assign(s, {0, e});
    c.set_state(s, slot_state::slot_state_ready);
  }
}

}  // namespace

TEST(cache_lru_evicts_least_recently_used) {
  expert_cache c;
  CHECK_OK(c.init(3, 1, 8, eviction_policy::eviction_policy_lru));
  fill(c, 3);                    // uses in order 0, 1, 2
  c.touch(c.find({0, 0}));       // 0 becomes the most recent: order 1, 2, 0
  CHECK(c.slot(c.choose_slot(false)).key.expert == 1);
  c.touch(c.find({0, 1}));       // order 2, 0, 1
  CHECK(c.slot(c.choose_slot(false)).key.expert == 2);
  c.assign(c.choose_slot(false), {0, 5});
  CHECK(c.find({0, 2}) == -1);
  CHECK(c.find({0, 5}) >= 0);
}

TEST(cache_lfu_evicts_least_frequently_used) {
  expert_cache c;
  CHECK_OK(c.init(3, 1, 8, eviction_policy::eviction_policy_lfu));
  fill(c, 3);
  for (int i = 0; i < 3; ++i) c.touch(c.find({0, 0}));
  for (int i = 0; i < 2; ++i) c.touch(c.find({0, 2}));
  c.touch(c.find({0, 1}));  // counts: 0 -> 3, 1 -> 1, 2 -> 2; 1 is also the most recent
  CHECK(c.slot(c.choose_slot(false)).key.expert == 1);
  c.touch(c.find({0, 1}));
  c.touch(c.find({0, 1}));  // counts: 0 -> 3, 1 -> 3, 2 -> 2
  CHECK(c.slot(c.choose_slot(false)).key.expert == 2);
  c.touch(c.find({0, 2}));  // all 3: the tie goes to the least recent, expert 0
  CHECK(c.slot(c.choose_slot(false)).key.expert == 0);
  // Counts survive eviction: expert 0 comes back with its history.
  c.assign(c.find({0, 0}), {0, 7});
  CHECK(c.frequency({0, 0}) == 3);
}

TEST(cache_never_evicts_referenced_or_pinned_slots) {
  expert_cache c;
  CHECK_OK(c.init(3, 1, 8, eviction_policy::eviction_policy_lru));
  fill(c, 3);
  c.slot(c.find({0, 0})).refs = 1;
  c.set_pinned(c.find({0, 1}), true);
  CHECK(c.pinned_count() == 1);
  for (int i = 0; i < 5; ++i) CHECK(c.slot(c.choose_slot(false)).key.expert == 2);
  c.slot(c.find({0, 2})).refs = 2;
  CHECK(c.choose_slot(false) == -1);
  CHECK(c.choose_slot(true) == -1);
}

TEST(cache_prefetch_does_not_displace_loads_or_unused_prefetches) {
  expert_cache c;
  CHECK_OK(c.init(2, 1, 8, eviction_policy::eviction_policy_lru));
  c.assign(c.choose_slot(true), {0, 0});  // queued
  const int32_t s1 = c.choose_slot(true);
  c.assign(s1, {0, 1});
  c.set_state(s1, slot_state::slot_state_ready);
  c.slot(s1).prefetched = true;
  CHECK(c.choose_slot(true) == -1);   // one loading, one unused prefetch
  CHECK(c.choose_slot(false) >= 0);   // a demand load may take one of them
  c.slot(s1).prefetched = false;
  CHECK(c.choose_slot(true) == s1);
  CHECK(c.choose_slot(false) == s1);  // demand prefers the clean victim over a load in flight
}

namespace {

// The choice by a scan over every slot (what the cache did before it kept its eviction order):
// the lowest empty slot; else, among slots no forward holds and not pinned, a clean victim
// (ready, not an unused prefetch) before a loading or prefetched one (demand loads only), the
// fewest uses first under LFU, then the least recent.
int32_t scanned_choice(const expert_cache& c, bool for_prefetch) {
  int32_t best = -1;
  int best_rank = 2;
  for (int32_t i = 0; i < c.num_slots(); ++i) {
    const slot_info& s = c.slot(i);
    if (s.state == slot_state::slot_state_empty) return i;
    if (s.refs > 0 || s.pinned) continue;
    const int rank = (s.state != slot_state::slot_state_ready || s.prefetched) ? 1 : 0;
    if (for_prefetch && rank > 0) continue;
    bool before = best < 0 || rank < best_rank;
    if (!before && rank == best_rank) {
      const slot_info& b = c.slot(best);
      const uint64_t fs = c.frequency(s.key), fb = c.frequency(b.key);
      before = c.policy() == eviction_policy::eviction_policy_lfu && fs != fb ? fs < fb : s.last_use < b.last_use;
    }
    if (before) {
      best = i;
      best_rank = rank;
    }
  }
  return best;
}

}  // namespace

TEST(cache_choice_agrees_with_a_scan_over_every_slot) {
  for (eviction_policy policy : {eviction_policy::eviction_policy_lru, eviction_policy::eviction_policy_lfu}) {
    expert_cache c;
    CHECK_OK(c.init(24, 3, 16, policy));
    std::mt19937 rng(policy == eviction_policy::eviction_policy_lru ? 7 : 8);
    int mismatches = 0;
    for (int step = 0; step < 20000; ++step) {
      const int32_t i = static_cast<int32_t>(rng() % 24);
      slot_info& s = c.slot(i);
      const bool bound = s.state != slot_state::slot_state_empty;
      switch (rng() % 9) {
        case 0:
        case 1: {  // a new expert, where the cache chooses
          const expert_key key{static_cast<int32_t>(rng() % 3), static_cast<int32_t>(rng() % 16)};
          if (c.find(key) >= 0) break;
          const int32_t slot = c.choose_slot(rng() % 2 == 0);
          if (slot >= 0) c.assign(slot, key);
          break;
        }
        case 2: if (bound) c.touch(i); break;
        case 3: if (bound) c.refresh(i); break;
        case 4: if (bound) c.set_pinned(i, !s.pinned); break;
        case 5: if (bound) s.refs = s.refs > 0 ? s.refs - 1 : static_cast<int32_t>(rng() % 2); break;
        case 6: {
          const bool ready = s.state == slot_state::slot_state_ready;
          if (bound) c.set_state(i, ready ? slot_state::slot_state_issued : slot_state::slot_state_ready);
          break;
        }
        case 7: if (bound) s.prefetched = !s.prefetched; break;
        case 8: if (bound && s.refs == 0 && rng() % 4 == 0) c.clear(i); break;
      }
      for (bool for_prefetch : {true, false}) {
        mismatches += c.choose_slot(for_prefetch) != scanned_choice(c, for_prefetch);
      }
      CHECK(c.check_order().empty());
    }
    CHECK(mismatches == 0);
  }
}

TEST(cache_check_finds_a_pin_written_past_it) {
  expert_cache c;
  CHECK_OK(c.init(3, 1, 8, eviction_policy::eviction_policy_lru));
  fill(c, 3);
  CHECK(c.check_order().empty());
  c.slot(c.find({0, 1})).pinned = true;  // not through set_pinned: the order still lists it
  CHECK(!c.check_order().empty());
}
