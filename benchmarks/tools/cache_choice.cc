// What a slot choice costs the expert cache: nanoseconds per expert access (a hit: find and
// touch; a miss: choose a victim, bind the expert, touch it) with random experts, against the
// number of slots. Qwen3-30B-A3B's routing (48 layers x 128 experts) at half its experts in
// slots is 3072 slots.
//
//   g++ -O2 -std=c++17 -I csrc/include benchmarks/tools/cache_choice.cc csrc/core/expert_cache.cc \
//       csrc/core/types.cc -o /tmp/cache_choice
//   /tmp/cache_choice [layers 48] [experts 128] [fraction 0.5] [lfu 0|1]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>

#include "pregated/expert_cache.h"

using namespace pregated;

int main(int argc, char** argv) {
  const int layers = argc > 1 ? std::atoi(argv[1]) : 48, experts = argc > 2 ? std::atoi(argv[2]) : 128;
  const double fraction = argc > 3 ? std::atof(argv[3]) : 0.5;
  const bool lfu = argc > 4 && std::atoi(argv[4]) != 0;
  const int slots = static_cast<int>(layers * experts * fraction);
  expert_cache c;
  if (!c.init(slots, layers, experts, lfu ? eviction_policy::eviction_policy_lfu : eviction_policy::eviction_policy_lru)) {
    std::fprintf(stderr, "cache_choice: need at least one slot\n");
    return 2;
  }
  auto access = [&](expert_key key) {
    int32_t s = c.find(key);
    if (s >= 0) {
      c.touch(s);
      return false;
    }
    s = c.choose_slot(false);
    c.assign(s, key);
    c.set_state(s, slot_state::slot_state_ready);
    c.touch(s);
    return true;
  };
  for (int i = 0; i < slots; ++i) access({i / experts, i % experts});
  std::mt19937 rng(1);
  const int n = 200000;
  int misses = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < n; ++i) {
    misses += access({static_cast<int32_t>(rng() % layers), static_cast<int32_t>(rng() % experts)});
  }
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%d slots, %s: %.0f ns per access, %d misses of %d\n", slots, lfu ? "lfu" : "lru", dt / n * 1e9,
              misses, n);
  return 0;
}
