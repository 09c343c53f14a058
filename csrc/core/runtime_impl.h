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
  // -1), rebuilt from the cache (under mu) when the cache's version moved on.
  int32_t* slot_table = nullptr;
  std::vector<int32_t> table_host;
  uint64_t table_version = 0;
  std::mutex resident_mu;  // one resident forward at a time: they share one workspace
  void* resident_ws = nullptr;
  size_t resident_ws_bytes = 0;
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
  // Uploads the slot table on `stream` if the cache changed since (mu held).
  status refresh_slot_table(void* stream);
  // The resident workspace holds `rows` (token, expert) rows; under resident_mu.
  status grow_resident_workspace(int64_t rows, void* stream);
  status check_experts(const int32_t* experts, int32_t n, const char* what) const;

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
