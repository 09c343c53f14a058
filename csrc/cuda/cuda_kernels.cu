#include "cuda_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace pregated::cuda {

namespace {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// One block per packed row; rows are copied as 16-byte words when the width allows.
__global__ void gather_rows_kernel(uint8_t* dst, const uint8_t* src, const int32_t* rows,
                                   int64_t row_bytes) {
  const int64_t r = blockIdx.x;
  const uint8_t* in = src + static_cast<int64_t>(rows[r]) * row_bytes;
  uint8_t* out = dst + r * row_bytes;
  if (row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(in) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(out) % 16 == 0) {
    const int4* in4 = reinterpret_cast<const int4*>(in);
    int4* out4 = reinterpret_cast<int4*>(out);
    for (int64_t i = threadIdx.x; i < row_bytes / 16; i += blockDim.x) out4[i] = in4[i];
  } else {
    for (int64_t i = threadIdx.x; i < row_bytes; i += blockDim.x) out[i] = in[i];
  }
}

// act(x) of every kind but gated_swiglu_oai (see activate_kernel).
template <int Kind>
__device__ __forceinline__ float activation(float x) {
  constexpr auto k = static_cast<ffn_kind>(Kind);
  if constexpr (k == ffn_kind::ffn_kind_gated_silu || k == ffn_kind::ffn_kind_silu) {
    return x / (1.0f + __expf(-x));
  } else if constexpr (k == ffn_kind::ffn_kind_relu || k == ffn_kind::ffn_kind_gated_relu) {
    return fmaxf(x, 0.0f);
  } else if constexpr (k == ffn_kind::ffn_kind_relu2) {
    return x > 0.0f ? x * x : 0.0f;
  } else if constexpr (k == ffn_kind::ffn_kind_gated_gelu_tanh || k == ffn_kind::ffn_kind_gelu_tanh) {
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
  } else {
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
  }
}

template <typename T, int Kind, bool Gated>
__global__ void activate_kernel(T* data, int64_t rows, int64_t width, int64_t ld, float alpha,
                                float limit) {
  const int64_t total = rows * width;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / width, j = i % width;
    T* row = data + r * ld;
    float v;
    if constexpr (static_cast<ffn_kind>(Kind) == ffn_kind::ffn_kind_gated_swiglu_oai) {
      const float g = fminf(to_f32(row[j]), limit);
      const float u = fmaxf(fminf(to_f32(row[width + j]), limit), -limit);
      v = (u + 1.0f) * g / (1.0f + __expf(-alpha * g));
    } else if constexpr (static_cast<ffn_kind>(Kind) == ffn_kind::ffn_kind_gated_silu_clamped) {
      const float g = fminf(to_f32(row[j]), limit);
      const float u = fmaxf(fminf(to_f32(row[width + j]), limit), -limit);
      v = g / (1.0f + __expf(-g)) * u;
    } else {
      v = activation<Kind>(to_f32(row[j]));
      if constexpr (Gated) v *= to_f32(row[width + j]);
    }
    row[j] = from_f32<T>(v);
  }
}

template <typename T>
__global__ void add_bias_kernel(T* data, int64_t rows, int64_t width, int64_t ld, const T* bias) {
  const int64_t total = rows * width;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / width, j = i % width;
    data[r * ld + j] = from_f32<T>(to_f32(data[r * ld + j]) + to_f32(bias[j]));
  }
}

template <typename T>
__global__ void combine_kernel(T* out, const T* y, const int32_t* row_of, const float* weights,
                               int64_t top_k, int64_t width) {
  const int64_t t = blockIdx.y;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < width;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = 0.0f;
    for (int64_t k = 0; k < top_k; ++k) {
      acc += weights[t * top_k + k] * to_f32(y[static_cast<int64_t>(row_of[t * top_k + k]) * width + c]);
    }
    out[t * width + c] = from_f32<T>(acc);
  }
}

int grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

template <typename T, int Kind>
void launch_kind(T* data, int64_t rows, int64_t width, int64_t ld, float alpha, float limit,
                 cudaStream_t stream) {
  const int threads = 256;
  constexpr bool gated = Kind == 0 || Kind == 1 || Kind == 4 || Kind == 5 || Kind == 6 || Kind == 10;
  activate_kernel<T, Kind, gated><<<grid_for(rows * width, threads), threads, 0, stream>>>(
      data, rows, width, ld, alpha, limit);
}

template <typename T>
cudaError_t activate_typed(const expert_spec& sp, T* data, int64_t rows, int64_t ld,
                           cudaStream_t stream) {
  const int64_t w = sp.intermediate;
  const float a = sp.alpha, l = sp.limit;
  switch (sp.kind) {
    case ffn_kind::ffn_kind_gated_silu: launch_kind<T, 0>(data, rows, w, ld, a, l, stream); break;
    case ffn_kind::ffn_kind_gated_gelu: launch_kind<T, 1>(data, rows, w, ld, a, l, stream); break;
    case ffn_kind::ffn_kind_relu: launch_kind<T, 2>(data, rows, w, ld, a, l, stream); break;
    case ffn_kind::ffn_kind_gelu: launch_kind<T, 3>(data, rows, w, ld, a, l, stream); break;
    case ffn_kind::ffn_kind_gated_gelu_tanh: launch_kind<T, 4>(data, rows, w, ld, a, l, stream); break;
    case ffn_kind::ffn_kind_gated_relu: launch_kind<T, 5>(data, rows, w, ld, a, l, stream); break;
    case ffn_kind::ffn_kind_gated_swiglu_oai: launch_kind<T, 6>(data, rows, w, ld, a, l, stream); break;
    case ffn_kind::ffn_kind_silu: launch_kind<T, 7>(data, rows, w, ld, a, l, stream); break;
    case ffn_kind::ffn_kind_gelu_tanh: launch_kind<T, 8>(data, rows, w, ld, a, l, stream); break;
    case ffn_kind::ffn_kind_relu2: launch_kind<T, 9>(data, rows, w, ld, a, l, stream); break;
    case ffn_kind::ffn_kind_gated_silu_clamped: launch_kind<T, 10>(data, rows, w, ld, a, l, stream); break;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t add_bias_typed(T* data, int64_t rows, int64_t width, int64_t ld, const T* bias,
                           cudaStream_t stream) {
  const int threads = 256;
  add_bias_kernel<T><<<grid_for(rows * width, threads), threads, 0, stream>>>(data, rows, width, ld, bias);
  return cudaGetLastError();
}

template <typename T>
cudaError_t combine_typed(T* out, const T* y, const int32_t* row_of, const float* weights,
                          int64_t tokens, int64_t top_k, int64_t width, cudaStream_t stream) {
  const int threads = 256;
  // grid.y is limited to 65535 tokens per launch.
  for (int64_t t0 = 0; t0 < tokens; t0 += 65535) {
    const int64_t nt = tokens - t0 < 65535 ? tokens - t0 : 65535;
    dim3 grid(grid_for(width, threads), static_cast<unsigned>(nt));
    combine_kernel<T><<<grid, threads, 0, stream>>>(out + t0 * width, y, row_of + t0 * top_k,
                                                    weights + t0 * top_k, top_k, width);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gather_rows(dtype dt, void* dst, const void* src, const int32_t* rows,
                               int64_t n_rows, int64_t width, cudaStream_t stream) {
  const int64_t row_bytes = width * static_cast<int64_t>(dtype_size(dt));
  for (int64_t r0 = 0; r0 < n_rows; r0 += 65535 * 32) {
    const int64_t n = n_rows - r0 < 65535 * 32 ? n_rows - r0 : 65535 * 32;
    gather_rows_kernel<<<static_cast<unsigned>(n), 128, 0, stream>>>(
        static_cast<uint8_t*>(dst) + r0 * row_bytes, static_cast<const uint8_t*>(src),
        rows + r0, row_bytes);
  }
  return cudaGetLastError();
}

cudaError_t launch_activate(const expert_spec& sp, void* data, int64_t rows, int64_t ld,
                            cudaStream_t stream) {
  switch (sp.dt) {
    case dtype::dtype_f32: return activate_typed(sp, static_cast<float*>(data), rows, ld, stream);
    case dtype::dtype_f16: return activate_typed(sp, static_cast<__half*>(data), rows, ld, stream);
    case dtype::dtype_bf16: return activate_typed(sp, static_cast<__nv_bfloat16*>(data), rows, ld, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_add_bias(dtype dt, void* data, int64_t rows, int64_t width, int64_t ld,
                            const void* bias, cudaStream_t stream) {
  switch (dt) {
    case dtype::dtype_f32:
      return add_bias_typed(static_cast<float*>(data), rows, width, ld, static_cast<const float*>(bias), stream);
    case dtype::dtype_f16:
      return add_bias_typed(static_cast<__half*>(data), rows, width, ld, static_cast<const __half*>(bias), stream);
    case dtype::dtype_bf16:
      return add_bias_typed(static_cast<__nv_bfloat16*>(data), rows, width, ld,
                            static_cast<const __nv_bfloat16*>(bias), stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_combine(dtype dt, void* out, const void* y, const int32_t* row_of,
                           const float* weights, int64_t tokens, int64_t top_k, int64_t width,
                           cudaStream_t stream) {
  switch (dt) {
    case dtype::dtype_f32:
      return combine_typed(static_cast<float*>(out), static_cast<const float*>(y), row_of, weights,
                           tokens, top_k, width, stream);
    case dtype::dtype_f16:
      return combine_typed(static_cast<__half*>(out), static_cast<const __half*>(y), row_of,
                           weights, tokens, top_k, width, stream);
    case dtype::dtype_bf16:
      return combine_typed(static_cast<__nv_bfloat16*>(out), static_cast<const __nv_bfloat16*>(y),
                           row_of, weights, tokens, top_k, width, stream);
  }
  return cudaErrorInvalidValue;
}

namespace {

__global__ void resident_tables_kernel(expert_places at, const uint8_t* x, const int32_t* ids, int64_t rows, int64_t top_k,
                                       size_t x_row, size_t up_off, size_t down_off, size_t b_up_off,
                                       size_t b_down_off, bool bias, uint8_t* act, size_t act_row,
                                       uint8_t* y, size_t y_row, resident_tables t) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  const uint8_t* w = at.expert(ids[r], at.slot_of[ids[r]]);
  t.x[r] = x + static_cast<size_t>(r / top_k) * x_row;
  t.w_up[r] = w + up_off;
  t.act[r] = act + static_cast<size_t>(r) * act_row;
  t.w_down[r] = w + down_off;
  t.y[r] = y + static_cast<size_t>(r) * y_row;
  t.b_up[r] = bias ? w + b_up_off : nullptr;
  t.b_down[r] = bias ? w + b_down_off : nullptr;
  t.row_of[r] = static_cast<int32_t>(r);
}

template <typename T>
__global__ void add_row_bias_kernel(T* data, int64_t rows, int64_t width, int64_t ld, const void* const* bias) {
  const int64_t total = rows * width;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / width, j = i % width;
    const T* b = static_cast<const T*>(bias[r]);
    data[r * ld + j] = from_f32<T>(to_f32(data[r * ld + j]) + to_f32(b[j]));
  }
}

}  // namespace

cudaError_t launch_resident_tables(const expert_spec& sp, const expert_places& at, const void* x, const int32_t* ids,
                                   int64_t rows, int64_t top_k, uint8_t* act, uint8_t* y,
                                   resident_tables t, cudaStream_t stream) {
  const size_t esz = dtype_size(sp.dt);
  const int threads = 128;
  resident_tables_kernel<<<grid_for(rows, threads), threads, 0, stream>>>(
      at, static_cast<const uint8_t*>(x), ids, rows, top_k,
      static_cast<size_t>(sp.hidden) * esz, sp.part_offset(0), sp.part_offset(sp.down_part()),
      sp.has_bias ? sp.part_offset(sp.first_bias_part()) : 0, sp.has_bias ? sp.part_offset(sp.num_parts() - 1) : 0,
      sp.has_bias, act, static_cast<size_t>(sp.up_rows()) * esz, y, static_cast<size_t>(sp.hidden) * esz, t);
  return cudaGetLastError();
}

cudaError_t launch_add_row_bias(dtype dt, void* data, int64_t rows, int64_t width, int64_t ld,
                                const void* const* bias, cudaStream_t stream) {
  const int threads = 256;
  const int grid = grid_for(rows * width, threads);
  switch (dt) {
    case dtype::dtype_f32:
      add_row_bias_kernel<float><<<grid, threads, 0, stream>>>(static_cast<float*>(data), rows, width, ld, bias);
      break;
    case dtype::dtype_f16:
      add_row_bias_kernel<__half><<<grid, threads, 0, stream>>>(static_cast<__half*>(data), rows, width, ld, bias);
      break;
    case dtype::dtype_bf16:
      add_row_bias_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>(static_cast<__nv_bfloat16*>(data), rows,
                                                                      width, ld, bias);
      break;
  }
  return cudaGetLastError();
}

namespace {

__device__ __forceinline__ float code_at(const uint8_t* row, int bits, int64_t c) {
  if (bits == 8) return static_cast<float>(row[c]);
  if (bits == 3) {
    const uint8_t* u = row + 3 * (c / 8);
    const uint32_t word = u[0] | (static_cast<uint32_t>(u[1]) << 8) | (static_cast<uint32_t>(u[2]) << 16);
    return static_cast<float>((word >> (3 * (c % 8))) & 7u);
  }
  const int per = 8 / bits;
  return static_cast<float>((row[c / per] >> (bits * (c % per))) & ((1u << bits) - 1));
}

__device__ __forceinline__ float weight_at(const quantized_matrix& b, int64_t j, int64_t c) {
  const int64_t g = j * b.groups + c / b.group_size;
  const float s = __half2float(__ushort_as_half(b.scales[g])), z = __half2float(__ushort_as_half(b.zeros[g]));
  return (code_at(b.codes + j * b.row_bytes, b.bits, c) - z) * s;
}

template <typename T>
__global__ void quantized_gemv_kernel(int64_t m, int64_t k, const T* a, int64_t lda, quantized_matrix b, T* c,
                                      int64_t ldc) {
  const int64_t j = blockIdx.x;
  float acc[8] = {};
  for (int64_t t = threadIdx.x; t < k; t += blockDim.x) {
    const float w = weight_at(b, j, t);
    for (int64_t i = 0; i < m; ++i) acc[i] += to_f32(a[i * lda + t]) * w;
  }
  __shared__ float part[8][32];
  for (int64_t i = 0; i < m; ++i) {
    float v = acc[i];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if ((threadIdx.x & 31) == 0) part[i][threadIdx.x >> 5] = v;
  }
  __syncthreads();
  if (threadIdx.x < m) {
    float v = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) v += part[threadIdx.x][w];
    c[threadIdx.x * ldc + j] = from_f32<T>(v);
  }
}

// One block per (output j, row r): row r's weights are the expert block its pointer names.
template <typename T>
__global__ void quantized_rows_kernel(int64_t k, const void* const* a, const void* const* w, quantized_matrix b,
                                      size_t scales_off, size_t zeros_off, void* const* c) {
  const int64_t j = blockIdx.x, r = blockIdx.y;
  b.codes = static_cast<const uint8_t*>(w[r]);
  b.scales = reinterpret_cast<const uint16_t*>(b.codes + scales_off);
  b.zeros = reinterpret_cast<const uint16_t*>(b.codes + zeros_off);
  const T* x = static_cast<const T*>(a[r]);
  float acc = 0;
  for (int64_t t = threadIdx.x; t < k; t += blockDim.x) acc += to_f32(x[t]) * weight_at(b, j, t);
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  __shared__ float part[32];
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float v = 0;
    for (int i = 0; i < static_cast<int>(blockDim.x >> 5); ++i) v += part[i];
    static_cast<T*>(c[r])[j] = from_f32<T>(v);
  }
}

template <typename T>
__global__ void dequantize_kernel(quantized_matrix b, int64_t n, int64_t k, T* dst) {
  const int64_t total = n * k;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = from_f32<T>(weight_at(b, i / k, i % k));
  }
}

}  // namespace

cudaError_t launch_quantized_gemv(dtype dt, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
                                  const quantized_matrix& b, void* c, int64_t ldc, cudaStream_t stream) {
  const int threads = 256;
  switch (dt) {
    case dtype::dtype_f32:
      quantized_gemv_kernel<float><<<static_cast<unsigned>(n), threads, 0, stream>>>(
          m, k, static_cast<const float*>(a), lda, b, static_cast<float*>(c), ldc);
      break;
    case dtype::dtype_f16:
      quantized_gemv_kernel<__half><<<static_cast<unsigned>(n), threads, 0, stream>>>(
          m, k, static_cast<const __half*>(a), lda, b, static_cast<__half*>(c), ldc);
      break;
    case dtype::dtype_bf16:
      quantized_gemv_kernel<__nv_bfloat16><<<static_cast<unsigned>(n), threads, 0, stream>>>(
          m, k, static_cast<const __nv_bfloat16*>(a), lda, b, static_cast<__nv_bfloat16*>(c), ldc);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_quantized_rows(dtype dt, int64_t rows, int64_t n, int64_t k, const void* const* a,
                                  const void* const* w, const quantized_matrix& layout, void* const* c,
                                  cudaStream_t stream) {
  if (rows <= 0 || n <= 0) return cudaSuccess;
  if (rows > 65535) return cudaErrorInvalidValue;  // the grid's second dimension
  const int threads = 128;
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(rows));
  // layout's pointers are offsets from the block's start; the codes' offset is w[r]'s
  const size_t codes = reinterpret_cast<size_t>(layout.codes);
  const size_t scales = reinterpret_cast<size_t>(layout.scales) - codes;
  const size_t zeros = reinterpret_cast<size_t>(layout.zeros) - codes;
  switch (dt) {
    case dtype::dtype_f32:
      quantized_rows_kernel<float><<<grid, threads, 0, stream>>>(k, a, w, layout, scales, zeros, c);
      break;
    case dtype::dtype_f16:
      quantized_rows_kernel<__half><<<grid, threads, 0, stream>>>(k, a, w, layout, scales, zeros, c);
      break;
    case dtype::dtype_bf16:
      quantized_rows_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>(k, a, w, layout, scales, zeros, c);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_dequantize(dtype dt, const quantized_matrix& b, int64_t n, int64_t k, void* dst,
                              cudaStream_t stream) {
  const int threads = 256;
  const int grid = grid_for(n * k, threads);
  switch (dt) {
    case dtype::dtype_f32:
      dequantize_kernel<float><<<grid, threads, 0, stream>>>(b, n, k, static_cast<float*>(dst));
      break;
    case dtype::dtype_f16:
      dequantize_kernel<__half><<<grid, threads, 0, stream>>>(b, n, k, static_cast<__half*>(dst));
      break;
    case dtype::dtype_bf16:
      dequantize_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>(b, n, k, static_cast<__nv_bfloat16*>(dst));
      break;
  }
  return cudaGetLastError();
}

}  // namespace pregated::cuda
