// The CPU backend's kernels for quantized expert weights: few rows of A (decode) against codes
// read once, as sum over groups of scale * (A . codes - zero * sum(A)); and dequantization of
// weight rows into fp32 (prefill, before sgemm). AVX2 and portable paths, picked at run time.
#pragma once

#include <cstdint>

#include "pregated/backend.h"

namespace pregated::cpu {

// a_sums[i * groups + g]: the sum of A's row i over group g (computed once per GEMM).
void quantized_group_sums(int64_t m, int64_t k, const float* a, int64_t group, int64_t groups, float* a_sums);

// C[i, j] for i < m (<= 8) and j in [j0, j1): A [m, k] fp32 compact.
void quantized_rows(int64_t m, int64_t k, const float* a, const float* a_sums, const quantized_matrix& b,
                    int64_t j0, int64_t j1, float* c, int64_t ldc);

// dst[(j - j0) * k + c] = dequantize(B)[j, c] for j in [j0, j1).
void dequantize_rows(const quantized_matrix& b, int64_t k, int64_t j0, int64_t j1, float* dst);

}  // namespace pregated::cpu
