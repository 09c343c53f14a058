// One expert's FFN through a backend's primitives: the device lane runs it on a slot, the host
// lane on the expert store.
#include "pregated/backend.h"

namespace pregated {

status expert_ffn(backend& be, const expert_spec& sp, const uint8_t* w, const void* x, int64_t n,
                  void* act, void* y, void* stream) {
  const dtype dt = sp.dt;
  const int64_t H = sp.hidden, I = sp.intermediate, U = sp.up_rows();
  if (sp.quantized()) {
    PREGATED_RETURN_IF_ERROR(be.gemm_nt_quantized(dt, n, U, H, x, H, quantized_part(sp, w, 0), act, U, stream));
  } else {
    PREGATED_RETURN_IF_ERROR(be.gemm_nt(dt, n, U, H, x, H, w, H, act, U, stream));
  }
  if (sp.has_bias) {  // gate and up biases are adjacent, like their rows
    PREGATED_RETURN_IF_ERROR(be.add_bias(dt, act, n, U, U, w + sp.part_offset(sp.first_bias_part()), stream));
  }
  PREGATED_RETURN_IF_ERROR(be.activate(sp, act, n, U, stream));
  if (sp.quantized()) {
    PREGATED_RETURN_IF_ERROR(
        be.gemm_nt_quantized(dt, n, H, I, act, U, quantized_part(sp, w, sp.down_part()), y, H, stream));
  } else {
    PREGATED_RETURN_IF_ERROR(be.gemm_nt(dt, n, H, I, act, U, w + sp.part_offset(sp.down_part()), I, y, H, stream));
  }
  if (sp.has_bias) {
    PREGATED_RETURN_IF_ERROR(be.add_bias(dt, y, n, H, H, w + sp.part_offset(sp.num_parts() - 1), stream));
  }
  return {};
}

}  // namespace pregated
