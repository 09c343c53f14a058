// pregated::runtime: construction, lifetime, prefetch, pinning, statistics and self-check.
#include "pregated/runtime.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "runtime_impl.h"

namespace pregated {

// --- configuration -----------------------------------------------------------------------

status runtime_config::validate() const {
  PREGATED_RETURN_IF_ERROR(spec.validate());
  if (num_layers <= 0 || num_experts <= 0) {
    return invalid_argument("the runtime needs at least one MoE layer and one expert, got " +
                            std::to_string(num_layers) + " layers x " +
                            std::to_string(num_experts) + " experts");
  }
  if (copy_depth < 1) {
    return invalid_argument("copy_depth must be at least 1, got " + std::to_string(copy_depth));
  }
  if (spec.validate().is_ok() && (expert_memory < 0 || expert_memory >= static_cast<int64_t>(spec.bytes()))) {
    PREGATED_RETURN_IF_ERROR(
        host_lane.validate(num_slots(), static_cast<int64_t>(num_layers) * num_experts));
  }
  const int64_t one = static_cast<int64_t>(spec.bytes());
  if (expert_memory >= 0 && expert_memory < one) {
    return invalid_argument("expert memory of " + std::to_string(expert_memory) + " bytes (" +
                            format_bytes(expert_memory) + ") is smaller than one expert: " +
                            "give at least " + std::to_string(one) + " bytes (" +
                            format_bytes(one) + ")");
  }
  return {};
}

int64_t runtime_config::num_slots() const {
  const int64_t all = static_cast<int64_t>(num_layers) * num_experts;
  if (expert_memory < 0) return all;
  return std::min(all, expert_memory / static_cast<int64_t>(spec.bytes()));
}

// --- lifetime ----------------------------------------------------------------------------

runtime::runtime() : impl_(new impl) {}

runtime::~runtime() { close(); }

status runtime::create(std::unique_ptr<backend> be, const runtime_config& cfg,
                       std::unique_ptr<runtime>* out) {
  if (!be) return invalid_argument("runtime::create needs a backend");
  PREGATED_RETURN_IF_ERROR(cfg.validate());
  std::unique_ptr<runtime> rt(new runtime());
  impl& m = *rt->impl_;
  m.cfg = cfg;
  m.be = std::move(be);
  m.caps = m.be->caps();
  m.slot_bytes = cfg.spec.bytes();
  PREGATED_RETURN_IF_ERROR(m.store.init(m.be.get(), cfg.num_layers, cfg.num_experts, cfg.spec));
  PREGATED_RETURN_IF_ERROR(m.make_slab(cfg.expert_memory, cfg.eviction));
  m.table_host.assign(static_cast<size_t>(cfg.num_layers) * static_cast<size_t>(cfg.num_experts), -1);
  void* table = nullptr;
  PREGATED_RETURN_IF_ERROR(m.be->alloc_device(m.table_host.size() * sizeof(int32_t), &table));
  m.slot_table = static_cast<int32_t*>(table);
  PREGATED_RETURN_IF_ERROR(m.be->upload(m.slot_table, m.table_host.data(), m.table_host.size() * sizeof(int32_t), nullptr));
  PREGATED_RETURN_IF_ERROR(m.be->synchronize(nullptr));
  const size_t L = static_cast<size_t>(cfg.num_layers);
  m.layer_version.assign(L, 0);
  m.launching.assign(L, 0);
  m.layer_read.resize(L);
  m.store_at.assign(L, nullptr);
  for (size_t l = 0; l < L; ++l) {
    PREGATED_RETURN_IF_ERROR(m.be->create_event(false, &m.layer_read[l]));
    const void* at = nullptr;
    status mapped = m.be->device_address(m.store.expert({static_cast<int32_t>(l), 0}), &at);
    if (!mapped) m.store_unmapped = mapped;  // the device path is then refused, saying why
    m.store_at[l] = static_cast<const uint8_t*>(at);
  }
  PREGATED_RETURN_IF_ERROR(m.start_host_lane());  // before the copy engine: it measures the link
  m.worker = std::thread([&m] { m.copy_loop(); });
  m.route_reader = std::thread([&m] { m.route_loop(); });
  *out = std::move(rt);
  return {};
}

status runtime::impl::make_slab(int64_t expert_memory, eviction_policy eviction) {
  cfg.expert_memory = expert_memory;
  cfg.eviction = eviction;
  PREGATED_RETURN_IF_ERROR(cfg.validate());
  const int64_t slots = cfg.num_slots();
  void* p = nullptr;
  status st = be->alloc_device(slot_bytes * static_cast<size_t>(slots), &p);
  if (!st) {
    return {st.code(), "expert slab of " + std::to_string(slots) + " slots x " +
                           format_bytes(static_cast<int64_t>(slot_bytes)) + ": " + st.message() +
                           "; lower expert_memory"};
  }
  // Events first: until the slab and the cache are replaced, nothing changes.
  std::vector<std::unique_ptr<backend_event>> done(static_cast<size_t>(slots)), used(static_cast<size_t>(slots));
  for (int64_t i = 0; i < slots && st.is_ok(); ++i) {
    st = be->create_event(false, &done[static_cast<size_t>(i)]);
    if (st.is_ok()) st = be->create_event(false, &used[static_cast<size_t>(i)]);
  }
  if (st.is_ok()) st = cache.init(static_cast<int32_t>(slots), cfg.num_layers, cfg.num_experts, eviction);
  if (!st) {
    be->free_device(p);
    return st;
  }
  slab = static_cast<uint8_t*>(p);
  copy_done = std::move(done);
  last_use = std::move(used);
  table_layer.assign(static_cast<size_t>(slots), -1);  // the slices map no slot of the new slab
  layer_version.assign(static_cast<size_t>(cfg.num_layers), 0);
  predicted_for.assign(static_cast<size_t>(cfg.num_layers), {});
  stats = runtime_stats{};
  stats.layers.assign(static_cast<size_t>(cfg.num_layers), layer_stats{});
  return {};
}

status runtime::resize(int64_t expert_memory, eviction_policy eviction) {
  std::unique_lock<std::shared_mutex> api(impl_->api_mu);
  impl& m = *impl_;
  PREGATED_RETURN_IF_ERROR(m.check_open());
  runtime_config want = m.cfg;
  want.expert_memory = expert_memory;
  want.eviction = eviction;
  // The hot set may not outgrow the new budget (set_host_lane sets it anew).
  const int64_t all = static_cast<int64_t>(want.num_layers) * want.num_experts;
  if (want.expert_memory < 0 || want.expert_memory >= static_cast<int64_t>(want.spec.bytes())) {
    const int64_t slots = want.num_slots();
    want.host_lane.hot_slots = std::min(want.host_lane.hot_slots, slots >= all ? slots : slots - 1);
  }
  PREGATED_RETURN_IF_ERROR(want.validate());
  {
    std::unique_lock<std::mutex> lk(m.mu);
    m.queue.clear();
    PREGATED_RETURN_IF_ERROR(m.wait_idle_locked(lk));
    m.resolve_probes(/*wait=*/true);
    m.traces.clear();
    m.tracing = false;
  }
  PREGATED_RETURN_IF_ERROR(m.be->synchronize(nullptr));
  m.be->free_device(m.slab);  // before the new one: device memory may not hold both
  m.slab = nullptr;
  std::lock_guard<std::mutex> lk(m.mu);
  m.drop_hot();  // the pins go with the slots
  m.cfg.host_lane.hot_slots = want.host_lane.hot_slots;
  const int64_t old_memory = m.cfg.expert_memory;
  const eviction_policy old_eviction = m.cfg.eviction;
  status st = m.make_slab(expert_memory, eviction);
  if (st.is_ok()) return st;
  // No slot may point into the freed slab: take back the budget that was allocated a moment ago.
  status back = m.make_slab(old_memory, old_eviction);
  if (back.is_ok()) {
    return {st.code(), st.message() + "; the previous budget of " + std::to_string(m.cache.num_slots()) +
                           " slots was kept (the slots start empty)"};
  }
  for (int32_t i = 0; i < m.cache.num_slots(); ++i) m.cache.clear(i);
  m.failure = {back.code(), "resize: no expert slab could be allocated, not even the previous one (" +
                                back.message() + "); create a new runtime"};
  return st;
}

status runtime::set_host_lane(const host_lane_config& lane) {
  std::unique_lock<std::shared_mutex> api(impl_->api_mu);
  impl& m = *impl_;
  PREGATED_RETURN_IF_ERROR(m.check_open());
  runtime_config want = m.cfg;
  want.host_lane = lane;
  PREGATED_RETURN_IF_ERROR(want.validate());
  std::unique_lock<std::mutex> lk(m.mu);
  PREGATED_RETURN_IF_ERROR(m.wait_idle_locked(lk));  // the link is idle while it is measured
  m.cfg.host_lane = lane;
  return m.start_host_lane();
}

status runtime::close() {
  std::unique_lock<std::shared_mutex> api(impl_->api_mu);
  impl& m = *impl_;
  if (m.closed) return {};
  {
    std::lock_guard<std::mutex> lk(m.mu);
    m.stopping = true;
    m.queue.clear();
  }
  m.worker_cv.notify_all();
  m.route_cv.notify_all();
  if (m.route_reader.joinable()) m.route_reader.join();  // returns once every note's routing arrived
  if (m.worker.joinable()) m.worker.join();  // returns once copies in flight completed
  m.be->synchronize(nullptr);
  m.probes.clear();
  m.link_probes.clear();
  m.traces.clear();
  m.trace_base.reset();
  m.spare.clear();
  m.copy_done.clear();
  m.last_use.clear();
  m.layer_read.clear();
  m.notes.clear();
  if (m.note_memory != nullptr) m.be->free_host(m.note_memory);
  m.note_memory = nullptr;
  if (m.slab != nullptr) m.be->free_device(m.slab);
  m.slab = nullptr;
  m.host_compute.reset();
  if (m.slot_table != nullptr) m.be->free_device(m.slot_table);
  m.slot_table = nullptr;
  if (m.resident_ws != nullptr) m.be->free_device(m.resident_ws);
  m.resident_ws = nullptr;
  m.store.release();
  m.closed = true;
  return {};
}

bool runtime::closed() const { return impl_->closed; }

status runtime::impl::check_open() const {
  if (closed) {
    return {status_code::status_code_closed,
            "the runtime was closed; create a new one to run MoE blocks again"};
  }
  return {};
}

status runtime::impl::check_layer(int32_t layer, const char* what) const {
  if (layer < 0 || layer >= cfg.num_layers) {
    return invalid_argument(std::string(what) + ": layer " + std::to_string(layer) +
                            " is out of range: the model has " + std::to_string(cfg.num_layers) +
                            " MoE layers");
  }
  return {};
}

const runtime_config& runtime::config() const { return impl_->cfg; }
int32_t runtime::num_slots() const { return impl_->cache.num_slots(); }
backend& runtime::get_backend() { return *impl_->be; }
expert_store& runtime::store() { return impl_->store; }

// --- prefetch ----------------------------------------------------------------------------

void runtime::impl::prefetch_locked(int32_t layer, const int32_t* experts, int32_t n, int32_t max_copies) {
  for (int32_t i = 0; i < n; ++i) {
    const expert_key key{layer, experts[i]};
    const int32_t found = cache.find(key);
    if (found >= 0) {  // resident or on its way: keep it from being the next victim
      cache.refresh(found);
      continue;
    }
    const int32_t slot = max_copies > 0 ? cache.choose_slot(/*for_prefetch=*/true) : -1;
    if (slot < 0) {  // every slot is busy with work that outranks a guess, or the link is full
      ++stats.layers[static_cast<size_t>(layer)].prefetch_dropped;
      continue;
    }
    --max_copies;
    if (cache.assign(slot, key)) ++stats.evictions;
    cache.slot(slot).prefetched = true;
    enqueue(slot, /*demand=*/false);
  }
}

status runtime::prefetch(int32_t layer, const int32_t* experts, int32_t n) {
  std::shared_lock<std::shared_mutex> api(impl_->api_mu);
  impl& m = *impl_;
  PREGATED_RETURN_IF_ERROR(m.check_open());
  PREGATED_RETURN_IF_ERROR(m.check_layer(layer, "prefetch"));
  PREGATED_RETURN_IF_ERROR(m.check_experts(experts, n, "prefetch"));
  std::lock_guard<std::mutex> lk(m.mu);
  if (!m.failure.is_ok()) return m.failure;
  m.prefetch_locked(layer, experts, n);
  return {};
}

status runtime::cancel_prefetches() {
  std::shared_lock<std::shared_mutex> api(impl_->api_mu);
  impl& m = *impl_;
  PREGATED_RETURN_IF_ERROR(m.check_open());
  std::lock_guard<std::mutex> lk(m.mu);
  for (int32_t i = 0; i < m.cache.num_slots(); ++i) {
    const slot_info& s = m.cache.slot(i);
    if (impl::unstarted_prefetch(s)) {
      ++m.stats.layers[static_cast<size_t>(s.key.layer)].prefetch_dropped;
      m.cache.clear(i);
    }
  }
  m.state_cv.notify_all();
  return {};
}

status runtime::moe_forward(const moe_args& args) {
  std::shared_lock<std::shared_mutex> api(impl_->api_mu);
  PREGATED_RETURN_IF_ERROR(impl_->check_open());
  return impl_->forward(args);
}

// --- pinning and eviction ----------------------------------------------------------------

status runtime::pin(expert_key key) {
  std::shared_lock<std::shared_mutex> api(impl_->api_mu);
  impl& m = *impl_;
  PREGATED_RETURN_IF_ERROR(m.check_open());
  PREGATED_RETURN_IF_ERROR(m.store.check_key(key));
  std::unique_lock<std::mutex> lk(m.mu);
  for (;;) {  // the state is read afresh after every wait: other threads move on meanwhile
    if (!m.failure.is_ok()) return m.failure;
    int32_t slot = m.cache.find(key);
    if (slot >= 0 && m.cache.slot(slot).pinned) return {};
    const int32_t slots = m.cache.num_slots();
    const int64_t all = static_cast<int64_t>(m.cfg.num_layers) * m.cfg.num_experts;
    // Pinning the last free slot is allowed only when every expert has a slot of its own.
    if (m.cache.pinned_count() + 1 >= slots && slots < all) {
      return invalid_argument("cannot pin layer " + std::to_string(key.layer) + " expert " +
                              std::to_string(key.expert) + ": " + std::to_string(slots) +
                              " slots, " + std::to_string(m.cache.pinned_count()) +
                              " pinned; at least one slot must stay free for other experts. "
                              "Unpin an expert or raise expert_memory");
    }
    if (slot < 0) {
      slot = m.cache.choose_slot(/*for_prefetch=*/false);
      if (slot < 0) {
        m.state_cv.wait(lk);  // every slot is referenced by forwards: wait for a release
        continue;
      }
      if (m.cache.assign(slot, key)) ++m.stats.evictions;
      m.enqueue(slot, /*demand=*/true);
    }
    m.cache.set_pinned(slot, true);
    return {};
  }
}

status runtime::unpin(expert_key key) {
  std::shared_lock<std::shared_mutex> api(impl_->api_mu);
  impl& m = *impl_;
  PREGATED_RETURN_IF_ERROR(m.check_open());
  PREGATED_RETURN_IF_ERROR(m.store.check_key(key));
  std::lock_guard<std::mutex> lk(m.mu);
  const int32_t slot = m.cache.find(key);
  if (slot >= 0) m.cache.set_pinned(slot, false);
  return {};
}

status runtime::evict(expert_key key) {
  std::shared_lock<std::shared_mutex> api(impl_->api_mu);
  impl& m = *impl_;
  PREGATED_RETURN_IF_ERROR(m.check_open());
  PREGATED_RETURN_IF_ERROR(m.store.check_key(key));
  std::lock_guard<std::mutex> lk(m.mu);
  const int32_t slot = m.cache.find(key);
  if (slot < 0) return {};
  const slot_info& s = m.cache.slot(slot);
  const std::string name = "layer " + std::to_string(key.layer) + " expert " +
                            std::to_string(key.expert);
  if (s.refs > 0) {
    return invalid_argument("cannot evict " + name + ": a MoE forward is using it");
  }
  if (s.pinned) return invalid_argument("cannot evict " + name + ": it is pinned; unpin it first");
  // A copy still in flight into this slot is ordered before any later copy into it.
  m.cache.clear(slot);
  ++m.stats.evictions;
  m.state_cv.notify_all();
  return {};
}

status runtime::wait_idle() {
  std::shared_lock<std::shared_mutex> api(impl_->api_mu);
  PREGATED_RETURN_IF_ERROR(impl_->check_open());
  std::unique_lock<std::mutex> lk(impl_->mu);
  return impl_->wait_idle_locked(lk);
}

// --- statistics --------------------------------------------------------------------------

std::unique_ptr<backend_event> runtime::impl::take_timer() {
  std::unique_ptr<backend_event> ev;
  if (!spare.empty()) {
    ev = std::move(spare.back());
    spare.pop_back();
    return ev;
  }
  if (!be->create_event(true, &ev)) return nullptr;
  return ev;
}

// Turns completed probe pairs into stall seconds (mu held). With `wait`, waits for all.
void runtime::impl::resolve_probes(bool wait) {
  size_t kept = 0;
  for (size_t i = 0; i < probes.size(); ++i) {
    stall_probe& p = probes[i];
    if (wait) be->wait_host(p.end.get());
    double seconds = 0;
    if (be->query(p.end.get()) && be->elapsed_seconds(p.start.get(), p.end.get(), &seconds)) {
      layer_stats& ls = stats.layers[static_cast<size_t>(p.layer)];
      ls.stall_seconds += seconds;
      spare.push_back(std::move(p.start));
      spare.push_back(std::move(p.end));
    } else {
      probes[kept++] = std::move(p);
    }
  }
  probes.resize(kept);
}

void runtime::impl::trace_timers(std::unique_ptr<backend_event>* start,
                                 std::unique_ptr<backend_event>* end) {
  if (!tracing) return;
  *start = take_timer();
  *end = take_timer();
  if (!*start || !*end) {
    start->reset();
    end->reset();
  }
}

status runtime::set_tracing(bool on) {
  std::shared_lock<std::shared_mutex> api(impl_->api_mu);
  impl& m = *impl_;
  PREGATED_RETURN_IF_ERROR(m.check_open());
  std::unique_lock<std::mutex> lk(m.mu);
  PREGATED_RETURN_IF_ERROR(m.wait_idle_locked(lk));
  m.traces.clear();
  m.tracing = on;
  if (!on) return {};
  if (!m.trace_base) PREGATED_RETURN_IF_ERROR(m.be->create_event(true, &m.trace_base));
  // The copy engine is idle now, so the base is recorded at about this moment.
  return m.be->record_copy(m.trace_base.get());
}

status runtime::trace(std::vector<trace_event>* out) {
  std::shared_lock<std::shared_mutex> api(impl_->api_mu);
  impl& m = *impl_;
  PREGATED_RETURN_IF_ERROR(m.check_open());
  std::unique_lock<std::mutex> lk(m.mu);
  PREGATED_RETURN_IF_ERROR(m.wait_idle_locked(lk));
  out->clear();
  if (!m.trace_base) return {};
  PREGATED_RETURN_IF_ERROR(m.be->wait_host(m.trace_base.get()));
  for (impl::trace_probe& p : m.traces) {
    PREGATED_RETURN_IF_ERROR(m.be->wait_host(p.end.get()));
    trace_event ev;
    ev.kind = p.kind;
    ev.layer = p.layer;
    ev.expert = p.expert;
    PREGATED_RETURN_IF_ERROR(m.be->elapsed_seconds(m.trace_base.get(), p.start.get(), &ev.start_s));
    PREGATED_RETURN_IF_ERROR(m.be->elapsed_seconds(m.trace_base.get(), p.end.get(), &ev.end_s));
    out->push_back(ev);
    m.spare.push_back(std::move(p.start));
    m.spare.push_back(std::move(p.end));
  }
  m.traces.clear();
  return {};
}

runtime_stats runtime::stats() {
  std::shared_lock<std::shared_mutex> api(impl_->api_mu);
  impl& m = *impl_;
  std::lock_guard<std::mutex> one(m.resident_mu);  // the order moe_forward_resident takes them in
  std::unique_lock<std::mutex> lk(m.mu);
  if (!m.closed) m.resolve_probes(/*wait=*/true);
  m.wait_routes_read(lk);
  runtime_stats out = m.stats;
  out.resident_workspace_bytes = static_cast<int64_t>(m.resident_ws_bytes);
  out.total = layer_stats{};
  for (const layer_stats& l : out.layers) {
    out.total.bytes_h2d += l.bytes_h2d;
    out.total.expert_hits += l.expert_hits;
    out.total.expert_misses += l.expert_misses;
    out.total.prefetch_issued += l.prefetch_issued;
    out.total.prefetch_used += l.prefetch_used;
    out.total.prefetch_dropped += l.prefetch_dropped;
    out.total.stall_seconds += l.stall_seconds;
    out.total.host_experts += l.host_experts;
    out.total.host_bytes += l.host_bytes;
    out.total.host_seconds += l.host_seconds;
    out.total.host_wait_seconds += l.host_wait_seconds;
    out.total.device_seconds += l.device_seconds;
    out.total.store_reads += l.store_reads;
    out.total.store_read_bytes += l.store_read_bytes;
    out.total.predicted_experts += l.predicted_experts;
    out.total.predicted_routed += l.predicted_routed;
    out.total.routed_after_prediction += l.routed_after_prediction;
  }
  out.hot_experts = m.hot_count;
  out.costs = m.costs;
  return out;
}

void runtime::reset_stats() {
  std::shared_lock<std::shared_mutex> api(impl_->api_mu);
  impl& m = *impl_;
  std::unique_lock<std::mutex> lk(m.mu);
  if (!m.closed) m.resolve_probes(/*wait=*/true);
  m.wait_routes_read(lk);
  for (std::vector<int32_t>& p : m.predicted_for) p.clear();  // scored from the next predictions on
  const size_t layers = m.stats.layers.size();
  m.stats = runtime_stats{};
  m.stats.layers.assign(layers, layer_stats{});
}

std::vector<slot_snapshot> runtime::slots() {
  std::shared_lock<std::shared_mutex> api(impl_->api_mu);
  impl& m = *impl_;
  std::lock_guard<std::mutex> lk(m.mu);
  std::vector<slot_snapshot> out;
  if (m.closed) return out;
  for (int32_t i = 0; i < m.cache.num_slots(); ++i) {
    const slot_info& s = m.cache.slot(i);
    const size_t k = static_cast<size_t>(s.key.layer) * static_cast<size_t>(m.cfg.num_experts) +
                     static_cast<size_t>(s.key.expert);
    const bool hot = s.state != slot_state::slot_state_empty && k < m.hot.size() && m.hot[k] != 0;
    out.push_back({i, s.key, s.state, s.refs, s.pinned, s.prefetched, hot});
  }
  return out;
}

status runtime::check(std::string* report) {
  std::shared_lock<std::shared_mutex> api(impl_->api_mu);
  impl& m = *impl_;
  PREGATED_RETURN_IF_ERROR(m.check_open());
  std::unique_lock<std::mutex> lk(m.mu);
  PREGATED_RETURN_IF_ERROR(m.wait_idle_locked(lk));
  std::string problems;
  auto bad = [&](int32_t slot, const std::string& what) {
    problems += "slot " + std::to_string(slot) + ": " + what + "\n";
  };
  std::vector<uint8_t> bytes(m.slot_bytes);
  for (int32_t i = 0; i < m.cache.num_slots(); ++i) {
    const slot_info& s = m.cache.slot(i);
    if (s.state == slot_state::slot_state_empty) {
      if (s.refs != 0 || s.pinned) bad(i, "empty but referenced or pinned");
      continue;
    }
    const std::string who = " (layer " + std::to_string(s.key.layer) + " expert " +
                            std::to_string(s.key.expert) + ")";
    if (!m.store.check_key(s.key)) { bad(i, "holds an invalid key" + who); continue; }
    if (m.cache.find(s.key) != i) bad(i, "not the slot the cache maps its key to" + who);
    if (s.refs != 0) bad(i, "still referenced by " + std::to_string(s.refs) + " forwards" + who);
    if (s.state != slot_state::slot_state_ready) {
      bad(i, std::string("not ready after all copies finished: ") + slot_state_name(s.state) + who);
      continue;
    }
    status st = m.be->download_sync(bytes.data(), m.slot_ptr(i), m.slot_bytes);
    if (!st) return st;
    if (std::memcmp(bytes.data(), m.store.expert(s.key), m.slot_bytes) != 0) {
      bad(i, "bytes differ from the host copy" + who);
    }
  }
  for (int32_t l = 0; l < m.cfg.num_layers; ++l) {
    for (int32_t e = 0; e < m.cfg.num_experts; ++e) {
      const int32_t slot = m.cache.find({l, e});
      if (slot >= 0 && !(m.cache.slot(slot).key == expert_key{l, e})) {
        problems += "layer " + std::to_string(l) + " expert " + std::to_string(e) +
                    " maps to slot " + std::to_string(slot) + " which holds another expert\n";
      }
    }
  }
  problems += m.cache.check_order();
  // The device slot table, once rebuilt, says what the cache says.
  for (int32_t l = 0; l < m.cfg.num_layers; ++l) PREGATED_RETURN_IF_ERROR(m.refresh_layer_table(l, nullptr));
  PREGATED_RETURN_IF_ERROR(m.be->synchronize(nullptr));
  std::vector<int32_t> want(m.table_host.size()), got(m.table_host.size());
  m.cache.ready_table(want.data());
  PREGATED_RETURN_IF_ERROR(m.be->download_sync(got.data(), m.slot_table, got.size() * sizeof(int32_t)));
  for (size_t i = 0; i < want.size(); ++i) {
    if (want[i] != got[i]) {
      problems += "device slot table: expert " + std::to_string(i) + " maps to slot " + std::to_string(got[i]) +
                  ", the cache to " + std::to_string(want[i]) + "\n";
    }
  }
  if (report != nullptr) *report = problems;
  if (!problems.empty()) return internal_error("expert cache check failed:\n" + problems);
  return {};
}

}  // namespace pregated
