// The expert cache on its own: eviction order and what may never be evicted.
#include "harness.h"
#include "pregated/expert_cache.h"

using namespace pregated;

namespace {

// Binds experts 0..n-1 of layer 0 to the slots and marks them ready.
void fill(expert_cache& c, int n) {
  for (int e = 0; e < n; ++e) {
    const int32_t s = c.choose_slot(false);
    c.assign(s, {0, e});
    c.slot(s).state = slot_state::slot_state_ready;
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
  c.slot(c.find({0, 1})).pinned = true;
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
  c.slot(s1).state = slot_state::slot_state_ready;
  c.slot(s1).prefetched = true;
  CHECK(c.choose_slot(true) == -1);   // one loading, one unused prefetch
  CHECK(c.choose_slot(false) >= 0);   // a demand load may take one of them
  c.slot(s1).prefetched = false;
  CHECK(c.choose_slot(true) == s1);
  CHECK(c.choose_slot(false) == s1);  // demand prefers the clean victim over a load in flight
}
