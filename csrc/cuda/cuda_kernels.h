// Small CUDA kernels of the MoE block: gather rows, bias, activation, weighted combine.
// Launchers enqueue on `stream` and return the launch error as a cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

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

}  // namespace pregated::cuda
