// Internal state of pregated::runtime, shared by runtime.cc (API, lifetime), copy_engine.cc
// (the prefetch queue's worker) and moe_forward.cc (the MoE block).
#pragma once

#include <climits>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <thread>
#include <vector>

#include "../cpu/host_lane.h"
#include "pregated/runtime.h"
#include "prefetch_queue.h"

namespace pregated {

struct runtime::impl {
  // A pair of timing events around a compute-side wait for a copy, resolved lazily.
  struct stall_probe {
    std::unique_ptr<backend_event> start, end;
    int32_t layer = 0;
  };

  struct trace_probe {
    trace_event::kind_t kind;
    int32_t layer, expert;
    std::unique_ptr<backend_event> start, end;
  };

  runtime_config cfg;
  std::unique_ptr<backend> be;
  backend_caps caps;
  expert_store store;
  expert_cache cache;
  uint8_t* slab = nullptr;
  size_t slot_bytes = 0;
  // The device slot table ([num_layers * num_experts] int32: the slot of each ready expert, or
  // -1), a layer's slice rebuilt from the cache (under mu) before the layer's next resident or
  // device block when the cache's version moved on.
  int32_t* slot_table = nullptr;
  std::vector<int32_t> table_host;
  std::vector<uint64_t> layer_version;  // per layer: the cache version its slice was built at
  // Ordering a slot's reuse after the blocks that may read it through an uploaded slice (under
  // mu): per slot, the layer whose slice last mapped it (-1: none since its last copy); per
  // layer, its resident or device launches under way and an event after its last such block.
  // A copy into a slot waits until that layer has no launch under way, then for its event.
  std::vector<int32_t> table_layer;
  std::vector<int32_t> launching;
  std::vector<std::unique_ptr<backend_event>> layer_read;
  std::mutex resident_mu;  // one resident forward at a time: they share one workspace
  void* resident_ws = nullptr;
  size_t resident_ws_bytes = 0;
  // The device path (moe_device.cc): a ring of notes, each a block's routing copied to pinned
  // host memory behind its launch; the route reader takes them in order, one step behind.
  struct route_note {
    int32_t layer = 0;
    int32_t next_layer = -1;
    int64_t tokens = 0, top_k = 0, num_next = 0;
    int32_t* ids = nullptr;        // pinned: [device_rows_max]
    int32_t* next = nullptr;       // pinned: [device_next_max]
    std::vector<int32_t> table;    // the layer's slice of the slot table as the block read it
    std::unique_ptr<backend_event> known;  // recorded after the routing's download
  };
  std::vector<route_note> notes;
  // Per layer: the experts (sorted, distinct) predicted for its next device-path block, not yet
  // scored against that block's routing.
  std::vector<std::vector<int32_t>> predicted_for;
  void* note_memory = nullptr;
  std::vector<const uint8_t*> store_at;  // per layer: the store's block as the device addresses it
  status store_unmapped;                 // why the device cannot read the store in place, if it cannot
  std::vector<std::unique_ptr<backend_event>> copy_done;  // per slot: its last copy finished
  std::vector<std::unique_ptr<backend_event>> last_use;   // per slot: its last GEMM finished

  // Public calls hold api_mu shared; close() holds it exclusively.
  std::shared_mutex api_mu;
  bool closed = false;

  // Everything below is guarded by mu.
  std::mutex mu;
  std::condition_variable state_cv;   // slot states changed or references were released
  std::condition_variable worker_cv;  // work for the copy engine
  prefetch_queue queue;
  std::deque<copy_request> in_flight;  // copies handed to an asynchronous copy engine
  bool worker_busy = false;            // a copy is being handed over right now
  bool stopping = false;
  status failure;                      // first copy-engine failure; later calls report it
  runtime_stats stats;
  std::vector<stall_probe> probes;                    // waiting to be resolved
  std::vector<std::unique_ptr<backend_event>> spare;  // timing events to reuse
  std::thread worker;
  std::vector<int32_t> free_notes;
  std::deque<int32_t> routes;  // notes handed to the route reader, oldest first
  bool route_busy = false;     // the route reader holds a note
  std::condition_variable route_cv;
  std::thread route_reader;
  bool tracing = false;
  std::unique_ptr<backend_event> trace_base;
  std::vector<trace_probe> traces;

  // The host lane (policy hybrid), or null. Its cost model, the hot set and the decayed routing
  // counts are guarded by mu.
  std::unique_ptr<host_lane> host_compute;
  lane_costs costs;
  bool host_measured = false;    // the host lane's figures were measured (or given)
  std::mutex measure_mu;         // one first-forward measurement
  std::vector<double> heat;      // [num_layers * num_experts] decayed routing counts
  std::vector<uint8_t> hot;      // [num_layers * num_experts] pinned by the hot set
  int64_t hot_count = 0;
  int64_t heat_forwards = 0;
  double block_seconds = 0;      // a forward's wall time, smoothed (what a prefetch can hide)
  // Timing events around copies while the host lane's link figure is measured (not given).
  struct link_probe {
    std::unique_ptr<backend_event> start, end;
  };
  std::deque<link_probe> link_probes;

  uint8_t* slot_ptr(int32_t slot) const { return slab + slot_bytes * static_cast<size_t>(slot); }
  status check_open() const;
  // Allocates the slab, the cache and the per-slot events for a budget (mu held or no worker).
  status make_slab(int64_t expert_memory, eviction_policy eviction);
  status check_layer(int32_t layer, const char* what) const;
  // Uploads the layer's slice of the slot table on `stream` if the cache changed since it was
  // built (mu held).
  status refresh_layer_table(int32_t layer, void* stream);
  // The resident workspace holds `rows` (token, expert) rows; under resident_mu.
  status grow_resident_workspace(int64_t rows, void* stream);
  // moe_resident.cc: a resident or device block's launch, under resident_mu, lk holding mu on
  // entry and exit: the layer's slice refreshed, the note (if >= 0) filled, downloaded and handed
  // to the route reader, the kernels launched with the store read in place where `at_store`.
  status launch_resident(std::unique_lock<std::mutex>& lk, const resident_args& a, bool at_store, int32_t note);

  // moe_device.cc: the route reader's thread and what it does with one block's routing (mu held).
  status make_notes();
  // Until the route reader has read every block launched so far (their statistics are in).
  void wait_routes_read(std::unique_lock<std::mutex>& lk) {
    state_cv.wait(lk, [&] { return (routes.empty() && !route_busy) || !failure.is_ok(); });
  }
  void route_loop();
  void read_routing(const route_note& n);
  status check_experts(const int32_t* experts, int32_t n, const char* what) const;

  // moe_forward.cc, for both block paths (mu held):
  // A queued prefetch whose copy has not started (a demand load, a refill, a pinned or held slot
  // is none): what cancelling drops.
  static bool unstarted_prefetch(const slot_info& s) {
    return s.state == slot_state::slot_state_queued && !s.copied_as_prefetch && !s.demanded && !s.refill &&
           s.refs == 0 && !s.pinned;
  }
  // Drop the layer's unstarted prefetches that `routed(expert)` says its block did not route.
  template <class Routed>
  void drop_unrouted_prefetches(int32_t layer, Routed routed) {
    for (int32_t e = 0; e < cfg.num_experts; ++e) {  // the layer's slots, through the cache's map
      const int32_t i = cache.find({layer, e});
      if (i < 0 || !unstarted_prefetch(cache.slot(i)) || routed(e)) continue;
      ++stats.layers[static_cast<size_t>(layer)].prefetch_dropped;
      cache.clear(i);
    }
  }
  // The layer has run: what was prefetched for it and not used was a wrong guess; without a
  // cache (eviction none), its experts leave their slots.
  void finish_layer(int32_t layer);

  // copy_engine.cc
  void copy_loop();
  void wake_worker() { worker_cv.notify_one(); }
  // Queue a copy for the expert now bound to `slot` (state queued).
  void enqueue(int32_t slot, bool demand);
  // Wait (mu held through lk) until the copy for `slot` at `generation` was handed over.
  status wait_issued(std::unique_lock<std::mutex>& lk, int32_t slot, uint64_t generation);
  status wait_idle_locked(std::unique_lock<std::mutex>& lk);

  // runtime.cc
  // Queue copies of the experts not yet in a slot, starting at most `max_copies` new ones.
  void prefetch_locked(int32_t layer, const int32_t* experts, int32_t n, int32_t max_copies = INT32_MAX);
  std::unique_ptr<backend_event> take_timer();
  // Two timing events for a traced interval, or nulls when tracing is off (mu held).
  void trace_timers(std::unique_ptr<backend_event>* start, std::unique_ptr<backend_event>* end);
  void resolve_probes(bool wait);

  // moe_forward.cc
  status forward(const moe_args& a);

  // hybrid.cc: the host lane's side of a forward
  status start_host_lane();  // at create: the lane, and the link measured
  status measure_host();     // before the first forward that plans
  // mu held: count the block's routing, and every rebalance_every forwards pin the experts with
  // the highest counts (up to hot_slots) and unpin those that fell out.
  void count_routing(int32_t layer, const std::vector<int32_t>& experts);
  void rebalance_hot();
  // The expert at position i of heat / hot (layer-major).
  expert_key key_at(size_t i) const {
    const size_t E = static_cast<size_t>(cfg.num_experts);
    return {static_cast<int32_t>(i / E), static_cast<int32_t>(i % E)};
  }
  void drop_hot();  // forget the hot set (resize: pins are dropped)
  // mu held: seconds of copies queued or in flight on the link.
  double link_backlog() const;
  // mu held: how many of a block's prefetches can arrive within a block's time (all of them
  // unless the plan is auto).
  int32_t prefetch_allowance(int32_t wanted) const;
  // mu held: fold one host job's time into the host lane's figures.
  void observe_host(const host_lane::job& j, double predicted);
  // mu held: timing events for the next copy when the link's figure follows observation (else
  // nulls); fold the copies that completed into the link's figure.
  void link_timers(std::unique_ptr<backend_event>* start, std::unique_ptr<backend_event>* end);
  void observe_link();
};

}  // namespace pregated
