// Every CUDA and cuBLAS call goes through these: a failure becomes a status naming the call,
// the file and the line.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

#include "pregated/status.h"

namespace pregated::cuda {

inline status cuda_status(cudaError_t err, const char* call, const char* file, int line) {
  if (err == cudaSuccess) return {};
  const status_code code = err == cudaErrorMemoryAllocation ? status_code::status_code_out_of_memory
                                                            : status_code::status_code_internal;
  return {code, std::string(call) + " failed: " + cudaGetErrorString(err) + " (" + file + ":" +
                    std::to_string(line) + ")"};
}

inline status cublas_status(cublasStatus_t err, const char* call, const char* file, int line) {
  if (err == CUBLAS_STATUS_SUCCESS) return {};
  return {status_code::status_code_internal, std::string(call) + " failed: cuBLAS status " +
                                                 std::to_string(static_cast<int>(err)) + " (" +
                                                 file + ":" + std::to_string(line) + ")"};
}

}  // namespace pregated::cuda

#define PREGATED_CUDA_CHECK(expr) \
  PREGATED_RETURN_IF_ERROR(::pregated::cuda::cuda_status((expr), #expr, __FILE__, __LINE__))
#define PREGATED_CUBLAS_CHECK(expr) \
  PREGATED_RETURN_IF_ERROR(::pregated::cuda::cublas_status((expr), #expr, __FILE__, __LINE__))
