// GEMM of the CPU backend: C[m, n] = A[m, k] * B[n, k]^T through OpenBLAS's sgemm.
#pragma once

#include <cstdint>

#include "pregated/backend.h"
#include "pregated/status.h"
#include "pregated/types.h"

namespace pregated::cpu {

status gemm_nt(dtype dt, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
               const void* b, int64_t ldb, void* c, int64_t ldc);

// The same with B quantized (see quantized_matrix).
status gemm_nt_quantized(dtype dt, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
                         const quantized_matrix& b, void* c, int64_t ldc);

// Name of the library doing the work, for build_info().
const char* blas_name();

}  // namespace pregated::cpu
