// Policy hybrid: the planner's decisions against its cost model, forced plans against the
// plain-loop reference, and the hot set following the traffic.
#include <algorithm>
#include <memory>
#include <random>

#include "harness.h"
#include "reference.h"

using namespace pregated;

namespace {

std::unique_ptr<runtime> make_hybrid(const pgref::toy_model& m, int64_t slots, const host_lane_config& hc,
                                     int64_t copy_delay_us = -1) {
  runtime_config cfg;
  cfg.num_layers = m.layers;
  cfg.num_experts = m.experts;
  cfg.spec = m.spec;
  cfg.expert_memory = slots * static_cast<int64_t>(m.spec.bytes());
  cfg.host_lane = hc;
  cfg.host_lane.enabled = true;
  cpu_backend_options opts;
  opts.copy_delay_us = copy_delay_us;
  std::unique_ptr<runtime> rt;
  CHECK_OK(runtime::create(make_cpu_backend(opts), cfg, &rt));
  if (rt) CHECK_OK(pgref::fill_store(*rt, m));
  return rt;
}

// One block of T tokens, each routed to `experts` (the same K for every token).
status block(runtime& rt, const pgref::toy_model& m, int32_t layer, int64_t T,
             const std::vector<int32_t>& experts, float* err) {
  const int64_t K = static_cast<int64_t>(experts.size());
  std::mt19937 rng(static_cast<uint32_t>(layer * 131 + T));
  std::normal_distribution<float> nd;
  std::vector<float> x(static_cast<size_t>(T * m.spec.hidden)), out(x.size()), w;
  std::vector<int32_t> ids;
  for (float& v : x) v = nd(rng);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      ids.push_back(experts[static_cast<size_t>(k)]);
      w.push_back(0.2f + 0.3f * static_cast<float>(k));
    }
  }
  status st = rt.moe_forward(pgref::block_args(layer, x, out, ids, w, T, K));
  *err = pgref::max_abs_diff(out, pgref::reference_forward(m, layer, x, ids, w, T, K));
  return st;
}

}  // namespace

TEST(planner_sends_cold_experts_to_the_host_over_a_slow_link) {
  lane_costs c;
  c.link_bytes_per_s = 1e9;   // 1 ms per MB copied
  c.host_bytes_per_s = 10e9;  // 0.1 ms per MB at one row
  c.host_row_s = 1e-5;
  const auto lanes = plan_lanes(c, lane_plan::lane_plan_auto, 1000000, 0.0, {1, 1, 1});
  CHECK(std::count(lanes.begin(), lanes.end(), lane::lane_host) == 3);
}

TEST(planner_copies_over_a_fast_link) {
  lane_costs c;
  c.link_bytes_per_s = 100e9;
  c.host_bytes_per_s = 1e9;
  c.host_row_s = 1e-4;
  const auto lanes = plan_lanes(c, lane_plan::lane_plan_auto, 1000000, 0.0, {1, 4, 2});
  CHECK(std::count(lanes.begin(), lanes.end(), lane::lane_copy) == 3);
}

TEST(planner_balances_the_two_lanes) {
  lane_costs c;  // a copy and a one-row host computation both take 1 ms
  c.link_bytes_per_s = 1e9;
  c.host_bytes_per_s = 1e9;
  c.host_row_s = 1e-3;  // each further row: 1 ms more on the host
  // Four experts of one row: two each way finishes in 2 ms, any other split later.
  auto lanes = plan_lanes(c, lane_plan::lane_plan_auto, 1000000, 0.0, {1, 1, 1, 1});
  CHECK(std::count(lanes.begin(), lanes.end(), lane::lane_host) == 2);
  // The expert with many rows is copied (8 ms on the host), the one-row ones share the lanes.
  lanes = plan_lanes(c, lane_plan::lane_plan_auto, 1000000, 0.0, {1, 8, 1});
  CHECK(lanes[1] == lane::lane_copy);
  CHECK(std::count(lanes.begin(), lanes.end(), lane::lane_host) == 1);
  // A link already 5 ms behind: everything goes to the host.
  lanes = plan_lanes(c, lane_plan::lane_plan_auto, 1000000, 5e-3, {1, 1, 1});
  CHECK(std::count(lanes.begin(), lanes.end(), lane::lane_host) == 3);
  // Forced plans ignore the model; nothing measured means copying.
  CHECK(plan_lanes(c, lane_plan::lane_plan_copy, 1000000, 5e-3, {1, 1})[0] == lane::lane_copy);
  CHECK(plan_lanes(c, lane_plan::lane_plan_host, 1, 0.0, {9, 9})[1] == lane::lane_host);
  const auto alt = plan_lanes(c, lane_plan::lane_plan_alternate, 1, 0.0, {1, 1, 1});
  CHECK(alt[0] == lane::lane_copy && alt[1] == lane::lane_host && alt[2] == lane::lane_copy);
  CHECK(plan_lanes(lane_costs{}, lane_plan::lane_plan_auto, 1000000, 0.0, {1})[0] == lane::lane_copy);
}

TEST(hybrid_forced_plans_match_the_reference) {
  const pgref::toy_model m = pgref::make_model(3, 8, 24, 20, ffn_kind::ffn_kind_gated_silu, 5);
  for (lane_plan plan : {lane_plan::lane_plan_host, lane_plan::lane_plan_copy, lane_plan::lane_plan_alternate,
                         lane_plan::lane_plan_auto}) {
    for (int64_t delay : {-1, 200}) {
      host_lane_config hc;
      hc.plan = plan;
      hc.threads = 2;
      auto rt = make_hybrid(m, 3, hc, delay);
      if (!rt) return;
      std::mt19937 rng(3);
      for (int step = 0; step < 12; ++step) {
        for (int32_t layer = 0; layer < 3; ++layer) {
          std::vector<int32_t> all = {0, 1, 2, 3, 4, 5, 6, 7};
          std::shuffle(all.begin(), all.end(), rng);
          const int64_t K = 1 + static_cast<int64_t>(rng() % 3);
          float err = 1;
          CHECK_OK(block(*rt, m, layer, 1 + static_cast<int64_t>(rng() % 5), {all.begin(), all.begin() + K}, &err));
          CHECK(err < 1e-4f);
        }
      }
      CHECK_OK(rt->check(nullptr));
      const runtime_stats s = rt->stats();
      if (plan == lane_plan::lane_plan_host) CHECK(s.total.expert_misses == 0 && s.total.host_experts > 0);
      if (plan == lane_plan::lane_plan_copy) CHECK(s.total.host_experts == 0);
      if (plan == lane_plan::lane_plan_alternate) CHECK(s.total.host_experts > 0 && s.total.expert_misses > 0);
      CHECK(s.total.host_bytes == s.total.host_experts * static_cast<int64_t>(m.spec.bytes()));
      // More experts than slots: what no slot can take runs on the host lane, in one pass.
      float err = 1;
      CHECK_OK(block(*rt, m, 1, 3, {7, 6, 5, 4, 3}, &err));
      CHECK(err < 1e-4f);
      CHECK(s.costs.link_bytes_per_s > 0);
      for (const slot_snapshot& sl : rt->slots()) CHECK(sl.refs == 0);
    }
  }
}

TEST(hybrid_quantized_experts_on_the_host_lane) {
  pgref::toy_model m = pgref::make_model(2, 6, 64, 48, ffn_kind::ffn_kind_gated_silu, 9);
  // The same model with int4 experts in the store: host and device lanes read the same bytes.
  host_lane_config hc;
  hc.plan = lane_plan::lane_plan_alternate;
  runtime_config cfg;
  cfg.num_layers = m.layers;
  cfg.num_experts = m.experts;
  cfg.spec = m.spec;
  cfg.spec.format = weight_format::weight_format_int4;
  cfg.spec.group_size = 32;
  cfg.expert_memory = 2 * static_cast<int64_t>(cfg.spec.bytes());
  cfg.host_lane = hc;
  cfg.host_lane.enabled = true;
  std::unique_ptr<runtime> hybrid, copy;
  CHECK_OK(runtime::create(make_cpu_backend(), cfg, &hybrid));
  cfg.host_lane.enabled = false;
  CHECK_OK(runtime::create(make_cpu_backend(), cfg, &copy));
  if (!hybrid || !copy) return;
  std::mt19937 rng(1);
  for (runtime* rt : {hybrid.get(), copy.get()}) {
    std::mt19937 fill(4);
    std::uniform_int_distribution<int> code(0, 255);
    for (int32_t l = 0; l < 2; ++l) {
      for (int32_t e = 0; e < 6; ++e) {
        uint8_t* blk = rt->store().expert({l, e});
        for (size_t i = 0; i < cfg.spec.bytes(); ++i) blk[i] = static_cast<uint8_t>(code(fill));
        // scales and zeros as small fp16 values (0x2c00 = 0.0625), so outputs stay finite
        for (int w = 0; w < 2; ++w) {
          const quantized_matrix q = quantized_part(cfg.spec, blk, w == 0 ? 0 : cfg.spec.down_part());
          for (int64_t i = 0; i < q.groups * (w == 0 ? 2 * 48 : 64); ++i) {
            const_cast<uint16_t*>(q.scales)[i] = 0x2c00;
            const_cast<uint16_t*>(q.zeros)[i] = 0x4400;
          }
        }
      }
    }
  }
  for (int step = 0; step < 6; ++step) {
    const int64_t T = 1 + static_cast<int64_t>(rng() % 3);
    std::vector<float> x(static_cast<size_t>(T * 64)), a(x.size()), b(x.size()), w;
    std::vector<int32_t> ids;
    std::normal_distribution<float> nd;
    for (float& v : x) v = nd(rng);
    for (int64_t t = 0; t < T; ++t) {
      for (int32_t k = 0; k < 3; ++k) {
        ids.push_back((static_cast<int32_t>(step) + k * 2) % 6);
        w.push_back(0.5f);
      }
    }
    const int32_t layer = step % 2;
    CHECK_OK(hybrid->moe_forward(pgref::block_args(layer, x, a, ids, w, T, 3)));
    CHECK_OK(copy->moe_forward(pgref::block_args(layer, x, b, ids, w, T, 3)));
    CHECK(pgref::max_abs_diff(a, b) == 0.0f);  // the same kernels on the same bytes
  }
  CHECK(hybrid->stats().total.host_experts > 0);
  CHECK_OK(hybrid->check(nullptr));
}

TEST(hot_expert_becomes_resident_and_leaves_when_its_traffic_stops) {
  const pgref::toy_model m = pgref::make_model(2, 6, 24, 20, ffn_kind::ffn_kind_gated_silu, 6);
  host_lane_config hc;
  hc.plan = lane_plan::lane_plan_host;  // misses never copy: only the hot set loads experts
  hc.hot_slots = 1;
  hc.hot_decay = 0.5;
  hc.rebalance_every = 1;
  auto rt = make_hybrid(m, 3, hc);
  if (!rt) return;
  auto hot_key = [&]() {
    expert_key k{-1, -1};
    int hot = 0;
    for (const slot_snapshot& s : rt->slots()) {
      if (s.hot) {
        k = s.key;
        ++hot;
        CHECK(s.pinned);
      }
    }
    CHECK(hot <= 1);
    return k;
  };
  float err = 1;
  for (int i = 0; i < 4; ++i) CHECK_OK(block(*rt, m, 1, 2, {3, 1}, &err));
  CHECK_OK(rt->wait_idle());
  CHECK(hot_key().layer == 1 && (hot_key().expert == 3 || hot_key().expert == 1));
  // Expert 3 goes on being routed, with a new partner each time: it alone stays hot.
  for (int i = 0; i < 4; ++i) CHECK_OK(block(*rt, m, 1, 2, {3, static_cast<int32_t>(i % 2 ? 0 : 4)}, &err));
  CHECK_OK(rt->wait_idle());
  CHECK(hot_key().expert == 3);
  const int64_t host_before = rt->stats().total.host_experts;
  CHECK_OK(block(*rt, m, 1, 1, {3}, &err));
  CHECK(err < 1e-4f);
  CHECK(rt->stats().total.host_experts == host_before);  // computed from its slot now
  // Traffic moves to expert 5: 3 leaves the hot set and its pin goes.
  for (int i = 0; i < 6; ++i) CHECK_OK(block(*rt, m, 1, 2, {5}, &err));
  CHECK_OK(rt->wait_idle());
  CHECK(hot_key().expert == 5);
  for (const slot_snapshot& s : rt->slots()) {
    if (s.key.layer == 1 && s.key.expert == 3 && s.state != slot_state::slot_state_empty) CHECK(!s.pinned);
  }
  CHECK(rt->stats().hot_experts == 1);
  CHECK_OK(rt->check(nullptr));
  // A new configuration drops the hot set and its pins.
  host_lane_config off;
  CHECK_OK(rt->set_host_lane(off));
  for (const slot_snapshot& s : rt->slots()) CHECK(!s.pinned && !s.hot);
  CHECK_OK(block(*rt, m, 0, 2, {1, 2}, &err));
  CHECK(err < 1e-4f && rt->stats().hot_experts == 0);
}

TEST(host_lane_configuration_is_checked) {
  const pgref::toy_model m = pgref::make_model(1, 4, 16, 12, ffn_kind::ffn_kind_gated_silu, 2);
  runtime_config cfg;
  cfg.num_layers = 1;
  cfg.num_experts = 4;
  cfg.spec = m.spec;
  cfg.expert_memory = 2 * static_cast<int64_t>(m.spec.bytes());
  cfg.host_lane.enabled = true;
  cfg.host_lane.hot_slots = 2;  // both slots: nothing left for copies
  std::unique_ptr<runtime> rt;
  CHECK_ERR(runtime::create(make_cpu_backend(), cfg, &rt), "hot_slots 2 must be in [0, 1]");
  cfg.host_lane.hot_slots = 1;
  cfg.host_lane.hot_decay = 0;
  CHECK_ERR(runtime::create(make_cpu_backend(), cfg, &rt), "hot_decay must be in (0, 1]");
  cfg.host_lane.hot_decay = 0.9;
  cfg.host_lane.costs.link_bytes_per_s = -1;
  CHECK_ERR(runtime::create(make_cpu_backend(), cfg, &rt), "costs must be >= 0");
}

TEST(link_figure_follows_the_copies_it_observes) {
  // Asynchronous copies that each take at least 2 ms: whatever was measured at start, the
  // figure the planner uses moves towards the copies' own rate.
  const pgref::toy_model m = pgref::make_model(2, 6, 24, 20, ffn_kind::ffn_kind_gated_silu, 8);
  host_lane_config hc;
  hc.plan = lane_plan::lane_plan_copy;
  auto rt = make_hybrid(m, 2, hc, /*copy_delay_us=*/2000);
  if (!rt) return;
  const double slow = static_cast<double>(m.spec.bytes()) / 2e-3;  // bytes/s of a 2 ms copy
  const double at_start = rt->stats().costs.link_bytes_per_s;  // the best of three copies
  CHECK(at_start > 0 && at_start < 1.5 * slow);
  float err = 1;
  for (int i = 0; i < 20; ++i) CHECK_OK(block(*rt, m, i % 2, 1, {i % 6}, &err));
  CHECK_OK(rt->wait_idle());
  CHECK_OK(block(*rt, m, 0, 1, {5}, &err));  // folds the last copies in
  const double link = rt->stats().costs.link_bytes_per_s;
  // Observed copies are never faster than the best of the three at start, and each one moved
  // the figure a fifth of the way towards itself.
  CHECK(link > 0.3 * slow && link < 1.5 * slow);
  CHECK(link != at_start);
  // A figure given by the caller stays as given.
  hc.costs.link_bytes_per_s = 1e12;
  CHECK_OK(rt->set_host_lane([&] { host_lane_config c = hc; c.enabled = true; return c; }()));
  for (int i = 0; i < 6; ++i) CHECK_OK(block(*rt, m, i % 2, 1, {(i + 3) % 6}, &err));
  CHECK(rt->stats().costs.link_bytes_per_s == 1e12);
  CHECK_OK(rt->check(nullptr));
}
