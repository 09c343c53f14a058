// The attention of a few new rows (decode) on the host, as transformers' Llama-style attention
// computes it: rotary embedding of the query and key heads, then each query head against its
// key/value head group (grouped-query attention), causal over the new rows, softmax in float32.
// One call each replaces a dozen tensor ops of the Python version per layer (rotate_half, the
// multiplies, the transposes, the SDPA wrapper).
#pragma once

#include <cstdint>

#include "pregated/backend.h"
#include "pregated/types.h"

namespace pregated::cpu {

// In place on rows [rows, width] (dt): the first `heads` heads of d elements of each row turn by
// the row's cos/sin [rows, d] (dt) as transformers' rotate_half convention has it:
// x * cos + rotate_half(x) * sin, each product and the sum rounded to dt as PyTorch's ops do.
void rope_rows(dtype dt, int64_t rows, int64_t width, int64_t heads, int64_t d, void* x, const void* cos,
               const void* sin);

// out[b * new + l, h * d ...] = softmax(scale * q . k[b, h / group, :limit]) . v[b, h / group, :limit],
// with q the first q_heads * d elements of row b * new + l of q (row stride q_width), k and v
// [batch, kv_heads, keys, d] (head (b, g) starting at b * batch_stride + g * head_stride of its
// kv_layout, its keys contiguous rows of d), limit = keys - new + l + 1 (causal over the new
// rows). All in dt; float32 inside. Many (row, head) pairs go over the current pool.
void attention_rows(dtype dt, int64_t batch, int64_t new_rows, int64_t q_heads, int64_t kv_heads, int64_t keys,
                    int64_t d, const void* q, int64_t q_width, const void* k, kv_layout k_layout, const void* v,
                    kv_layout v_layout, float scale, void* out);

// For tests: true forces the portable paths, false restores the best this CPU has.
void decode_attention_force_portable(bool portable);

}  // namespace pregated::cpu
