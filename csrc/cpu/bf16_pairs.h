// bf16 GEMMs of more rows than a decode on AVX-512 BF16 without AMX tiles (prefill): B's columns
// are repacked as pairs of k ([k/2][64 columns] 32-bit words: a 16 x 16 transpose of the words
// each column already is), so that one vdpbf16ps multiplies a broadcast pair of A by 16 columns,
// and a block of 6 rows x 64 columns of fp32 sums stays in registers over all of k.
#pragma once

#include <cstdint>
#include <vector>

namespace pregated::cpu {

// A [m, k] bf16 (row stride lda) as pairs of k: [m][(k + 1) / 2] 32-bit words, zero-padded.
std::vector<uint32_t> bf16_pairs_of(int64_t m, int64_t k, const uint16_t* a, int64_t lda);

// C[i, j] = sum_t A[i, t] B[j, t] in fp32 (row stride ldc) for i < m and j in [j0, j1); `a` from
// bf16_pairs_of, B [n, k] bf16 with row stride ldb. Needs AVX-512 BF16 (bf16dot_chosen()).
void bf16_pairs_gemm(int64_t m, int64_t k, const uint32_t* a, const uint16_t* b, int64_t ldb, int64_t j0,
                     int64_t j1, float* c, int64_t ldc);

}  // namespace pregated::cpu
