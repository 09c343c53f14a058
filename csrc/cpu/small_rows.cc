#include "small_rows.h"

#include <cstring>
#include <vector>

#include "amx_rows.h"
#include "half.h"
#include "simd_x86.h"

namespace pregated::cpu {

namespace {

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
      for (int64_t l = 0; l < n; ++l) w[l] = widen_at(dt, b, j * ldb + kk + l);
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

// Columns that share each load of A: enough chains of FMAs (M * NC) to cover their latency, few
// enough accumulators to stay in registers.
template <int M>
constexpr int columns_per_step() {
  return M <= 4 ? 4 : 2;
}

// NC columns from j of C's M rows: each 16 weights of B widened once, each 16 of A loaded once.
template <int M, int NC>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void cols_avx512(dtype dt, int64_t k, const float* a,
                                                                            const void* b, int64_t ldb, int64_t j,
                                                                            float* c, int64_t ldc) {
  __m512 acc[M][NC];
  for (int i = 0; i < M; ++i)
    for (int n = 0; n < NC; ++n) acc[i][n] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; kk += 16) {
    const __mmask16 mask = k - kk >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (k - kk)) - 1);
    __m512 w[NC];
    for (int n = 0; n < NC; ++n) w[n] = load16(dt, b, (j + n) * ldb + kk, mask);
    for (int i = 0; i < M; ++i) {
      const __m512 x = _mm512_maskz_loadu_ps(mask, a + i * k + kk);
      for (int n = 0; n < NC; ++n) acc[i][n] = _mm512_fmadd_ps(x, w[n], acc[i][n]);
    }
  }
  for (int i = 0; i < M; ++i)
    for (int n = 0; n < NC; ++n) c[i * ldc + j + n] = _mm512_reduce_add_ps(acc[i][n]);
}

template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void rows_avx512(dtype dt, int64_t k, const float* a, const void* b, int64_t ldb, int64_t j0, int64_t j1, float* c,
                 int64_t ldc) {
  constexpr int NC = columns_per_step<M>();
  int64_t j = j0;
  for (; j + NC <= j1; j += NC) cols_avx512<M, NC>(dt, k, a, b, ldb, j, c, ldc);
  for (; j < j1; ++j) cols_avx512<M, 1>(dt, k, a, b, ldb, j, c, ldc);
}

// --- AVX-512 BF16: bf16 weights by vdpbf16ps --------------------------------------------------
// A is rounded to bf16, which is exact where it came from bf16 activations (the callers widen
// A from the weights' dtype); each instruction takes 32 products of bf16 pairs into 16 fp32 sums,
// with no widening of B.

// A's M rows in bf16, k padded with zeros to whole 32s (so A's loads need no mask).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void a_to_bf16(int64_t m, int64_t k, const float* a,
                                                                             uint16_t* dst, int64_t kpad) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t kk = 0; kk < kpad; kk += 16) {
      const int64_t left = k - kk;
      const __mmask16 mask = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << left) - 1);
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, a + i * k + kk));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i * kpad + kk), reinterpret_cast<const __m256i&>(h));
    }
  }
}

template <int M, int NC>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void cols_bf16dot(int64_t k, int64_t kpad,
                                                                                       const uint16_t* a,
                                                                                       const uint16_t* b, int64_t ldb,
                                                                                       int64_t j, float* c, int64_t ldc) {
  __m512 acc[M][NC];
  for (int i = 0; i < M; ++i)
    for (int n = 0; n < NC; ++n) acc[i][n] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; kk += 32) {
    const __mmask32 mask = k - kk >= 32 ? __mmask32(0xFFFFFFFFu) : static_cast<__mmask32>((1u << (k - kk)) - 1);
    __m512i w[NC];
    for (int n = 0; n < NC; ++n) w[n] = _mm512_maskz_loadu_epi16(mask, b + (j + n) * ldb + kk);
    for (int i = 0; i < M; ++i) {
      const __m512i x = _mm512_loadu_si512(a + i * kpad + kk);
      for (int n = 0; n < NC; ++n) acc[i][n] = _mm512_dpbf16_ps(acc[i][n], (__m512bh)x, (__m512bh)w[n]);
    }
  }
  for (int i = 0; i < M; ++i)
    for (int n = 0; n < NC; ++n) c[i * ldc + j + n] = _mm512_reduce_add_ps(acc[i][n]);
}

template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void rows_bf16dot(int64_t k, const float* a, const void* b, int64_t ldb, int64_t j0, int64_t j1, float* c,
                  int64_t ldc) {
  constexpr int NC = columns_per_step<M>();
  const int64_t kpad = (k + 31) / 32 * 32;
  thread_local std::vector<uint16_t> a16;
  if (a16.size() < static_cast<size_t>(M * kpad)) a16.resize(static_cast<size_t>(M * kpad));
  a_to_bf16(M, k, a, a16.data(), kpad);
  const uint16_t* b16 = static_cast<const uint16_t*>(b);
  int64_t j = j0;
  for (; j + NC <= j1; j += NC) cols_bf16dot<M, NC>(k, kpad, a16.data(), b16, ldb, j, c, ldc);
  for (; j < j1; ++j) cols_bf16dot<M, 1>(k, kpad, a16.data(), b16, ldb, j, c, ldc);
}

// --- AVX2 -------------------------------------------------------------------------------------

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
      for (int64_t t = kk; t < k; ++t) s += a[i * k + t] * widen_at(DT, b, j * ldb + t);
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
      for (int64_t t = kk; t < k; ++t) s += a[i * k + t] * widen_at(DT, b, (j + u) * ldb + t);
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

enum class isa { portable, avx2, avx512, avx512bf16, amx };

isa best_isa() {
#ifdef PREGATED_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    if (!__builtin_cpu_supports("avx512bf16")) return isa::avx512;
    return amx_usable() ? isa::amx : isa::avx512bf16;
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
    case isa::amx:  // AMX is taken by the GEMMs above (gemm_nt); here it means vdpbf16ps
    case isa::avx512bf16:
      if (dt == dtype::dtype_bf16) return rows_bf16dot<M>(k, a, b, ldb, j0, j1, c, ldc);
      return rows_avx512<M>(dt, k, a, b, ldb, j0, j1, c, ldc);
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

bool amx_chosen() { return chosen() == isa::amx; }
bool bf16dot_chosen() { return chosen() == isa::avx512bf16 || chosen() == isa::amx; }
bool avx512_chosen() { return chosen() == isa::avx512 || chosen() == isa::avx512bf16 || chosen() == isa::amx; }

const char* small_rows_isa() {
  switch (chosen()) {
    case isa::amx: return "amx";
    case isa::avx512bf16: return "avx512bf16";
    case isa::avx512: return "avx512";
    case isa::avx2: return "avx2";
    default: return "portable";
  }
}

bool small_rows_force(const char* name) {
  const isa best = best_isa();
  isa want;
  if (std::strcmp(name, "amx") == 0) want = isa::amx;
  else if (std::strcmp(name, "avx512bf16") == 0) want = isa::avx512bf16;
  else if (std::strcmp(name, "avx512") == 0) want = isa::avx512;
  else if (std::strcmp(name, "avx2") == 0) want = isa::avx2;
  else if (std::strcmp(name, "portable") == 0) want = isa::portable;
  else return false;
  if (static_cast<int>(want) > static_cast<int>(best)) return false;
  chosen() = want;
  return true;
}

}  // namespace pregated::cpu
