#include "small_rows.h"

#include <cstring>

#include "half.h"
#include "simd_x86.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PREGATED_X86 1
// GCC 12 warns inside its own AVX-512 reduction intrinsics (a known false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace pregated::cpu {

namespace {

// One element of B, widened.
inline float weight_at(dtype dt, const void* b, int64_t at) {
  if (dt == dtype::dtype_f32) return static_cast<const float*>(b)[at];
  const uint16_t h = static_cast<const uint16_t*>(b)[at];
  return dt == dtype::dtype_bf16 ? bf16_to_f32(h) : f16_to_f32(h);
}

// --- portable ---------------------------------------------------------------------------------

template <int M>
void rows_portable(dtype dt, int64_t k, const float* a, const void* b, int64_t ldb, int64_t j0,
                   int64_t j1, float* c, int64_t ldc) {
  constexpr int lanes = 8;
  for (int64_t j = j0; j < j1; ++j) {
    float acc[M][lanes] = {};
    for (int64_t kk = 0; kk < k; kk += lanes) {
      float w[lanes] = {};
      const int64_t n = k - kk < lanes ? k - kk : lanes;
      for (int64_t l = 0; l < n; ++l) w[l] = weight_at(dt, b, j * ldb + kk + l);
      for (int i = 0; i < M; ++i) {
        for (int64_t l = 0; l < n; ++l) acc[i][l] += a[i * k + kk + l] * w[l];
      }
    }
    for (int i = 0; i < M; ++i) {
      float s = 0;
      for (int l = 0; l < lanes; ++l) s += acc[i][l];
      c[i * ldc + j] = s;
    }
  }
}

#ifdef PREGATED_X86

// --- AVX-512 ----------------------------------------------------------------------------------

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16(dtype dt, const void* b, int64_t at,
                                                        __mmask16 mask) {
  if (dt == dtype::dtype_f32) return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(b) + at);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(b) + at);
  if (dt == dtype::dtype_bf16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_cvtph_ps(h);
}

template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void rows_avx512(dtype dt, int64_t k, const float* a,
                                                             const void* b, int64_t ldb, int64_t j0,
                                                             int64_t j1, float* c, int64_t ldc) {
  for (int64_t j = j0; j < j1; ++j) {
    __m512 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_ps();
    int64_t kk = 0;
    for (; kk + 16 <= k; kk += 16) {
      const __m512 w = load16(dt, b, j * ldb + kk, 0xFFFF);
      for (int i = 0; i < M; ++i) acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(a + i * k + kk), w, acc[i]);
    }
    if (kk < k) {
      const __mmask16 mask = static_cast<__mmask16>((1u << (k - kk)) - 1);
      const __m512 w = load16(dt, b, j * ldb + kk, mask);
      for (int i = 0; i < M; ++i) {
        acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a + i * k + kk), w, acc[i]);
      }
    }
    for (int i = 0; i < M; ++i) c[i * ldc + j] = _mm512_reduce_add_ps(acc[i]);
  }
}

// --- AVX2 -------------------------------------------------------------------------------------

template <dtype DT>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const void* b, int64_t at) {
  if constexpr (DT == dtype::dtype_f32) {
    return _mm256_loadu_ps(static_cast<const float*>(b) + at);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(b) + at));
    if constexpr (DT == dtype::dtype_bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
  }
}

// A accumulators per row taken in turn: with one or two rows a single FMA chain (4 cycles a
// link) would cap a core at 4-8 bytes of weights a cycle, below the memory's pace for bf16.
template <int M, dtype DT>
__attribute__((target("avx2,fma,f16c"))) void rows_avx2_t(int64_t k, const float* a, const void* b, int64_t ldb,
                                                          int64_t j0, int64_t j1, float* c, int64_t ldc) {
  constexpr int A = M == 1 ? 4 : M == 2 ? 2 : 1;
  for (int64_t j = j0; j < j1; ++j) {
    __m256 acc[M][A];
    for (int i = 0; i < M; ++i)
      for (int u = 0; u < A; ++u) acc[i][u] = _mm256_setzero_ps();
    int64_t kk = 0;
    for (; kk + 8 * A <= k; kk += 8 * A) {
      for (int u = 0; u < A; ++u) {
        const __m256 w = load8<DT>(b, j * ldb + kk + 8 * u);
        for (int i = 0; i < M; ++i) acc[i][u] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i * k + kk + 8 * u), w, acc[i][u]);
      }
    }
    for (; kk + 8 <= k; kk += 8) {
      const __m256 w = load8<DT>(b, j * ldb + kk);
      for (int i = 0; i < M; ++i) acc[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i * k + kk), w, acc[i][0]);
    }
    for (int i = 0; i < M; ++i) {
      for (int u = 1; u < A; ++u) acc[i][0] = _mm256_add_ps(acc[i][0], acc[i][u]);
      float s = hsum8(acc[i][0]);
      for (int64_t t = kk; t < k; ++t) s += a[i * k + t] * weight_at(DT, b, j * ldb + t);
      c[i * ldc + j] = s;
    }
  }
}

// Two columns of B at a time for up to 4 rows: each load of A feeds two FMAs, so A (which
// outgrows the L1 cache beyond one row) is read half as often; 2M chains of FMAs.
template <int M, dtype DT>
__attribute__((target("avx2,fma,f16c"))) inline void pair_avx2(int64_t k, const float* a, const void* b, int64_t ldb,
                                                               int64_t j, float* c, int64_t ldc) {
  __m256 acc[M][2];
  for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  int64_t kk = 0;
  for (; kk + 8 <= k; kk += 8) {
    const __m256 w0 = load8<DT>(b, j * ldb + kk);
    const __m256 w1 = load8<DT>(b, (j + 1) * ldb + kk);
    for (int i = 0; i < M; ++i) {
      const __m256 x = _mm256_loadu_ps(a + i * k + kk);
      acc[i][0] = _mm256_fmadd_ps(x, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(x, w1, acc[i][1]);
    }
  }
  for (int i = 0; i < M; ++i) {
    for (int u = 0; u < 2; ++u) {
      float s = hsum8(acc[i][u]);
      for (int64_t t = kk; t < k; ++t) s += a[i * k + t] * weight_at(DT, b, (j + u) * ldb + t);
      c[i * ldc + j + u] = s;
    }
  }
}

// One row: A stays in L1; four accumulators. 2 to 8 rows: column pairs, rows in groups of at most
// four (the pair's columns are still in the caches for the second group).
template <int M, dtype DT>
void rows_avx2_d(int64_t k, const float* a, const void* b, int64_t ldb, int64_t j0, int64_t j1, float* c,
                 int64_t ldc) {
  if constexpr (M == 1) {
    rows_avx2_t<1, DT>(k, a, b, ldb, j0, j1, c, ldc);
  } else {
    int64_t j = j0;
    for (; j + 2 <= j1; j += 2) {
      pair_avx2<(M < 4 ? M : 4), DT>(k, a, b, ldb, j, c, ldc);
      if constexpr (M > 4) pair_avx2<M - 4, DT>(k, a + 4 * k, b, ldb, j, c + 4 * ldc, ldc);
    }
    if (j < j1) rows_avx2_t<M, DT>(k, a, b, ldb, j, j1, c, ldc);
  }
}

template <int M>
void rows_avx2(dtype dt, int64_t k, const float* a, const void* b, int64_t ldb, int64_t j0, int64_t j1, float* c,
               int64_t ldc) {
  switch (dt) {
    case dtype::dtype_f32: return rows_avx2_d<M, dtype::dtype_f32>(k, a, b, ldb, j0, j1, c, ldc);
    case dtype::dtype_bf16: return rows_avx2_d<M, dtype::dtype_bf16>(k, a, b, ldb, j0, j1, c, ldc);
    default: return rows_avx2_d<M, dtype::dtype_f16>(k, a, b, ldb, j0, j1, c, ldc);
  }
}

#endif  // PREGATED_X86

enum class isa { portable, avx2, avx512 };

isa best_isa() {
#ifdef PREGATED_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    return isa::avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return isa::avx2;
  }
#endif
  return isa::portable;
}

isa& chosen() {
  static isa value = best_isa();
  return value;
}

template <int M>
void rows(dtype dt, int64_t k, const float* a, const void* b, int64_t ldb, int64_t j0, int64_t j1,
          float* c, int64_t ldc) {
  switch (chosen()) {
#ifdef PREGATED_X86
    case isa::avx512: return rows_avx512<M>(dt, k, a, b, ldb, j0, j1, c, ldc);
    case isa::avx2: return rows_avx2<M>(dt, k, a, b, ldb, j0, j1, c, ldc);
#endif
    default: return rows_portable<M>(dt, k, a, b, ldb, j0, j1, c, ldc);
  }
}

}  // namespace

void small_rows(dtype dt, int64_t m, int64_t k, const float* a, const void* b, int64_t ldb,
                int64_t j0, int64_t j1, float* c, int64_t ldc) {
  switch (m) {
    case 1: return rows<1>(dt, k, a, b, ldb, j0, j1, c, ldc);
    case 2: return rows<2>(dt, k, a, b, ldb, j0, j1, c, ldc);
    case 3: return rows<3>(dt, k, a, b, ldb, j0, j1, c, ldc);
    case 4: return rows<4>(dt, k, a, b, ldb, j0, j1, c, ldc);
    case 5: return rows<5>(dt, k, a, b, ldb, j0, j1, c, ldc);
    case 6: return rows<6>(dt, k, a, b, ldb, j0, j1, c, ldc);
    case 7: return rows<7>(dt, k, a, b, ldb, j0, j1, c, ldc);
    default: return rows<8>(dt, k, a, b, ldb, j0, j1, c, ldc);
  }
}

const char* small_rows_isa() {
  switch (chosen()) {
    case isa::avx512: return "avx512";
    case isa::avx2: return "avx2";
    default: return "portable";
  }
}

bool small_rows_force(const char* name) {
  const isa best = best_isa();
  isa want;
  if (std::strcmp(name, "avx512") == 0) want = isa::avx512;
  else if (std::strcmp(name, "avx2") == 0) want = isa::avx2;
  else if (std::strcmp(name, "portable") == 0) want = isa::portable;
  else return false;
  if (static_cast<int>(want) > static_cast<int>(best)) return false;
  chosen() = want;
  return true;
}

}  // namespace pregated::cpu
