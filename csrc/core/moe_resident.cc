// The resident path of a MoE block: every expert of the layer is pinned and loaded, so the
// (token, expert) rows find their slots through the device slot table and nothing is asked of
// the host. T = tokens, K = experts per token, R = T * K rows.
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

status runtime::impl::refresh_slot_table(void* stream) {
  if (table_version == cache.version()) return {};
  cache.ready_table(table_host.data());
  PREGATED_RETURN_IF_ERROR(be->upload(slot_table, table_host.data(), table_host.size() * sizeof(int32_t), stream));
  table_version = cache.version();
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
  const int64_t R = a.tokens * a.top_k;
  {
    std::lock_guard<std::mutex> lk(m.mu);
    if (!m.failure.is_ok()) return m.failure;
    if (!m.cache.layer_resident(a.layer)) {
      return invalid_argument("moe_forward_resident: not every expert of layer " + std::to_string(a.layer) +
                              " is resident (pinned and loaded); pin them all, or use moe_forward");
    }
    PREGATED_RETURN_IF_ERROR(m.refresh_slot_table(a.stream));
    ++m.stats.forwards;
    ++m.stats.resident_forwards;
  }
  PREGATED_RETURN_IF_ERROR(m.grow_resident_workspace(R, a.stream));
  const int32_t* slot_of = m.slot_table + static_cast<size_t>(a.layer) * static_cast<size_t>(m.cfg.num_experts);
  return m.be->expert_ffn_resident(m.cfg.spec, m.slab, m.slot_bytes, slot_of, a.x, a.ids, a.weights,
                                   a.tokens, a.top_k, a.out, m.resident_ws, a.stream);
}

status runtime::slot_table(std::vector<int32_t>* out) {
  std::shared_lock<std::shared_mutex> api(impl_->api_mu);
  impl& m = *impl_;
  PREGATED_RETURN_IF_ERROR(m.check_open());
  out->assign(m.table_host.size(), -1);
  return m.be->download_sync(out->data(), m.slot_table, out->size() * sizeof(int32_t));
}

}  // namespace pregated
