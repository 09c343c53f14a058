// The copy engine: one worker thread that feeds the backend's copy engine from the prefetch
// queue, keeping at most cfg.copy_depth copies in flight so that a demand load never waits
// behind a long row of prefetches.
#include <string>

#include "runtime_impl.h"

namespace pregated {

void runtime::impl::enqueue(int32_t slot, bool demand) {
  slot_info& s = cache.slot(slot);
  if (demand) s.demanded = true;
  queue.push({slot, s.generation}, demand);
  wake_worker();
}

void runtime::impl::copy_loop() {
  std::unique_lock<std::mutex> lk(mu);
  for (;;) {
    copy_request r;
    if (static_cast<int32_t>(in_flight.size()) < cfg.copy_depth && queue.pop(&r)) {
      // A slot that a slice of the slot table mapped may still be read by blocks launched with
      // that slice: wait until its layer's launch under way (if any) has recorded its event (the
      // copy waits for the event below).
      const int32_t read_by = table_layer[static_cast<size_t>(r.slot)];
      if (read_by >= 0 && launching[static_cast<size_t>(read_by)] > 0) {
        worker_busy = true;
        state_cv.wait(lk, [&] { return launching[static_cast<size_t>(read_by)] == 0; });
        worker_busy = false;
      }
      slot_info& s = cache.slot(r.slot);
      // Stale entries (slot evicted or cancelled since) and everything after a failure are
      // dropped; waiters for an empty queue hear of it.
      if (s.generation != r.generation || s.state != slot_state::slot_state_queued ||
          !failure.is_ok()) {
        state_cv.notify_all();
        continue;
      }
      table_layer[static_cast<size_t>(r.slot)] = -1;
      const expert_key key = s.key;
      const bool prefetch = !s.demanded && !s.refill;
      // Counted when the copy starts, so prefetch_used (uses of copies counted here) can
      // never exceed prefetch_issued: a queued prefetch that a forward needs first becomes a
      // demand load and counts as neither.
      s.copied_as_prefetch = prefetch;
      if (prefetch) ++stats.layers[static_cast<size_t>(key.layer)].prefetch_issued;
      std::unique_ptr<backend_event> t0, t1;
      trace_timers(&t0, &t1);
      std::unique_ptr<backend_event> l0, l1;  // the link's figure under policy hybrid
      if (!t0) link_timers(&l0, &l1);
      worker_busy = true;
      lk.unlock();
      // A slot's previous expert may still be read by GEMMs on the compute stream: the copy
      // waits for the slot's last use.
      status st = be->copy_wait(last_use[static_cast<size_t>(r.slot)].get());
      if (st.is_ok() && read_by >= 0) st = be->copy_wait(layer_read[static_cast<size_t>(read_by)].get());
      if (st.is_ok() && t0) st = be->record_copy(t0.get());
      if (st.is_ok() && l0) st = be->record_copy(l0.get());
      if (st.is_ok()) {
        st = be->copy_to_device(slot_ptr(r.slot), store.expert(key), slot_bytes,
                                copy_done[static_cast<size_t>(r.slot)].get());
      }
      if (st.is_ok() && t1) st = be->record_copy(t1.get());
      if (st.is_ok() && l1) st = be->record_copy(l1.get());
      lk.lock();
      worker_busy = false;
      if (st.is_ok() && l0 && l1) {
        link_probes.push_back({std::move(l0), std::move(l1)});
      } else {
        if (l0) spare.push_back(std::move(l0));
        if (l1) spare.push_back(std::move(l1));
      }
      observe_link();
      if (t0 && t1) traces.push_back({trace_event::kind_t::kind_copy, key.layer, key.expert, std::move(t0), std::move(t1)});
      if (!st) {
        failure = {st.code(), "copy engine: loading layer " + std::to_string(key.layer) +
                                  " expert " + std::to_string(key.expert) + ": " + st.message()};
      } else {
        layer_stats& ls = stats.layers[static_cast<size_t>(key.layer)];
        ls.bytes_h2d += static_cast<int64_t>(slot_bytes);
        slot_info& now = cache.slot(r.slot);
        if (now.generation == r.generation) {
          cache.set_state(r.slot, caps.async_copy ? slot_state::slot_state_issued : slot_state::slot_state_ready);
          cache.changed();
        }
        if (caps.async_copy) in_flight.push_back(r);
      }
      state_cv.notify_all();
      continue;
    }
    if (!in_flight.empty()) {
      const copy_request f = in_flight.front();
      worker_busy = true;
      lk.unlock();
      // Waiting on the slot's event may wait for a newer copy into the same slot: later in
      // stream order, so it also covers this one.
      status st = be->wait_host(copy_done[static_cast<size_t>(f.slot)].get());
      lk.lock();
      worker_busy = false;
      in_flight.pop_front();
      observe_link();
      if (!st) {
        failure = {st.code(), "copy engine: waiting for a copy: " + st.message()};
      } else {
        slot_info& s = cache.slot(f.slot);
        if (s.generation == f.generation && s.state == slot_state::slot_state_issued) {
          cache.set_state(f.slot, slot_state::slot_state_ready);
          cache.changed();
        }
      }
      state_cv.notify_all();
      continue;
    }
    if (stopping) return;
    worker_cv.wait(lk);
  }
}

status runtime::impl::wait_issued(std::unique_lock<std::mutex>& lk, int32_t slot,
                                  uint64_t generation) {
  for (;;) {
    if (!failure.is_ok()) return failure;
    const slot_info& s = cache.slot(slot);
    if (s.generation != generation) {
      return internal_error("slot " + std::to_string(slot) +
                            " was reassigned while a forward held it (a runtime bug)");
    }
    if (s.state == slot_state::slot_state_issued || s.state == slot_state::slot_state_ready) {
      return {};
    }
    state_cv.wait(lk);
  }
}

status runtime::impl::wait_idle_locked(std::unique_lock<std::mutex>& lk) {
  wake_worker();
  state_cv.wait(lk, [&] {
    return !failure.is_ok() ||
           (routes.empty() && !route_busy && queue.empty() && in_flight.empty() && !worker_busy);
  });
  return failure;
}

}  // namespace pregated
