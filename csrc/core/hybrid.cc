// Policy hybrid, the runtime's side: the host lane's cost model (measured, then following what
// blocks observe), the hot set (experts routed most often stay pinned) and the prefetch budget.
// The per-block choice itself is plan_lanes (lane_planner.cc); moe_forward.cc runs it.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <string>
#include <vector>

#include "runtime_impl.h"

namespace pregated {

namespace {

using steady = std::chrono::steady_clock;

double since(steady::time_point t0) { return std::chrono::duration<double>(steady::now() - t0).count(); }

}  // namespace

status host_lane_config::validate(int64_t num_slots, int64_t num_experts_total) const {
  if (!enabled) return {};
  if (static_cast<int>(plan) < 0 || static_cast<int>(plan) > static_cast<int>(lane_plan::lane_plan_alternate)) {
    return invalid_argument("host lane: unknown plan " + std::to_string(static_cast<int>(plan)));
  }
  if (costs.link_bytes_per_s < 0 || costs.host_bytes_per_s < 0 || costs.host_row_s < 0) {
    return invalid_argument("host lane: costs must be >= 0 (0 = measure)");
  }
  const int64_t most = num_slots >= num_experts_total ? num_slots : num_slots - 1;
  if (hot_slots < 0 || hot_slots > most) {
    return invalid_argument("host lane: hot_slots " + std::to_string(hot_slots) + " must be in [0, " +
                            std::to_string(most) + "]: of " + std::to_string(num_slots) +
                            " slots, at least one must stay free for copies");
  }
  if (!(hot_decay > 0 && hot_decay <= 1)) {
    return invalid_argument("host lane: hot_decay must be in (0, 1], got " + std::to_string(hot_decay));
  }
  if (rebalance_every < 1) {
    return invalid_argument("host lane: rebalance_every must be >= 1, got " + std::to_string(rebalance_every));
  }
  return {};
}

status runtime::impl::start_host_lane() {
  const host_lane_config& hc = cfg.host_lane;
  drop_hot();
  host_compute.reset();
  for (link_probe& p : link_probes) {  // the copy engine is idle: every probe has completed
    spare.push_back(std::move(p.start));
    spare.push_back(std::move(p.end));
  }
  link_probes.clear();
  costs = hc.costs;
  host_measured = false;
  block_seconds = 0;
  if (!hc.enabled) {
    costs = lane_costs{};
    return {};
  }
  const size_t n = static_cast<size_t>(cfg.num_layers) * static_cast<size_t>(cfg.num_experts);
  heat.assign(n, 0.0);
  hot.assign(n, 0);
  heat_forwards = 0;
  host_compute = std::make_unique<host_lane>(cfg.spec, hc.threads);
  host_measured = hc.costs.host_bytes_per_s > 0;
  if (costs.link_bytes_per_s > 0) return {};
  // The link: the best of three copies of one expert's bytes (their contents do not matter).
  void* dst = nullptr;
  PREGATED_RETURN_IF_ERROR(be->alloc_device(slot_bytes, &dst));
  std::unique_ptr<backend_event> ev;
  status st = be->create_event(false, &ev);
  double best = 0;
  for (int i = 0; i < 3 && st.is_ok(); ++i) {
    const auto t0 = steady::now();
    st = be->copy_to_device(dst, store.expert({0, 0}), slot_bytes, ev.get());
    if (st.is_ok()) st = be->wait_host(ev.get());
    const double s = since(t0);
    if (st.is_ok() && (best == 0 || s < best)) best = s;
  }
  be->free_device(dst);
  PREGATED_RETURN_IF_ERROR(st);
  costs.link_bytes_per_s = static_cast<double>(slot_bytes) / std::max(best, 1e-9);
  return {};
}

status runtime::impl::measure_host() {
  std::lock_guard<std::mutex> once(measure_mu);
  {
    std::lock_guard<std::mutex> lk(mu);
    if (host_measured) return {};
  }
  // One expert at 1 row (twice: the first warms caches and the pool) and at 8 rows.
  const size_t row = static_cast<size_t>(cfg.spec.hidden) * dtype_size(cfg.spec.dt);
  std::vector<uint8_t> x(8 * row, 0), y(8 * row, 0);
  double t[3] = {0, 0, 0};
  const int64_t rows[3] = {1, 1, 8};
  for (int i = 0; i < 3; ++i) {
    host_lane::job j;
    j.items.push_back({store.expert({0, 0}), x.data(), y.data(), rows[i]});
    host_compute->submit(&j);
    host_compute->wait(&j);
    PREGATED_RETURN_IF_ERROR(j.result);
    t[i] = j.seconds;
  }
  const double one = std::max(std::min(t[0], t[1]), 1e-9);
  std::lock_guard<std::mutex> lk(mu);
  costs.host_bytes_per_s = static_cast<double>(slot_bytes) / one;
  if (cfg.host_lane.costs.host_row_s <= 0) costs.host_row_s = std::max(0.0, (t[2] - one) / 7.0);
  host_measured = true;
  return {};
}

void runtime::impl::count_routing(int32_t layer, const std::vector<int32_t>& experts) {
  const host_lane_config& hc = cfg.host_lane;
  const size_t base = static_cast<size_t>(layer) * static_cast<size_t>(cfg.num_experts);
  for (int32_t e = 0; e < cfg.num_experts; ++e) heat[base + static_cast<size_t>(e)] *= hc.hot_decay;
  for (int32_t e : experts) heat[base + static_cast<size_t>(e)] += 1.0;
  if (++heat_forwards % hc.rebalance_every == 0) rebalance_hot();
}

void runtime::impl::rebalance_hot() {
  const host_lane_config& hc = cfg.host_lane;
  std::vector<size_t> order;
  for (size_t i = 0; i < heat.size(); ++i) {
    if (heat[i] >= hc.hot_min) order.push_back(i);
  }
  const size_t keep = std::min(order.size(), static_cast<size_t>(hc.hot_slots));
  std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(keep), order.end(),
                    [&](size_t a, size_t b) { return heat[a] > heat[b] || (heat[a] == heat[b] && a < b); });
  order.resize(keep);
  std::vector<uint8_t> want(heat.size(), 0);
  for (size_t i : order) want[i] = 1;
  for (size_t i = 0; i < hot.size(); ++i) {  // leaving first: their pins make room
    if (!hot[i] || want[i]) continue;
    const int32_t slot = cache.find(key_at(i));
    if (slot >= 0) cache.set_pinned(slot, false);
    hot[i] = 0;
    --hot_count;
  }
  const int32_t slots = cache.num_slots();
  const int64_t all = static_cast<int64_t>(cfg.num_layers) * cfg.num_experts;
  for (size_t i : order) {
    const expert_key key = key_at(i);
    int32_t slot = cache.find(key);
    if (slot >= 0 && cache.slot(slot).pinned) {
      if (!hot[i]) ++hot_count;
      hot[i] = 1;
      continue;
    }
    if (cache.pinned_count() + 1 >= slots && slots < all) break;  // one slot stays free for copies
    if (slot < 0) {
      slot = cache.choose_slot(/*for_prefetch=*/true);
      if (slot < 0) continue;  // every slot is busy: try at the next rebalance
      if (cache.assign(slot, key)) ++stats.evictions;
      enqueue(slot, /*demand=*/false);
    }
    cache.set_pinned(slot, true);
    if (!hot[i]) ++hot_count;
    hot[i] = 1;
  }
}

void runtime::impl::drop_hot() {
  for (size_t i = 0; i < hot.size(); ++i) {
    if (!hot[i]) continue;
    const int32_t slot = cache.find(key_at(i));
    if (slot >= 0) cache.set_pinned(slot, false);
  }
  std::fill(hot.begin(), hot.end(), 0);
  std::fill(heat.begin(), heat.end(), 0.0);
  hot_count = 0;
}

double runtime::impl::link_backlog() const {
  return static_cast<double>(cache.loading_count()) * costs.copy_seconds(static_cast<int64_t>(slot_bytes));
}

int32_t runtime::impl::prefetch_allowance(int32_t wanted) const {
  if (!host_compute) return wanted;
  switch (cfg.host_lane.plan) {
    case lane_plan::lane_plan_host:
      return 0;
    case lane_plan::lane_plan_copy:
    case lane_plan::lane_plan_alternate:
      return wanted;
    case lane_plan::lane_plan_auto:
      break;
  }
  const double copy = costs.copy_seconds(static_cast<int64_t>(slot_bytes));
  if (copy <= 0) return wanted;
  const double room = block_seconds - link_backlog();
  if (room <= 0) return 0;
  return static_cast<int32_t>(std::min<double>(wanted, std::floor(room / copy)));
}

void runtime::impl::observe_host(const host_lane::job& j, double predicted) {
  if (cfg.host_lane.costs.host_bytes_per_s > 0 || predicted <= 0 || j.seconds <= 0) return;
  // Move a fifth of the way towards what this job took, at most by a factor of two per job.
  const double r = std::clamp(j.seconds / predicted, 0.5, 2.0);
  const double step = 1.0 + 0.2 * (r - 1.0);
  costs.host_bytes_per_s /= step;
  if (cfg.host_lane.costs.host_row_s <= 0) costs.host_row_s *= step;
}

void runtime::impl::link_timers(std::unique_ptr<backend_event>* start, std::unique_ptr<backend_event>* end) {
  if (!host_compute || cfg.host_lane.costs.link_bytes_per_s > 0 || link_probes.size() >= 64) return;
  *start = take_timer();
  *end = take_timer();
  if (!*start || !*end) {
    if (*start) spare.push_back(std::move(*start));
    if (*end) spare.push_back(std::move(*end));
    start->reset();
    end->reset();
  }
}

void runtime::impl::observe_link() {
  while (!link_probes.empty() && be->query(link_probes.front().end.get())) {
    link_probe p = std::move(link_probes.front());
    link_probes.pop_front();
    double s = 0;
    if (be->elapsed_seconds(p.start.get(), p.end.get(), &s).is_ok() && s > 0 && host_compute &&
        cfg.host_lane.costs.link_bytes_per_s <= 0) {
      // A fifth of the way towards each copy's rate (copies are serial on the link, so each
      // pair of events brackets one copy's own time).
      costs.link_bytes_per_s = 0.8 * costs.link_bytes_per_s + 0.2 * static_cast<double>(slot_bytes) / s;
    }
    spare.push_back(std::move(p.start));
    spare.push_back(std::move(p.end));
  }
}

}  // namespace pregated
