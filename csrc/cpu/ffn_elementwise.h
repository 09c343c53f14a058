// The expert FFN's elementwise steps on the CPU, between and after its GEMMs: the activation of
// the gate/up output, the biases, and the routing-weighted sum of each token's expert outputs.
// Computed in float32 and rounded once to the data's dtype. Many rows are split over the current
// pool; AVX2 (+FMA, F16C) and portable paths, picked at run time (the portable path where the
// chosen kernels are "portable").
#pragma once

#include <cstdint>

#include "pregated/types.h"

namespace pregated::cpu {

// In place on `rows` rows (stride ld) of sp.dt: columns [0, I) become act(x), times the up half
// (columns [I, 2I)) for gated kinds.
void activate_rows(const expert_spec& sp, void* data, int64_t rows, int64_t ld);

// data[r, j] += bias[j] for `rows` rows of `width` (stride ld), in dt.
void add_bias_rows(dtype dt, void* data, int64_t rows, int64_t width, int64_t ld, const void* bias);

// out[t, :] = sum over k < top_k of weights[t, k] * y[row_of[t, k], :], `width` wide, in dt.
void combine_rows(dtype dt, void* out, const void* y, const int32_t* row_of, const float* weights, int64_t tokens,
                  int64_t top_k, int64_t width);

}  // namespace pregated::cpu
