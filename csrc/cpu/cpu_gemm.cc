#include "cpu_gemm.h"

#include <algorithm>
#include <string>
#include <thread>
#include <vector>

#include "half.h"

#include <cblas.h>  // scipy-openblas32: OpenBLAS with a scipy_ symbol prefix

namespace pregated::cpu {

namespace {

// Conversions run once per weight element per call, so they are built for several vector
// widths and the loader picks the best the CPU has (GCC function multiversioning).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_THREAD__) && !defined(__SANITIZE_ADDRESS__)
#define PREGATED_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PREGATED_VECTOR_CLONES
#endif

PREGATED_VECTOR_CLONES
void widen(dtype dt, const void* src, int64_t rows, int64_t cols, int64_t ld, float* dst) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* in = s + r * ld;
    float* out = dst + r * cols;
    if (dt == dtype::dtype_bf16) {
      for (int64_t c = 0; c < cols; ++c) out[c] = bf16_to_f32(in[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) out[c] = f16_to_f32(in[c]);
    }
  }
}

PREGATED_VECTOR_CLONES
void narrow(dtype dt, const float* src, int64_t rows, int64_t cols, int64_t src_ld, void* dst,
            int64_t ld) {
  uint16_t* d = static_cast<uint16_t*>(dst);
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = src + r * src_ld;
    uint16_t* out = d + r * ld;
    if (dt == dtype::dtype_bf16) {
      for (int64_t c = 0; c < cols; ++c) out[c] = f32_to_bf16(in[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) out[c] = f32_to_f16(in[c]);
    }
  }
}

void sgemm_nt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
              int64_t ldb, float* c, int64_t ldc) {
  scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(m),
                    static_cast<blasint>(n), static_cast<blasint>(k), 1.0f, a,
                    static_cast<blasint>(lda), b, static_cast<blasint>(ldb), 0.0f, c,
                    static_cast<blasint>(ldc));
}

// Few rows of A (decode): the GEMM is a pass over B, so B is read once in its own precision
// and widened a row at a time in cache instead of through an fp32 copy.
PREGATED_VECTOR_CLONES
void small_m_rows(dtype dt, int64_t m, int64_t k, const float* a, const uint16_t* b, int64_t ldb,
                  int64_t j0, int64_t j1, float* c, int64_t ldc) {
  std::vector<float> row(static_cast<size_t>(k));
  constexpr int64_t lanes = 16;
  for (int64_t j = j0; j < j1; ++j) {
    widen(dt, b + j * ldb, 1, k, ldb, row.data());
    for (int64_t i = 0; i < m; ++i) {
      const float* ai = a + i * k;
      float part[lanes] = {};
      int64_t kk = 0;
      for (; kk + lanes <= k; kk += lanes) {
        for (int64_t l = 0; l < lanes; ++l) part[l] += ai[kk + l] * row[static_cast<size_t>(kk + l)];
      }
      float acc = 0;
      for (; kk < k; ++kk) acc += ai[kk] * row[static_cast<size_t>(kk)];
      for (int64_t l = 0; l < lanes; ++l) acc += part[l];
      c[i * ldc + j] = acc;
    }
  }
}

void small_m_gemm(dtype dt, int64_t m, int64_t n, int64_t k, const float* a, const uint16_t* b,
                  int64_t ldb, float* c) {
  const int64_t work = n * k;
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  const int64_t threads = work < (int64_t{1} << 20) ? 1 : std::min<int64_t>(hw, n);
  if (threads == 1) {
    small_m_rows(dt, m, k, a, b, ldb, 0, n, c, n);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t per = (n + threads - 1) / threads;
  for (int64_t t = 0; t < threads; ++t) {
    const int64_t j0 = t * per, j1 = std::min(n, j0 + per);
    if (j0 >= j1) break;
    pool.emplace_back([=] { small_m_rows(dt, m, k, a, b, ldb, j0, j1, c, n); });
  }
  for (std::thread& th : pool) th.join();
}

}  // namespace

status gemm_nt(dtype dt, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
               const void* b, int64_t ldb, void* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return {};
  if (dt == dtype::dtype_f32) {
    sgemm_nt(m, n, k, static_cast<const float*>(a), lda, static_cast<const float*>(b), ldb,
             static_cast<float*>(c), ldc);
    return {};
  }
  // OpenBLAS has no half-precision GEMM in this build: widen A once and B a tile of rows at a
  // time (about 4 MiB of fp32), so the extra memory stays small while sgemm sees long runs.
  std::vector<float> a32(static_cast<size_t>(m * k));
  widen(dt, a, m, k, lda, a32.data());
  if (m <= 8) {
    std::vector<float> c32(static_cast<size_t>(m * n));
    small_m_gemm(dt, m, n, k, a32.data(), static_cast<const uint16_t*>(b), ldb, c32.data());
    narrow(dt, c32.data(), m, n, n, c, ldc);
    return {};
  }
  const int64_t tile = std::max<int64_t>(16, (int64_t{1} << 20) / std::max<int64_t>(k, 1));
  std::vector<float> b32(static_cast<size_t>(std::min(tile, n) * k));
  std::vector<float> c32(static_cast<size_t>(m * std::min(tile, n)));
  const uint16_t* b16 = static_cast<const uint16_t*>(b);
  uint16_t* c16 = static_cast<uint16_t*>(c);
  for (int64_t j0 = 0; j0 < n; j0 += tile) {
    const int64_t nb = std::min(tile, n - j0);
    widen(dt, b16 + j0 * ldb, nb, k, ldb, b32.data());
    sgemm_nt(m, nb, k, a32.data(), k, b32.data(), k, c32.data(), nb);
    narrow(dt, c32.data(), m, nb, nb, c16 + j0, ldc);
  }
  return {};
}

const char* blas_name() {
  return "OpenBLAS (scipy-openblas32) sgemm; float16/bfloat16 widened to float32 (fused kernel for <= 8 rows, tiles + sgemm above)";
}

}  // namespace pregated::cpu
