// Internal state of pregated::runtime, shared by runtime.cc (API, lifetime), copy_engine.cc
// (the prefetch queue's worker) and moe_forward.cc (the MoE block).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <thread>
#include <vector>

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

  uint8_t* slot_ptr(int32_t slot) const { return slab + slot_bytes * static_cast<size_t>(slot); }
  status check_open() const;
  // Allocates the slab, the cache and the per-slot events for a budget (mu held or no worker).
  status make_slab(int64_t expert_memory, eviction_policy eviction);
  status check_layer(int32_t layer, const char* what) const;
  // Uploads the slot table on `stream` if the cache changed since (mu held).
  status refresh_slot_table(void* stream);
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
  void prefetch_locked(int32_t layer, const int32_t* experts, int32_t n);
  std::unique_ptr<backend_event> take_timer();
  // Two timing events for a traced interval, or nulls when tracing is off (mu held).
  void trace_timers(std::unique_ptr<backend_event>* start, std::unique_ptr<backend_event>* end);
  void resolve_probes(bool wait);

  // moe_forward.cc
  status forward(const moe_args& a);
};

}  // namespace pregated
