// 10,000 random operations from several threads on a tiny budget (forwards on the planned and
// the device path, prefetches, evictions, pins, cancellations); afterwards every slot is
// accounted for and every cached expert matches its host copy byte for byte. Built also under
// ThreadSanitizer and AddressSanitizer in CI.
#include <algorithm>
#include <atomic>
#include <random>
#include <set>
#include <thread>

#include "harness.h"
#include "reference.h"

using namespace pregated;

namespace {

void stress(const cpu_backend_options& opts, const host_lane_config& lane = {}) {
  const pgref::toy_model m = pgref::make_model(3, 6, 16, 12, ffn_kind::ffn_kind_gated_silu, 11);
  runtime_config cfg;
  cfg.num_layers = m.layers;
  cfg.num_experts = m.experts;
  cfg.spec = m.spec;
  cfg.expert_memory = 3 * static_cast<int64_t>(m.spec.bytes());
  cfg.host_lane = lane;
  std::unique_ptr<runtime> rt;
  CHECK_OK(runtime::create(make_cpu_backend(opts), cfg, &rt));
  if (!rt) return;
  CHECK_OK(pgref::fill_store(*rt, m));

  const int threads = 4, ops_per_thread = 2500;
  std::atomic<int64_t> wrong{0}, errors{0}, forwards{0}, expert_uses{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      std::mt19937 rng(100 + t);
      std::uniform_int_distribution<int> op(0, 99), layer(0, 2), expert(0, 5);
      std::normal_distribution<float> nd;
      for (int i = 0; i < ops_per_thread; ++i) {
        const int o = op(rng);
        const int32_t l = layer(rng);
        if (o < 45) {  // a forward, some with a prefetch of the next layer, checked
          const int64_t T = 1 + rng() % 6, K = 1 + rng() % 3;
          std::vector<float> x(static_cast<size_t>(T * 16)), w, out(x.size());
          std::vector<int32_t> ids;
          for (float& v : x) v = nd(rng);
          std::set<int32_t> used;
          for (int64_t j = 0; j < T; ++j) {
            std::vector<int32_t> all = {0, 1, 2, 3, 4, 5};
            std::shuffle(all.begin(), all.end(), rng);
            for (int64_t k = 0; k < K; ++k) {
              ids.push_back(all[static_cast<size_t>(k)]);
              used.insert(all[static_cast<size_t>(k)]);
              w.push_back(0.3f + 0.1f * static_cast<float>(k));
            }
          }
          moe_args a = pgref::block_args(l, x, out, ids, w, T, K);
          int32_t next[2] = {expert(rng), expert(rng)};
          if (o < 15 && l < 2) {
            a.next_layer = l + 1;
            a.next_experts = next;
            a.num_next = 2;
          }
          status st;
          if (i % 3 == 0) {  // the device path: experts from slots or read in place, routing read behind
            resident_args d;
            d.layer = l, d.tokens = T, d.top_k = K, d.x = x.data(), d.out = out.data(), d.ids = ids.data(),
            d.weights = w.data();
            if (a.num_next > 0) d.next_layer = a.next_layer, d.next_ids = next, d.num_next = a.num_next;
            st = rt->moe_forward_device(d);
          } else {
            st = rt->moe_forward(a);
          }
          if (!st) { ++errors; continue; }
          ++forwards;
          expert_uses += static_cast<int64_t>(used.size());
          if (pgref::max_abs_diff(out, pgref::reference_forward(m, l, x, ids, w, T, K)) > 1e-4f) ++wrong;
        } else if (o < 75) {
          int32_t e[3] = {expert(rng), expert(rng), expert(rng)};
          if (!rt->prefetch(l, e, 1 + static_cast<int32_t>(rng() % 3))) ++errors;
        } else if (o < 90) {
          status st = rt->evict({l, expert(rng)});
          // Evicting a slot in use or pinned is refused; anything else is a failure.
          if (!st && st.message().find("using it") == std::string::npos &&
              st.message().find("pinned") == std::string::npos) {
            ++errors;
          }
        } else if (o < 95) {
          const expert_key key{l, expert(rng)};
          status st = rt->pin(key);
          if (!st && st.message().find("at least one slot") == std::string::npos) ++errors;
          std::this_thread::yield();
          if (!rt->unpin(key)) ++errors;
        } else {
          if (!rt->cancel_prefetches()) ++errors;
        }
      }
    });
  }
  for (std::thread& th : pool) th.join();
  CHECK(wrong.load() == 0);
  CHECK(errors.load() == 0);
  std::string report;
  CHECK_OK(rt->check(&report));
  const runtime_stats s = rt->stats();
  CHECK(s.forwards == forwards.load());
  CHECK(s.device_forwards > 0);
  // Every expert a forward used was found in a slot, loaded, or computed on the host lane.
  CHECK(s.total.expert_hits + s.total.expert_misses + s.total.host_experts == expert_uses.load());
  if (lane.enabled) CHECK(s.total.host_experts > 0);
  CHECK(s.total.prefetch_used <= s.total.prefetch_issued);
  for (const layer_stats& l : s.layers) CHECK(l.prefetch_used <= l.prefetch_issued);
  int32_t occupied = 0;
  for (const slot_snapshot& sl : rt->slots()) {
    CHECK(sl.refs == 0);
    CHECK(!sl.pinned || sl.hot);  // the hot set keeps its pins
    occupied += sl.state == slot_state::slot_state_empty ? 0 : 1;
  }
  CHECK(occupied <= rt->num_slots());
  std::printf("  %lld forwards, %lld expert uses, %lld misses, %lld on the host, %lld prefetches issued, %lld evictions\n",
              static_cast<long long>(forwards.load()), static_cast<long long>(expert_uses.load()),
              static_cast<long long>(s.total.expert_misses), static_cast<long long>(s.total.host_experts),
              static_cast<long long>(s.total.prefetch_issued), static_cast<long long>(s.evictions));
}

}  // namespace

TEST(stress_random_operations_from_several_threads) { stress({}); }

// The same with copies in flight while forwards, prefetches, evictions and pins go on: the
// waiting paths of a GPU's asynchronous copy engine, on the CPU.
TEST(stress_with_asynchronous_copies) {
  cpu_backend_options opts;
  opts.copy_delay_us = 30;
  stress(opts);
}

// Policy hybrid: a host lane computing experts concurrently with the forwards' device lanes, a
// mixed plan, the hot set pinning and unpinning as traffic moves, copies in flight.
TEST(stress_hybrid_with_host_and_device_lanes_in_flight) {
  cpu_backend_options opts;
  opts.copy_delay_us = 30;
  host_lane_config lane;
  lane.enabled = true;
  lane.threads = 2;
  lane.plan = lane_plan::lane_plan_alternate;
  lane.hot_slots = 1;
  lane.hot_decay = 0.8;
  lane.rebalance_every = 5;
  stress(opts, lane);
}
