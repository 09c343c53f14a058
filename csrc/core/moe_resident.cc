// The resident path of a MoE block, and its launch shared with the device path: the
// (token, expert) rows find their experts through the device slot table, and nothing is asked of
// the host. On the resident path every expert of the layer is pinned and loaded; on the device
// path (moe_device.cc) an expert in no ready slot is read in place from the expert store.
// T = tokens, K = experts per token, R = T * K rows.
#include <string>

#include "runtime_impl.h"

namespace pregated {

size_t resident_workspace_bytes(const expert_spec& sp, int64_t rows) {
  auto up = [](size_t n) { return (n + 255) & ~size_t{255}; };
  const size_t esz = dtype_size(sp.dt), R = static_cast<size_t>(rows);
  return up(R * static_cast<size_t>(sp.up_rows()) * esz)   // activations [R, U]
         + up(R * static_cast<size_t>(sp.hidden) * esz)    // expert outputs [R, H]
         + up(R * 8 * sizeof(void*))                        // pointer tables of the batched GEMMs
         + up(R * sizeof(int32_t));                         // rows of each token (combine)
}

status runtime::impl::refresh_layer_table(int32_t layer, void* stream) {
  uint64_t& built = layer_version[static_cast<size_t>(layer)];
  if (built == cache.version()) return {};
  const size_t E = static_cast<size_t>(cfg.num_experts);
  int32_t* row = table_host.data() + static_cast<size_t>(layer) * E;
  bool same = built != 0;  // 0: never uploaded (the device's copy is undefined)
  for (size_t e = 0; e < E; ++e) {
    const int32_t slot = cache.find({layer, static_cast<int32_t>(e)});
    const int32_t want = slot >= 0 && cache.slot(slot).state == slot_state::slot_state_ready ? slot : -1;
    same = same && row[e] == want;
    row[e] = want;
    if (want >= 0) table_layer[static_cast<size_t>(want)] = layer;
  }
  if (!same) PREGATED_RETURN_IF_ERROR(be->upload(slot_table + static_cast<size_t>(layer) * E, row, E * sizeof(int32_t), stream));
  built = cache.version();
  return {};
}

status runtime::impl::grow_resident_workspace(int64_t rows, void* stream) {
  const size_t need = resident_workspace_bytes(cfg.spec, rows);
  if (need <= resident_ws_bytes) return {};  // grows to the largest block seen; never per call after that
  PREGATED_RETURN_IF_ERROR(be->synchronize(stream));
  if (resident_ws != nullptr) be->free_device(resident_ws);
  resident_ws = nullptr;
  resident_ws_bytes = 0;
  PREGATED_RETURN_IF_ERROR(be->alloc_device(need, &resident_ws));
  resident_ws_bytes = need;
  return {};
}

status runtime::reserve_resident(int64_t rows, int64_t* workspace_bytes) {
  std::shared_lock<std::shared_mutex> api(impl_->api_mu);
  impl& m = *impl_;
  PREGATED_RETURN_IF_ERROR(m.check_open());
  if (rows < 0) return invalid_argument("reserve_resident: rows must be >= 0, got " + std::to_string(rows));
  std::lock_guard<std::mutex> one(m.resident_mu);
  PREGATED_RETURN_IF_ERROR(m.grow_resident_workspace(rows, nullptr));
  *workspace_bytes = static_cast<int64_t>(m.resident_ws_bytes);
  return {};
}

status runtime::impl::launch_resident(std::unique_lock<std::mutex>& lk, const resident_args& a, bool at_store,
                                      int32_t note) {
  const size_t l = static_cast<size_t>(a.layer);
  const size_t E = static_cast<size_t>(cfg.num_experts);
  status refreshed = refresh_layer_table(a.layer, a.stream);
  if (!refreshed) {
    if (note >= 0) free_notes.push_back(note);
    return refreshed;
  }
  if (note >= 0) {
    route_note& n = notes[static_cast<size_t>(note)];
    n.layer = a.layer;
    n.tokens = a.tokens;
    n.top_k = a.top_k;
    n.next_layer = a.next_layer;
    n.num_next = a.next_ids != nullptr ? a.num_next : 0;
    const int32_t* row = table_host.data() + l * E;
    n.table.assign(row, row + E);
  }
  std::unique_ptr<backend_event> c0, c1;  // the block's kernels on a timeline (one interval, expert -1)
  trace_timers(&c0, &c1);
  ++launching[l];
  lk.unlock();
  const int64_t R = a.tokens * a.top_k;
  status st;
  if (note >= 0) {
    // The routing leaves ahead of the block's kernels, so the route reader can prefetch while they run.
    route_note& n = notes[static_cast<size_t>(note)];
    st = be->download(n.ids, a.ids, static_cast<size_t>(R) * sizeof(int32_t), a.stream);
    if (st.is_ok() && n.num_next > 0) {
      st = be->download(n.next, a.next_ids, static_cast<size_t>(n.num_next) * sizeof(int32_t), a.stream);
    }
    if (st.is_ok()) st = be->record(n.known.get(), a.stream);
    lk.lock();
    if (st.is_ok()) {
      routes.push_back(note);
      route_cv.notify_one();
    } else {
      free_notes.push_back(note);
    }
    lk.unlock();
  }
  if (st.is_ok()) st = grow_resident_workspace(R, a.stream);
  if (st.is_ok()) {
    expert_places at;
    at.slab = slab;
    at.slot_bytes = slot_bytes;
    at.slot_of = slot_table + l * E;
    at.store = at_store ? store_at[l] : nullptr;
    at.expert_bytes = store.expert_bytes();
    if (c0) st = be->record(c0.get(), a.stream);
    if (st.is_ok()) {
      st = be->expert_ffn_resident(cfg.spec, at, a.x, a.ids, a.weights, a.tokens, a.top_k, a.out, resident_ws, a.stream);
    }
    if (st.is_ok() && c1) st = be->record(c1.get(), a.stream);
  }
  // Recorded even after a failure: kernels may have been launched. Not on the resident path,
  // whose slots are pinned (never copied into while pinned) and whose blocks a CUDA graph may be
  // capturing: an event recorded in a capture must not be waited for by the copy stream.
  status read = at_store ? be->record(layer_read[l].get(), a.stream) : status{};
  lk.lock();
  if (st.is_ok() && c0 && c1) traces.push_back({trace_event::kind_t::kind_compute, a.layer, -1, std::move(c0), std::move(c1)});
  --launching[l];
  state_cv.notify_all();
  return st.is_ok() ? read : st;
}

status runtime::moe_forward_resident(const resident_args& a) {
  std::shared_lock<std::shared_mutex> api(impl_->api_mu);
  impl& m = *impl_;
  PREGATED_RETURN_IF_ERROR(m.check_open());
  PREGATED_RETURN_IF_ERROR(m.check_layer(a.layer, "moe_forward_resident"));
  if (a.tokens < 0 || a.top_k < 1 || a.top_k > m.cfg.num_experts) {
    return invalid_argument("moe_forward_resident: need tokens >= 0 and 1 <= top_k <= " +
                            std::to_string(m.cfg.num_experts) + ", got tokens=" + std::to_string(a.tokens) +
                            " top_k=" + std::to_string(a.top_k));
  }
  if (m.cfg.spec.quantized() && a.tokens * a.top_k > resident_quantized_rows_max) {
    return invalid_argument("moe_forward_resident: " + std::to_string(a.tokens * a.top_k) + " (token, expert) rows of " +
                            std::string(weight_format_name(m.cfg.spec.format)) + " experts; the resident path takes up to " +
                            std::to_string(resident_quantized_rows_max) + " (its kernels read an expert's codes per "
                            "row): run larger blocks through moe_forward");
  }
  if (a.tokens == 0) return {};
  if (a.x == nullptr || a.out == nullptr || a.ids == nullptr || a.weights == nullptr) {
    return invalid_argument("moe_forward_resident: x, out, ids and weights must all be given");
  }
  std::lock_guard<std::mutex> one(m.resident_mu);
  std::unique_lock<std::mutex> lk(m.mu);
  if (!m.failure.is_ok()) return m.failure;
  if (!m.cache.layer_resident(a.layer)) {
    return invalid_argument("moe_forward_resident: not every expert of layer " + std::to_string(a.layer) +
                            " is resident (pinned and loaded); pin them all, or use moe_forward");
  }
  ++m.stats.forwards;
  ++m.stats.resident_forwards;
  return m.launch_resident(lk, a, /*at_store=*/false, /*note=*/-1);
}

status runtime::slot_table(std::vector<int32_t>* out) {
  std::shared_lock<std::shared_mutex> api(impl_->api_mu);
  impl& m = *impl_;
  PREGATED_RETURN_IF_ERROR(m.check_open());
  {
    std::lock_guard<std::mutex> lk(m.mu);
    for (int32_t l = 0; l < m.cfg.num_layers; ++l) PREGATED_RETURN_IF_ERROR(m.refresh_layer_table(l, nullptr));
  }
  PREGATED_RETURN_IF_ERROR(m.be->synchronize(nullptr));
  out->assign(m.table_host.size(), -1);
  return m.be->download_sync(out->data(), m.slot_table, out->size() * sizeof(int32_t));
}

}  // namespace pregated
