// The expert runtime: expert store in host memory, a slab of slots on the device, the prefetch
// queue and its copy engine, and the MoE forward that runs experts from the slots.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "pregated/backend.h"
#include "pregated/expert_cache.h"
#include "pregated/expert_store.h"
#include "pregated/lane_planner.h"
#include "pregated/status.h"
#include "pregated/types.h"

namespace pregated {

// The host lane and its planner (policy hybrid): experts that are not in a slot are copied or
// computed on the host, whichever finishes the block sooner under the cost model, and the
// experts routed most often (a decayed count per expert) are pinned as the hot set.
struct host_lane_config {
  bool enabled = false;
  int32_t threads = 0;  // the host lane's own pool; 0: one per core
  lane_plan plan = lane_plan::lane_plan_auto;
  // Fields left at 0 are measured: the link when the runtime is created, the host lane at the
  // first forward; measured figures follow what later blocks observe. Given ones stay fixed.
  lane_costs costs;
  int64_t hot_slots = 0;       // slots the hot set may pin (at most num_slots - 1 unless all fit)
  double hot_decay = 0.9;      // a layer's counts are multiplied by this at each of its forwards
  double hot_min = 1.0;        // the decayed count an expert needs to join the hot set
  int32_t rebalance_every = 8; // forwards between updates of the hot set

  status validate(int64_t num_slots, int64_t num_experts_total) const;
};

struct runtime_config {
  int32_t num_layers = 0;   // MoE layers
  int32_t num_experts = 0;  // experts per MoE layer
  expert_spec spec;
  // Bytes of device memory for expert slots; < 0 means one slot per expert (everything fits).
  int64_t expert_memory = -1;
  eviction_policy eviction = eviction_policy::eviction_policy_lru;
  // Copies handed to the copy engine at once; a demand load waits behind at most this many.
  int32_t copy_depth = 2;
  host_lane_config host_lane;

  status validate() const;
  // Slots that `expert_memory` buys (capped at the number of experts).
  int64_t num_slots() const;
};

// One MoE block. T = tokens, K = experts per token, H = hidden.
struct moe_args {
  int32_t layer = 0;
  int64_t tokens = 0;                 // T
  int64_t top_k = 0;                  // K
  const void* x = nullptr;            // [T, H] device memory, spec.dt
  void* out = nullptr;                // [T, H] device memory, spec.dt; may alias x
  const int32_t* ids = nullptr;       // [T, K] host memory, expert of each (token, k)
  const float* weights = nullptr;     // [T, K] host memory, weight of each (token, k)
  void* stream = nullptr;             // compute stream (cudaStream_t); ignored on the CPU
  // Optional: experts to prefetch for `next_layer`, issued once this block's experts hold
  // their slots, so the prefetch can never displace them.
  int32_t next_layer = -1;
  const int32_t* next_experts = nullptr;
  int32_t num_next = 0;
};

// Quantized experts take the resident path for blocks of up to this many (token, expert) rows
// (decode): its kernels dequantize an expert's codes once per row, where the general path's
// GEMMs for prefill read them once per expert.
constexpr int64_t resident_quantized_rows_max = 64;

// The device path (runtime::moe_forward_device) takes blocks of up to this many (token, expert)
// rows (decode), and up to device_next_max ids predicted for the next layer.
constexpr int64_t device_rows_max = 64;
constexpr int64_t device_next_max = 256;

// One MoE block on the resident or the device path: everything in device memory.
struct resident_args {
  int32_t layer = 0;
  int64_t tokens = 0;                 // T
  int64_t top_k = 0;                  // K
  const void* x = nullptr;            // [T, H] spec.dt
  void* out = nullptr;                // [T, H] spec.dt; may not alias x
  const int32_t* ids = nullptr;       // [T, K] device memory
  const float* weights = nullptr;     // [T, K] device memory
  void* stream = nullptr;
  // moe_forward_device only: experts predicted for `next_layer` ([num_next] device memory, in any
  // order, repeats allowed, ids past the last expert ignored), prefetched once the copy engine
  // has read them.
  int32_t next_layer = -1;
  const int32_t* next_ids = nullptr;
  int64_t num_next = 0;
};

struct layer_stats {
  int64_t bytes_h2d = 0;         // bytes copied host -> device
  int64_t expert_hits = 0;       // experts a forward needed that were in a slot (or on the way)
  int64_t expert_misses = 0;     // experts a forward had to load on demand
  int64_t prefetch_issued = 0;   // prefetch copies started
  int64_t prefetch_used = 0;     // prefetch copies that a forward then used (<= prefetch_issued)
  int64_t prefetch_dropped = 0;  // queued prefetches cancelled before their copy started
  double stall_seconds = 0;      // compute time spent waiting for copies
  // The host lane (policy hybrid):
  int64_t host_experts = 0;      // experts computed on the host instead of being copied
  int64_t host_bytes = 0;        // expert bytes that did not cross the link because of it
  double host_seconds = 0;       // the host lane's busy time
  double host_wait_seconds = 0;  // time a forward waited for the host lane after its device lane
  double device_seconds = 0;     // time a forward spent on its device lane (host clock: on a GPU,
                                 // launches and waits for copies, not the GEMMs themselves)
  // The device path (moe_forward_device): experts a block read in place from the expert store
  // because they were in no ready slot (one per block and expert; also counted in
  // expert_misses), and the bytes those reads moved (the expert's bytes per (token, expert) row).
  int64_t store_reads = 0;
  int64_t store_read_bytes = 0;
  // The prediction for this layer that a device-path block of the layer before passed
  // (next_ids), scored against this layer's next device-path block: experts predicted, those
  // of them the block routed, and the experts routed by blocks that had a prediction.
  int64_t predicted_experts = 0;
  int64_t predicted_routed = 0;
  int64_t routed_after_prediction = 0;
};

struct runtime_stats {
  layer_stats total;
  std::vector<layer_stats> layers;
  int64_t evictions = 0;
  int64_t forwards = 0;
  int64_t resident_forwards = 0;  // of those, on the resident path (no expert lookups counted)
  int64_t device_forwards = 0;    // of those, on the device path (lookups counted one step behind)
  // The resident path's device workspace: it grows (a new allocation) when a block has more
  // rows than any before. A CUDA graph that captured a resident block holds the old address, so
  // whoever replays one compares this figure with the one at capture.
  int64_t resident_workspace_bytes = 0;
  int64_t hot_experts = 0;        // experts the host lane's planner pins as hot right now
  lane_costs costs;               // the planner's cost model now (zeros without a host lane)
};

// One interval of a timeline: a copy on the copy engine or an expert's GEMMs on the compute
// stream (expert -1: a resident or device block's kernels, every expert at once), in seconds
// since tracing was switched on.
struct trace_event {
  enum class kind_t { kind_copy = 0, kind_compute = 1 } kind = kind_t::kind_copy;
  int32_t layer = 0;
  int32_t expert = 0;
  double start_s = 0;
  double end_s = 0;
};

struct slot_snapshot {
  int32_t slot = 0;
  expert_key key;
  slot_state state = slot_state::slot_state_empty;
  int32_t refs = 0;
  bool pinned = false;
  bool prefetched = false;
  bool hot = false;  // pinned by the hot set (policy hybrid)
};

class runtime {
 public:
  static status create(std::unique_ptr<backend> be, const runtime_config& cfg,
                       std::unique_ptr<runtime>* out);
  ~runtime();
  runtime(const runtime&) = delete;
  runtime& operator=(const runtime&) = delete;

  const runtime_config& config() const;
  int32_t num_slots() const;
  backend& get_backend();
  // Fill experts here before use (set_part). Writing an expert that sits in a slot is not
  // reflected in the slot until it is evicted and loaded again.
  expert_store& store();

  // Queue copies of `experts` of `layer` (duplicates and residents are skipped).
  status prefetch(int32_t layer, const int32_t* experts, int32_t n);
  // Drop every prefetch whose copy has not started yet.
  status cancel_prefetches();
  status moe_forward(const moe_args& args);
  // The decode path of a block whose experts are all resident (every expert of the layer pinned
  // and loaded, as under policy gpu-only): ids and weights stay in device memory and each
  // (token, expert) row finds its slot through the device slot table, so nothing is asked of
  // the host and nothing is allocated (after the first call): the call can be captured in a CUDA
  // graph. Calls are serialised (one workspace). Fails, naming the layer, when an expert of the
  // layer is not resident.
  status moe_forward_resident(const resident_args& args);
  // The decode path of a block under any budget (blocks of up to device_rows_max rows): ids and
  // weights stay in device memory; each row finds its expert through the device slot table, and
  // an expert in no ready slot is read in place from the expert store (over the link on a GPU)
  // instead of being waited for. The routing (and the prediction for next_layer) goes to pinned
  // host memory behind the block's launch; the copy engine's route reader learns it one step
  // behind, off the caller's thread, counts hits and misses, loads the missed experts for later
  // blocks (unless the eviction policy is none) and prefetches the prediction. A slot is written
  // again only after the blocks that may read it through an earlier table have run. Nothing
  // waits on the host for the device, unless the route reader is two steps' worth of blocks behind
  // (then the call waits for it). Calls are serialised (one workspace).
  status moe_forward_device(const resident_args& args);
  // Whether moe_forward_device can run: the device reads the pinned expert store in place.
  bool reads_store_in_place() const;
  // Grows the resident path's workspace to hold `rows` (token, expert) rows now, so that no
  // later block up to that size allocates (a CUDA graph cannot); its size in bytes after.
  status reserve_resident(int64_t rows, int64_t* workspace_bytes);
  // The device slot table, every layer's slice brought up to date first: [num_layers *
  // num_experts], the slot of each ready expert or -1 (tests).
  status slot_table(std::vector<int32_t>* out);

  // Give the slab a new size and the cache a new eviction policy, keeping the expert store:
  // waits for copies in flight, then starts with empty slots (pins are dropped) and zeroed
  // statistics. Must not run while another thread is inside a forward.
  status resize(int64_t expert_memory, eviction_policy eviction);

  // A new host lane configuration (policy hybrid on or off): the lane is rebuilt, the link
  // measured again where costs are not given, and the hot set starts empty (its pins are
  // dropped). Must not run while another thread is inside a forward.
  status set_host_lane(const host_lane_config& lane);

  // Keep an expert resident until unpinned (loads it if needed).
  status pin(expert_key key);
  status unpin(expert_key key);
  // Give up the expert's slot now; fails if a forward is using it or it is pinned.
  status evict(expert_key key);
  // Wait until every queued copy has completed.
  status wait_idle();

  // Timelines from backend events (CUDA events on the GPU). set_tracing(true) waits for copies
  // in flight, starts the clock and clears earlier records; trace() returns what was recorded
  // since, waiting for it to complete.
  status set_tracing(bool on);
  status trace(std::vector<trace_event>* out);

  runtime_stats stats();
  void reset_stats();
  std::vector<slot_snapshot> slots();
  // Checks every invariant of the cache and compares each ready slot with its host copy byte
  // for byte; a description of every violation goes to `report`.
  status check(std::string* report);

  // Stops the copy engine and frees device and host memory. Later calls fail with
  // status_code_closed.
  status close();
  bool closed() const;

 private:
  runtime();
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace pregated
