// One MoE block through the expert cache.
// T = tokens, K = experts per token, R = T * K packed rows, H = hidden, I = intermediate,
// U = rows of the first weight (2I gated, I otherwise).
//
//   plan (host)  -> upload row tables -> gather x into packed rows xp [R, H]
//   for each wave of experts that fits in the slots:
//     acquire slots (hits keep theirs, misses become demand loads ahead of every prefetch)
//     per expert: wait for its copy (device-side on CUDA), act = xp W_up^T, act = f(act),
//                 y = act W_down^T
//     release slots (record their last use, so a later copy into them waits for the GEMMs)
//   combine: out[t] = sum_k w[t, k] y[row_of[t, k]]
//
// With a host lane (policy hybrid), the experts that are not in a slot are first planned:
// copied (as above) or computed on the host lane from the expert store, concurrently with the
// device lane; their output rows join y before the combine.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

#include "pregated/moe_plan.h"
#include "runtime_impl.h"

namespace pregated {

namespace {

size_t align_up(size_t n) { return (n + 255) & ~size_t{255}; }

// Frees the workspace on every path out of the forward.
struct workspace_guard {
  backend* be;
  void* ptr;
  void* stream;
  ~workspace_guard() {
    if (ptr != nullptr) be->free_workspace(ptr, stream);
  }
};

struct held_slot {
  int32_t slot;
  uint64_t generation;
  size_t plan_index;
};

using steady = std::chrono::steady_clock;

double since(steady::time_point t0) { return std::chrono::duration<double>(steady::now() - t0).count(); }

// A forward's work on the host lane: its jobs, their rows, and the host copies of the packed
// rows where the device is not the host. Every job is waited for before the forward returns.
struct host_work {
  std::deque<host_lane::job> jobs;  // a deque: the lane holds pointers to its elements
  std::vector<double> predicted;    // the cost model's seconds for each job
  std::vector<std::pair<int64_t, int64_t>> rows;  // (first packed row, rows) of each expert
  std::vector<uint8_t> x, y;        // [R, H] host copies (only where the device is not the host)
};

}  // namespace

status runtime::impl::check_experts(const int32_t* experts, int32_t n, const char* what) const {
  if (n < 0 || (n > 0 && experts == nullptr)) {
    return invalid_argument(std::string(what) + ": expert list is null or has negative length");
  }
  for (int32_t i = 0; i < n; ++i) {
    if (experts[i] < 0 || experts[i] >= cfg.num_experts) {
      return invalid_argument(std::string(what) + ": expert id " + std::to_string(experts[i]) +
                              " is out of range: each layer has " +
                              std::to_string(cfg.num_experts) + " experts");
    }
  }
  return {};
}

void runtime::impl::finish_layer(int32_t layer) {
  const bool keep = cache.policy() != eviction_policy::eviction_policy_none;
  for (int32_t e = 0; e < cfg.num_experts; ++e) {  // the layer's slots, through the cache's map
    const int32_t i = cache.find({layer, e});
    if (i < 0) continue;
    slot_info& s = cache.slot(i);
    if (s.state == slot_state::slot_state_queued) continue;
    s.prefetched = false;
    if (!keep && s.refs == 0 && !s.pinned) {
      cache.clear(i);
      ++stats.evictions;
    }
  }
}

status runtime::impl::forward(const moe_args& a) {
  PREGATED_RETURN_IF_ERROR(check_layer(a.layer, "moe_forward"));
  if (a.tokens < 0 || a.top_k < 1) {
    return invalid_argument("moe_forward: need tokens >= 0 and top_k >= 1, got tokens=" +
                            std::to_string(a.tokens) + " top_k=" + std::to_string(a.top_k));
  }
  if (a.top_k > cfg.num_experts) {
    return invalid_argument("moe_forward: top_k " + std::to_string(a.top_k) +
                            " is larger than the number of experts " +
                            std::to_string(cfg.num_experts));
  }
  if (a.num_next > 0) {
    PREGATED_RETURN_IF_ERROR(check_layer(a.next_layer, "moe_forward next_layer"));
    PREGATED_RETURN_IF_ERROR(check_experts(a.next_experts, a.num_next, "moe_forward next_experts"));
  }
  if (a.tokens == 0) return {};
  if (a.x == nullptr || a.out == nullptr || a.ids == nullptr || a.weights == nullptr) {
    return invalid_argument("moe_forward: x, out, ids and weights must all be given");
  }
  moe_plan plan;
  PREGATED_RETURN_IF_ERROR(make_moe_plan(a.ids, a.tokens, a.top_k, cfg.num_experts, &plan));
  if (host_compute && !host_measured && cfg.host_lane.plan == lane_plan::lane_plan_auto) {
    PREGATED_RETURN_IF_ERROR(measure_host());
  }
  const steady::time_point started = steady::now();

  const expert_spec& sp = cfg.spec;
  const dtype dt = sp.dt;
  const size_t esz = dtype_size(dt);
  const int64_t H = sp.hidden, U = sp.up_rows();
  const int64_t R = a.tokens * a.top_k;
  const size_t xp_bytes = align_up(static_cast<size_t>(R * H) * esz);
  const size_t act_bytes = align_up(static_cast<size_t>(R * U) * esz);
  const size_t meta_bytes = static_cast<size_t>(R) * 3 * 4;

  void* ws = nullptr;
  PREGATED_RETURN_IF_ERROR(
      be->alloc_workspace(2 * xp_bytes + act_bytes + meta_bytes, a.stream, &ws));
  workspace_guard guard{be.get(), ws, a.stream};
  uint8_t* xp = static_cast<uint8_t*>(ws);
  uint8_t* act = xp + xp_bytes;
  uint8_t* y = act + act_bytes;
  uint8_t* meta = y + xp_bytes;
  const int32_t* row_token_dev = reinterpret_cast<const int32_t*>(meta);
  const int32_t* row_of_dev = row_token_dev + R;
  const float* weights_dev = reinterpret_cast<const float*>(row_of_dev + R);
  {
    std::vector<int32_t> host(static_cast<size_t>(R) * 3);
    std::copy(plan.row_token.begin(), plan.row_token.end(), host.begin());
    std::copy(plan.row_of.begin(), plan.row_of.end(), host.begin() + R);
    std::memcpy(host.data() + 2 * R, a.weights, static_cast<size_t>(R) * 4);
    PREGATED_RETURN_IF_ERROR(be->upload(meta, host.data(), meta_bytes, a.stream));
  }
  PREGATED_RETURN_IF_ERROR(be->gather_rows(dt, xp, a.x, row_token_dev, R, H, a.stream));

  // The host lane's share: experts computed from the expert store instead of being copied.
  std::vector<char> on_host(plan.experts.size(), 0);
  host_work hw;
  layer_stats* ls = &stats.layers[static_cast<size_t>(a.layer)];  // resize() cannot run meanwhile
  auto send_to_host = [&](const std::vector<size_t>& which) -> status {
    if (which.empty()) return {};
    const size_t row_bytes = static_cast<size_t>(H) * esz;
    const uint8_t* xs = xp;
    uint8_t* ys = y;
    if (!caps.device_is_host) {
      if (hw.x.empty()) {  // the packed rows, once per forward, after the gather
        hw.x.resize(static_cast<size_t>(R) * row_bytes);
        hw.y.resize(hw.x.size());
        PREGATED_RETURN_IF_ERROR(be->synchronize(a.stream));
        PREGATED_RETURN_IF_ERROR(be->download_sync(hw.x.data(), xp, hw.x.size()));
      }
      xs = hw.x.data();
      ys = hw.y.data();
    }
    host_lane::job& j = hw.jobs.emplace_back();
    double predicted = 0;
    for (size_t i : which) {
      const int64_t r0 = plan.offsets[i], n = plan.offsets[i + 1] - r0;
      j.items.push_back({store.expert({a.layer, plan.experts[i]}), xs + static_cast<size_t>(r0) * row_bytes,
                         ys + static_cast<size_t>(r0) * row_bytes, n});
      hw.rows.emplace_back(r0, n);
      predicted += costs.host_seconds(static_cast<int64_t>(slot_bytes), n);
    }
    hw.predicted.push_back(predicted);
    {
      std::lock_guard<std::mutex> lk(mu);
      ls->host_experts += static_cast<int64_t>(which.size());
      ls->host_bytes += static_cast<int64_t>(which.size() * slot_bytes);
    }
    host_compute->submit(&j);
    return {};
  };

  std::vector<size_t> to_host;
  {
    std::lock_guard<std::mutex> lk(mu);
    if (!failure.is_ok()) return failure;
    // Prefetches for this layer that have not started and that routing did not pick are no
    // longer wanted (one whose copy has started stays queued until the copy is issued: it is
    // counted as issued and left alone).
    drop_unrouted_prefetches(a.layer, [&](int32_t e) {  // plan.experts is sorted
      return std::binary_search(plan.experts.begin(), plan.experts.end(), e);
    });
    if (host_compute) {
      count_routing(a.layer, plan.experts);
      std::vector<size_t> missing;
      std::vector<int64_t> rows;
      for (size_t i = 0; i < plan.experts.size(); ++i) {
        if (cache.find({a.layer, plan.experts[i]}) >= 0) continue;  // in a slot or on its way
        missing.push_back(i);
        rows.push_back(plan.offsets[i + 1] - plan.offsets[i]);
      }
      const std::vector<lane> lanes =
          plan_lanes(costs, cfg.host_lane.plan, static_cast<int64_t>(slot_bytes), link_backlog(), rows);
      for (size_t j = 0; j < missing.size(); ++j) {
        if (lanes[j] == lane::lane_host) {
          on_host[missing[j]] = 1;
          to_host.push_back(missing[j]);
        }
      }
    }
  }
  status result = send_to_host(to_host);

  size_t next = 0;
  bool next_layer_prefetched = a.num_next <= 0;
  std::vector<held_slot> wave;
  while (next < plan.experts.size() && result.is_ok()) {
    // Acquire as many of the remaining experts as the slots allow.
    std::vector<size_t> overflow;  // hybrid: experts no slot can take now go to the host lane
    {
      std::unique_lock<std::mutex> lk(mu);
      wave.clear();
      while (next < plan.experts.size()) {
        if (on_host[next]) {
          ++next;
          continue;
        }
        const expert_key key{a.layer, plan.experts[next]};
        int32_t slot = cache.find(key);
        if (slot >= 0) {
          slot_info& s = cache.slot(slot);
          ++ls->expert_hits;
          if (s.prefetched) {
            if (s.copied_as_prefetch) ++ls->prefetch_used;
            s.prefetched = false;
          }
          if (s.state == slot_state::slot_state_queued && !s.demanded) enqueue(slot, true);
        } else {
          slot = cache.choose_slot(/*for_prefetch=*/false);
          if (slot < 0 && host_compute) {
            on_host[next] = 1;
            overflow.push_back(next++);
            continue;
          }
          if (slot < 0) break;
          if (cache.assign(slot, key)) ++stats.evictions;
          ++ls->expert_misses;
          enqueue(slot, /*demand=*/true);
        }
        slot_info& s = cache.slot(slot);
        ++s.refs;
        cache.touch(slot);
        wave.push_back({slot, s.generation, next});
        ++next;
      }
      if (wave.empty() && next < plan.experts.size()) {
        if (!failure.is_ok()) {
          result = failure;
          break;
        }
        bool others_hold = false;
        for (int32_t i = 0; i < cache.num_slots(); ++i) others_hold = others_hold || cache.slot(i).refs > 0;
        if (!others_hold) {
          result = invalid_argument(
              "moe_forward: no slot can take layer " + std::to_string(a.layer) + " expert " +
              std::to_string(plan.experts[next]) + ": all " + std::to_string(cache.num_slots()) +
              " slots are pinned; unpin experts or raise expert_memory");
          break;
        }
        state_cv.wait(lk);  // other forwards hold every free slot: wait for a release
        continue;
      }
      if (!next_layer_prefetched) {
        prefetch_locked(a.next_layer, a.next_experts, a.num_next, prefetch_allowance(a.num_next));
        next_layer_prefetched = true;
      }
    }
    if (result.is_ok()) result = send_to_host(overflow);

    for (const held_slot& h : wave) {
      if (!result.is_ok()) break;
      std::unique_ptr<backend_event> t0, t1;
      bool ready = false;
      {
        std::lock_guard<std::mutex> lk(mu);
        ready = cache.slot(h.slot).state == slot_state::slot_state_ready;
        if (!ready) {
          t0 = take_timer();
          t1 = take_timer();
        }
      }
      if (!ready) {
        // t0 goes on the stream before the host waits, so t1 - t0 is the time the compute
        // stream stood still for this copy, whoever was late.
        if (t0) result = be->record(t0.get(), a.stream);
        if (result.is_ok()) {
          std::unique_lock<std::mutex> lk(mu);
          result = wait_issued(lk, h.slot, h.generation);
        }
        if (result.is_ok()) result = be->stream_wait(copy_done[static_cast<size_t>(h.slot)].get(), a.stream);
        if (result.is_ok() && t1) result = be->record(t1.get(), a.stream);
        std::lock_guard<std::mutex> lk(mu);
        if (result.is_ok() && t0 && t1) {
          probes.push_back({std::move(t0), std::move(t1), a.layer});
        } else {
          if (t0) spare.push_back(std::move(t0));
          if (t1) spare.push_back(std::move(t1));
        }
      }
      if (!result.is_ok()) break;
      std::unique_ptr<backend_event> c0, c1;
      {
        std::lock_guard<std::mutex> lk(mu);
        trace_timers(&c0, &c1);
      }
      if (c0) result = be->record(c0.get(), a.stream);
      const int64_t r0 = plan.offsets[h.plan_index];
      const int64_t n = plan.offsets[h.plan_index + 1] - r0;
      if (result.is_ok()) {
        result = expert_ffn(*be, sp, slot_ptr(h.slot), xp + static_cast<size_t>(r0 * H) * esz, n,
                            act + static_cast<size_t>(r0 * U) * esz, y + static_cast<size_t>(r0 * H) * esz,
                            a.stream);
      }
      if (result.is_ok() && c1) result = be->record(c1.get(), a.stream);
      if (c0 && c1) {
        std::lock_guard<std::mutex> lk(mu);
        traces.push_back({trace_event::kind_t::kind_compute, a.layer, plan.experts[h.plan_index],
                          std::move(c0), std::move(c1)});
      }
      if (!result.is_ok()) break;
    }

    // Release the wave, also after a failure: nothing may keep a reference.
    std::lock_guard<std::mutex> lk(mu);
    for (const held_slot& h : wave) {
      status st = be->record(last_use[static_cast<size_t>(h.slot)].get(), a.stream);
      if (result.is_ok() && !st.is_ok()) result = st;
      --cache.slot(h.slot).refs;
    }
    state_cv.notify_all();
  }
  // The host lane's rows join the device lane's (always waited for: the jobs read this
  // forward's buffers).
  const double device_s = since(started);
  const steady::time_point host_wait = steady::now();
  for (host_lane::job& j : hw.jobs) host_compute->wait(&j);
  const double host_wait_s = since(host_wait);
  for (const host_lane::job& j : hw.jobs) {
    if (result.is_ok() && !j.result.is_ok()) result = j.result;
  }
  if (result.is_ok() && !hw.x.empty()) {
    const size_t row_bytes = static_cast<size_t>(H) * esz;
    for (const auto& [r0, n] : hw.rows) {
      if (!result.is_ok()) break;
      result = be->upload(y + static_cast<size_t>(r0) * row_bytes, hw.y.data() + static_cast<size_t>(r0) * row_bytes,
                          static_cast<size_t>(n) * row_bytes, a.stream);
    }
  }
  if (result.is_ok()) {
    result = be->combine(dt, a.out, y, row_of_dev, weights_dev, a.tokens, a.top_k, H, a.stream);
  }
  std::lock_guard<std::mutex> lk(mu);
  if (host_compute) {
    ls->device_seconds += device_s;
    ls->host_wait_seconds += hw.jobs.empty() ? 0.0 : host_wait_s;
    for (size_t i = 0; i < hw.jobs.size(); ++i) {
      ls->host_seconds += hw.jobs[i].seconds;
      observe_host(hw.jobs[i], hw.predicted[i]);
    }
    const double block = since(started);
    block_seconds = block_seconds == 0 ? block : 0.8 * block_seconds + 0.2 * block;
  }
  finish_layer(a.layer);
  ++stats.forwards;
  resolve_probes(/*wait=*/false);
  return result;
}

}  // namespace pregated
