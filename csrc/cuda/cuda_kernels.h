// Small CUDA kernels of the MoE block: gather rows, bias, activation, weighted combine.
// Launchers enqueue on `stream` and return the launch error as a cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "pregated/backend.h"
#include "pregated/types.h"

namespace pregated::cuda {

cudaError_t launch_gather_rows(dtype dt, void* dst, const void* src, const int32_t* rows,
                               int64_t n_rows, int64_t width, cudaStream_t stream);
// In place on data[rows, ld], width = spec.intermediate (see backend::activate).
cudaError_t launch_activate(const expert_spec& spec, void* data, int64_t rows, int64_t ld,
                            cudaStream_t stream);
// data[r, j] += bias[j] for r < rows, j < width.
cudaError_t launch_add_bias(dtype dt, void* data, int64_t rows, int64_t width, int64_t ld,
                            const void* bias, cudaStream_t stream);
cudaError_t launch_combine(dtype dt, void* out, const void* y, const int32_t* row_of,
                           const float* weights, int64_t tokens, int64_t top_k, int64_t width,
                           cudaStream_t stream);

// The resident block's tables, for rows r < R = T * K (row r = token r / K): the pointers the
// batched GEMMs read (x row, up weights, activation row, down weights, output row) and the
// bias pointers, from the expert ids and the layer's device slot table (an expert without a
// slot: its block in the expert store, read in place); row_of[r] = r.
struct resident_tables {
  const void** x;
  const void** w_up;
  void** act;
  const void** w_down;
  void** y;
  const void** b_up;
  const void** b_down;
  int32_t* row_of;
};
cudaError_t launch_resident_tables(const expert_spec& sp, const expert_places& at, const void* x, const int32_t* ids,
                                   int64_t rows, int64_t top_k, uint8_t* act, uint8_t* y,
                                   resident_tables t, cudaStream_t stream);
// C[m, n] = A[m, k] * dequantize(B)[n, k]^T for m <= 8 (one block per row of B, codes read once).
cudaError_t launch_quantized_gemv(dtype dt, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
                                  const quantized_matrix& b, void* c, int64_t ldc, cudaStream_t stream);
// The resident path's quantized GEMVs: for every row r, c_r[n] = a_r[k] * dequantize(B_r)[n, k]^T,
// where B_r is `layout` (a weight's view of an expert block at address 0, from quantized_part)
// moved to the block whose codes start at w[r]; a, w and c are device arrays of R pointers.
cudaError_t launch_quantized_rows(dtype dt, int64_t rows, int64_t n, int64_t k, const void* const* a,
                                  const void* const* w, const quantized_matrix& layout, void* const* c,
                                  cudaStream_t stream);
// dst[n, k] (dt) = dequantize(B).
cudaError_t launch_dequantize(dtype dt, const quantized_matrix& b, int64_t n, int64_t k, void* dst,
                              cudaStream_t stream);
// data_r[j] += bias_r[j] for rows r, j < width; row r at data + r * ld (elements).
cudaError_t launch_add_row_bias(dtype dt, void* data, int64_t rows, int64_t width, int64_t ld,
                                const void* const* bias, cudaStream_t stream);

}  // namespace pregated::cuda
