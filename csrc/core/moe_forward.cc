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
#include <algorithm>
#include <cstring>
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

  const expert_spec& sp = cfg.spec;
  const dtype dt = sp.dt;
  const size_t esz = dtype_size(dt);
  const int64_t H = sp.hidden, I = sp.intermediate, U = sp.up_rows();
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

  layer_stats* ls = nullptr;
  {
    std::lock_guard<std::mutex> lk(mu);
    if (!failure.is_ok()) return failure;
    ls = &stats.layers[static_cast<size_t>(a.layer)];
    // Prefetches for this layer that have not started and that routing did not pick are no
    // longer wanted (one whose copy has started stays queued until the copy is issued: it is
    // counted as issued and left alone).
    for (int32_t i = 0; i < cache.num_slots(); ++i) {
      const slot_info& s = cache.slot(i);
      if (s.state != slot_state::slot_state_queued || s.copied_as_prefetch || s.demanded || s.refs > 0 ||
          s.pinned || s.key.layer != a.layer) {
        continue;
      }
      // plan.experts is sorted
      if (!std::binary_search(plan.experts.begin(), plan.experts.end(), s.key.expert)) {
        ++ls->prefetch_dropped;
        cache.clear(i);
      }
    }
  }

  status result;
  size_t next = 0;
  bool next_layer_prefetched = a.num_next <= 0;
  std::vector<held_slot> wave;
  while (next < plan.experts.size() && result.is_ok()) {
    // Acquire as many of the remaining experts as the slots allow.
    {
      std::unique_lock<std::mutex> lk(mu);
      wave.clear();
      while (next < plan.experts.size()) {
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
      if (wave.empty()) {
        if (!failure.is_ok()) return failure;
        bool others_hold = false;
        for (int32_t i = 0; i < cache.num_slots(); ++i) others_hold = others_hold || cache.slot(i).refs > 0;
        if (!others_hold) {
          return invalid_argument(
              "moe_forward: no slot can take layer " + std::to_string(a.layer) + " expert " +
              std::to_string(plan.experts[next]) + ": all " + std::to_string(cache.num_slots()) +
              " slots are pinned; unpin experts or raise expert_memory");
        }
        state_cv.wait(lk);  // other forwards hold every free slot: wait for a release
        continue;
      }
      if (!next_layer_prefetched) {
        prefetch_locked(a.next_layer, a.next_experts, a.num_next);
        next_layer_prefetched = true;
      }
    }

    for (const held_slot& h : wave) {
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
      const uint8_t* w = slot_ptr(h.slot);
      const int64_t r0 = plan.offsets[h.plan_index];
      const int64_t n = plan.offsets[h.plan_index + 1] - r0;
      uint8_t* a_rows = act + static_cast<size_t>(r0 * U) * esz;
      uint8_t* y_rows = y + static_cast<size_t>(r0 * H) * esz;
      const uint8_t* x_rows = xp + static_cast<size_t>(r0 * H) * esz;
      if (sp.quantized()) {
        result = be->gemm_nt_quantized(dt, n, U, H, x_rows, H, quantized_part(sp, w, 0), a_rows, U, a.stream);
      } else {
        result = be->gemm_nt(dt, n, U, H, x_rows, H, w, H, a_rows, U, a.stream);
      }
      if (result.is_ok() && sp.has_bias) {  // gate and up biases are adjacent, like their rows
        result = be->add_bias(dt, a_rows, n, U, U, w + sp.part_offset(sp.first_bias_part()), a.stream);
      }
      if (result.is_ok()) result = be->activate(sp, a_rows, n, U, a.stream);
      if (result.is_ok() && sp.quantized()) {
        result = be->gemm_nt_quantized(dt, n, H, I, a_rows, U, quantized_part(sp, w, sp.down_part()), y_rows, H,
                                       a.stream);
      } else if (result.is_ok()) {
        result = be->gemm_nt(dt, n, H, I, a_rows, U, w + sp.part_offset(sp.down_part()), I, y_rows,
                             H, a.stream);
      }
      if (result.is_ok() && sp.has_bias) {
        result = be->add_bias(dt, y_rows, n, H, H, w + sp.part_offset(sp.num_parts() - 1), a.stream);
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
  if (result.is_ok()) {
    result = be->combine(dt, a.out, y, row_of_dev, weights_dev, a.tokens, a.top_k, H, a.stream);
  }
  std::lock_guard<std::mutex> lk(mu);
  // This layer has run: what was prefetched for it and not used was a wrong guess. Without a
  // cache, its experts leave their slots now.
  const bool keep = cache.policy() != eviction_policy::eviction_policy_none;
  for (int32_t i = 0; i < cache.num_slots(); ++i) {
    slot_info& s = cache.slot(i);
    if (s.key.layer != a.layer || s.state == slot_state::slot_state_empty ||
        s.state == slot_state::slot_state_queued) {
      continue;
    }
    s.prefetched = false;
    if (!keep && s.refs == 0 && !s.pinned) {
      cache.clear(i);
      ++stats.evictions;
    }
  }
  ++stats.forwards;
  resolve_probes(/*wait=*/false);
  return result;
}

}  // namespace pregated
