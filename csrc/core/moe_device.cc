// The device path of a MoE block (decode under any budget): the routing stays on the device, an
// expert in no ready slot is read in place from the expert store, and the copy engine's route
// reader learns the routing one step behind, off the caller's thread.
//
//   caller's thread:  refresh the layer's slot table -> download ids (and the prediction) to a
//                     pinned note, record `known` -> launch the block -> record layer_read
//   route reader:     wait for `known` -> count hits and reads in place, drop the layer's unused
//                     prefetches, prefetch the prediction, queue the missed experts' loads
//   copy engine:      a copy into a slot waits for the blocks that may read it through a slice
//                     uploaded before (table_layer, layer_read), then runs; the next slice
//                     uploaded after it completed maps the expert to its slot.
#include <algorithm>
#include <string>

#include "runtime_impl.h"

namespace pregated {

namespace {
constexpr size_t note_ints = static_cast<size_t>(device_rows_max + device_next_max);
}

status runtime::impl::make_notes() {
  // Two steps' worth of blocks: the caller waits for the route reader only when the device is
  // two steps behind it.
  const size_t count = 2 * static_cast<size_t>(cfg.num_layers) + 2;
  void* mem = nullptr;
  PREGATED_RETURN_IF_ERROR(be->alloc_host(count * note_ints * sizeof(int32_t), &mem));
  std::vector<route_note> made(count);
  for (size_t i = 0; i < count; ++i) {
    status st = be->create_event(false, &made[i].known);
    if (!st) {
      be->free_host(mem);
      return st;
    }
    made[i].ids = static_cast<int32_t*>(mem) + i * note_ints;
    made[i].next = made[i].ids + device_rows_max;
  }
  note_memory = mem;
  notes = std::move(made);
  free_notes.clear();
  for (size_t i = count; i-- > 0;) free_notes.push_back(static_cast<int32_t>(i));
  return {};
}

void runtime::impl::route_loop() {
  std::unique_lock<std::mutex> lk(mu);
  for (;;) {
    if (!routes.empty()) {
      const int32_t i = routes.front();
      routes.pop_front();
      route_busy = true;
      lk.unlock();
      status st = be->wait_host(notes[static_cast<size_t>(i)].known.get());
      lk.lock();
      route_busy = false;
      if (!st && failure.is_ok()) {
        failure = {st.code(), "route reader: waiting for a block's routing: " + st.message()};
      } else if (failure.is_ok() && !stopping) {
        read_routing(notes[static_cast<size_t>(i)]);
      }
      free_notes.push_back(i);
      state_cv.notify_all();
      continue;
    }
    if (stopping) return;
    route_cv.wait(lk);
  }
}

void runtime::impl::read_routing(const route_note& n) {
  layer_stats& ls = stats.layers[static_cast<size_t>(n.layer)];
  const int32_t E = cfg.num_experts;
  std::vector<int32_t> rows(static_cast<size_t>(E), 0);  // (token, expert) rows of each expert
  for (int64_t r = 0; r < n.tokens * n.top_k; ++r) {
    const int32_t e = n.ids[r];
    if (e >= 0 && e < E) ++rows[static_cast<size_t>(e)];
  }
  std::vector<int32_t>& predicted = predicted_for[static_cast<size_t>(n.layer)];
  if (!predicted.empty()) {  // the prediction made for this block, scored
    int64_t routed = 0, right = 0;
    for (int32_t e = 0; e < E; ++e) routed += rows[static_cast<size_t>(e)] > 0 ? 1 : 0;
    for (int32_t e : predicted) right += rows[static_cast<size_t>(e)] > 0 ? 1 : 0;
    ls.predicted_experts += static_cast<int64_t>(predicted.size());
    ls.predicted_routed += right;
    ls.routed_after_prediction += routed;
    predicted.clear();
  }
  std::vector<int32_t> missed;
  for (int32_t e = 0; e < E; ++e) {
    if (rows[static_cast<size_t>(e)] == 0) continue;
    const int32_t slot = cache.find({n.layer, e});
    if (n.table[static_cast<size_t>(e)] >= 0) {  // read from its slot
      ++ls.expert_hits;
      if (slot >= 0) {
        slot_info& s = cache.slot(slot);
        if (s.prefetched) {
          if (s.copied_as_prefetch) ++ls.prefetch_used;
          s.prefetched = false;
        }
        cache.touch(slot);
      }
      continue;
    }
    ++ls.expert_misses;
    ++ls.store_reads;
    ls.store_read_bytes += static_cast<int64_t>(rows[static_cast<size_t>(e)]) * static_cast<int64_t>(slot_bytes);
    if (slot >= 0) {
      cache.touch(slot);  // on its way (a prefetch too late for this block): kept for the next
      cache.slot(slot).prefetched = false;
    } else {
      missed.push_back(e);
    }
  }
  // This layer has run (a later copy into one of its slots still waits for this block).
  drop_unrouted_prefetches(n.layer, [&](int32_t e) { return rows[static_cast<size_t>(e)] > 0; });
  finish_layer(n.layer);
  // The prediction first: the next block needs it sooner than later steps need the misses.
  if (n.num_next > 0 && n.next_layer >= 0 && n.next_layer < cfg.num_layers) {
    std::vector<int32_t> next;
    for (int64_t i = 0; i < n.num_next; ++i) {
      if (n.next[i] >= 0 && n.next[i] < E) next.push_back(n.next[i]);
    }
    std::sort(next.begin(), next.end());
    next.erase(std::unique(next.begin(), next.end()), next.end());
    predicted_for[static_cast<size_t>(n.next_layer)] = next;
    prefetch_locked(n.next_layer, next.data(), static_cast<int32_t>(next.size()),
                    prefetch_allowance(static_cast<int32_t>(next.size())));
  }
  if (cache.policy() != eviction_policy::eviction_policy_none) {
    for (int32_t e : missed) {
      const int32_t slot = cache.choose_slot(/*for_prefetch=*/true);  // displaces no load, no unused prefetch
      if (slot < 0) break;
      if (cache.assign(slot, {n.layer, e})) ++stats.evictions;
      cache.slot(slot).refill = true;
      cache.touch(slot);
      enqueue(slot, /*demand=*/false);
    }
  }
  state_cv.notify_all();
}

status runtime::moe_forward_device(const resident_args& a) {
  std::shared_lock<std::shared_mutex> api(impl_->api_mu);
  impl& m = *impl_;
  PREGATED_RETURN_IF_ERROR(m.check_open());
  PREGATED_RETURN_IF_ERROR(m.check_layer(a.layer, "moe_forward_device"));
  const int64_t R = a.tokens * a.top_k;
  if (a.tokens < 0 || a.top_k < 1 || a.top_k > m.cfg.num_experts) {
    return invalid_argument("moe_forward_device: need tokens >= 0 and 1 <= top_k <= " +
                            std::to_string(m.cfg.num_experts) + ", got tokens=" + std::to_string(a.tokens) +
                            " top_k=" + std::to_string(a.top_k));
  }
  if (R > device_rows_max) {
    return invalid_argument("moe_forward_device: " + std::to_string(R) + " (token, expert) rows; the device path takes "
                            "up to " + std::to_string(device_rows_max) + " (decode: it reads a missing expert in place "
                            "once per row): run larger blocks through moe_forward");
  }
  if (a.num_next < 0 || a.num_next > device_next_max || (a.num_next > 0 && a.next_ids == nullptr)) {
    return invalid_argument("moe_forward_device: " + std::to_string(a.num_next) + " predicted ids for the next layer; "
                            "give 0 to " + std::to_string(device_next_max) + " of them, in device memory");
  }
  if (a.num_next > 0) PREGATED_RETURN_IF_ERROR(m.check_layer(a.next_layer, "moe_forward_device next_layer"));
  if (!m.store_unmapped.is_ok()) {
    return {status_code::status_code_unavailable, "moe_forward_device: the device cannot read the expert store in place (" +
                                                      m.store_unmapped.message() + "): run blocks through moe_forward"};
  }
  if (a.tokens == 0) return {};
  if (a.x == nullptr || a.out == nullptr || a.ids == nullptr || a.weights == nullptr) {
    return invalid_argument("moe_forward_device: x, out, ids and weights must all be given");
  }
  std::lock_guard<std::mutex> one(m.resident_mu);
  std::unique_lock<std::mutex> lk(m.mu);
  if (m.notes.empty()) PREGATED_RETURN_IF_ERROR(m.make_notes());
  // A free note; none when the device runs two steps behind: wait for it to catch up.
  m.state_cv.wait(lk, [&] { return !m.free_notes.empty() || !m.failure.is_ok(); });
  if (!m.failure.is_ok()) return m.failure;
  const int32_t note = m.free_notes.back();
  m.free_notes.pop_back();
  ++m.stats.forwards;
  ++m.stats.device_forwards;
  return m.launch_resident(lk, a, /*at_store=*/true, note);
}

bool runtime::reads_store_in_place() const { return impl_->store_unmapped.is_ok(); }

}  // namespace pregated
