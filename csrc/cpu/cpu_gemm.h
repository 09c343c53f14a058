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

// Several few-row products in one pass of the pool (a decode block's experts): for each item,
// C[m, n] = A[m, k] * B[n, k]^T with m <= small_rows_max (8), A and C in dt with their leading
// dimensions, B in dt with leading dimension k. The columns of all items are split over the
// pool's threads together, so small weights do not each pay a dispatch and a ramp-up.
struct rows_item {
  int64_t m;
  const void* a;
  int64_t lda;
  const void* b;
  void* c;
  int64_t ldc;
};
status gemm_nt_items(dtype dt, const rows_item* items, int64_t count, int64_t n, int64_t k);

// Name of the library doing the work, for build_info().
const char* blas_name();

}  // namespace pregated::cpu
