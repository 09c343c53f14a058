// Few-row GEMM (decode): C[m, j] = A[m, k] . B[j, k] for m <= 8 and columns j in [j0, j1).
// B, the expert's weight, is read once in its own precision (fp32, bf16 or fp16) and widened in
// registers; A is fp32. AVX-512 BF16 (bf16 weights: A rounded to bf16, vdpbf16ps), AVX-512, AVX2
// (+FMA, F16C) and portable paths, picked at run time.
#pragma once

#include <cstdint>

#include "pregated/types.h"

namespace pregated::cpu {

constexpr int64_t small_rows_max = 8;

void small_rows(dtype dt, int64_t m, int64_t k, const float* a, const void* b, int64_t ldb,
                int64_t j0, int64_t j1, float* c, int64_t ldc);

// Which path small_rows takes on this CPU: "amx", "avx512bf16", "avx512", "avx2" or "portable".
// "amx": bf16 GEMMs of two rows or more whose k is whole 32s go to amx_rows (the callers pick
// it), the rest as "avx512bf16".
const char* small_rows_isa();
bool amx_chosen();
// Whether bf16 weights go through vdpbf16ps here (AVX-512 BF16, with or without AMX).
bool bf16dot_chosen();
// Whether the chosen path is one of the AVX-512 ones ("avx512" and up: AVX-512F/BW/VL present).
bool avx512_chosen();

// For tests: force a path (one of the names above); false when this CPU cannot run it.
bool small_rows_force(const char* isa);

}  // namespace pregated::cpu
