#include "quantized_rows.h"

#include <cstring>

#include "half.h"
#include "simd_x86.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PREGATED_X86 1
#endif

namespace pregated::cpu {

namespace {

// Codes [c0, c0 + n) of one row, as floats (n <= group size).
void unpack(const uint8_t* row, int bits, int64_t c0, int64_t n, float* out) {
  if (bits == 8) {
    for (int64_t i = 0; i < n; ++i) out[i] = row[c0 + i];
    return;
  }
  if (bits == 3) {  // 8 codes in 3 bytes
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = c0 + i, unit = c / 8, at = c % 8;
      const uint8_t* u = row + 3 * unit;
      const uint32_t word = u[0] | (u[1] << 8) | (u[2] << 16);
      out[i] = static_cast<float>((word >> (3 * at)) & 7u);
    }
    return;
  }
  const int per = 8 / bits;
  const uint32_t mask = (1u << bits) - 1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = c0 + i;
    out[i] = static_cast<float>((row[c / per] >> (bits * (c % per))) & mask);
  }
}

float dot(const float* a, const float* b, int64_t n) {
  float s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void rows_portable(int64_t m, int64_t k, const float* a, const float* a_sums, const quantized_matrix& b,
                   int64_t j0, int64_t j1, float* c, int64_t ldc) {
  float codes[128];
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* row = b.codes + j * b.row_bytes;
    float acc[8] = {};
    for (int64_t g = 0; g < b.groups; ++g) {
      const int64_t c0 = g * b.group_size, n = k - c0 < b.group_size ? k - c0 : b.group_size;
      unpack(row, b.bits, c0, n, codes);
      const float s = f16_to_f32(b.scales[j * b.groups + g]), z = f16_to_f32(b.zeros[j * b.groups + g]);
      for (int64_t i = 0; i < m; ++i) acc[i] += s * (dot(a + i * k + c0, codes, n) - z * a_sums[i * b.groups + g]);
    }
    for (int64_t i = 0; i < m; ++i) c[i * ldc + j] = acc[i];
  }
}

#ifdef PREGATED_X86

// 8 codes starting at code c0 (a multiple of 8) of one row, as floats. The 8 codes are BITS
// bytes (int3: 3), read with a fixed-size copy the compiler turns into one load.
template <int BITS>
__attribute__((target("avx2,fma"))) inline __m256 codes8(const uint8_t* row, int64_t c0) {
  if constexpr (BITS == 8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c0))));
  } else {
    uint32_t word = 0;
    std::memcpy(&word, row + c0 * BITS / 8, BITS);
    const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
    const __m256i v = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts),
                                       _mm256_set1_epi32((1 << BITS) - 1));
    return _mm256_cvtepi32_ps(v);
  }
}

// Per group: acc += scale * (A . codes) in vector lanes, zero term scale * zero * sum(A) in a
// scalar; one horizontal sum per output.
template <int BITS, int M>
__attribute__((target("avx2,fma"))) void rows_avx2(int64_t k, const float* a, const float* a_sums,
                                                  const quantized_matrix& b, int64_t j0, int64_t j1, float* c,
                                                  int64_t ldc) {
  float tail[128];
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* row = b.codes + j * b.row_bytes;
    __m256 acc[M];
    float zterm[M] = {};
    for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < b.groups; ++g) {
      const int64_t c0 = g * b.group_size, n = k - c0 < b.group_size ? k - c0 : b.group_size;
      __m256 d[M];
      for (int i = 0; i < M; ++i) d[i] = _mm256_setzero_ps();
      int64_t t = 0;
      for (; t + 8 <= n; t += 8) {
        const __m256 q = codes8<BITS>(row, c0 + t);
        for (int i = 0; i < M; ++i) d[i] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i * k + c0 + t), q, d[i]);
      }
      const float s = f16_to_f32(b.scales[j * b.groups + g]), z = f16_to_f32(b.zeros[j * b.groups + g]);
      const __m256 sv = _mm256_set1_ps(s);
      if (t < n) unpack(row, BITS, c0 + t, n - t, tail);
      for (int i = 0; i < M; ++i) {
        acc[i] = _mm256_fmadd_ps(sv, d[i], acc[i]);
        float rest = t < n ? dot(a + i * k + c0 + t, tail, n - t) : 0.0f;
        zterm[i] += s * (z * a_sums[i * b.groups + g] - rest);
      }
    }
    for (int i = 0; i < M; ++i) c[i * ldc + j] = hsum8(acc[i]) - zterm[i];
  }
}

template <int BITS>
__attribute__((target("avx2,fma"))) void rows_avx2_m(int64_t m, int64_t k, const float* a, const float* a_sums,
                                                    const quantized_matrix& b, int64_t j0, int64_t j1, float* c,
                                                    int64_t ldc) {
  switch (m) {
    case 1: return rows_avx2<BITS, 1>(k, a, a_sums, b, j0, j1, c, ldc);
    case 2: return rows_avx2<BITS, 2>(k, a, a_sums, b, j0, j1, c, ldc);
    case 3: return rows_avx2<BITS, 3>(k, a, a_sums, b, j0, j1, c, ldc);
    case 4: return rows_avx2<BITS, 4>(k, a, a_sums, b, j0, j1, c, ldc);
    case 5: return rows_avx2<BITS, 5>(k, a, a_sums, b, j0, j1, c, ldc);
    case 6: return rows_avx2<BITS, 6>(k, a, a_sums, b, j0, j1, c, ldc);
    case 7: return rows_avx2<BITS, 7>(k, a, a_sums, b, j0, j1, c, ldc);
    default: return rows_avx2<BITS, 8>(k, a, a_sums, b, j0, j1, c, ldc);
  }
}

bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

#endif  // PREGATED_X86

}  // namespace

void quantized_group_sums(int64_t m, int64_t k, const float* a, int64_t group, int64_t groups, float* a_sums) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * group, n = k - c0 < group ? k - c0 : group;
      float s = 0;
      for (int64_t t = 0; t < n; ++t) s += a[i * k + c0 + t];
      a_sums[i * groups + g] = s;
    }
  }
}

void quantized_rows(int64_t m, int64_t k, const float* a, const float* a_sums, const quantized_matrix& b,
                    int64_t j0, int64_t j1, float* c, int64_t ldc) {
#ifdef PREGATED_X86
  static const bool avx2 = has_avx2();
  if (avx2 && std::strcmp(cpu_kernel_isa(), "portable") != 0) {
    switch (b.bits) {
      case 8: return rows_avx2_m<8>(m, k, a, a_sums, b, j0, j1, c, ldc);
      case 4: return rows_avx2_m<4>(m, k, a, a_sums, b, j0, j1, c, ldc);
      case 3: return rows_avx2_m<3>(m, k, a, a_sums, b, j0, j1, c, ldc);
      default: return rows_avx2_m<2>(m, k, a, a_sums, b, j0, j1, c, ldc);
    }
  }
#endif
  rows_portable(m, k, a, a_sums, b, j0, j1, c, ldc);
}

void dequantize_rows(const quantized_matrix& b, int64_t k, int64_t j0, int64_t j1, float* dst) {
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* row = b.codes + j * b.row_bytes;
    float* out = dst + (j - j0) * k;
    for (int64_t g = 0; g < b.groups; ++g) {
      const int64_t c0 = g * b.group_size, n = k - c0 < b.group_size ? k - c0 : b.group_size;
      unpack(row, b.bits, c0, n, out + c0);
      const float s = f16_to_f32(b.scales[j * b.groups + g]), z = f16_to_f32(b.zeros[j * b.groups + g]);
      for (int64_t t = 0; t < n; ++t) out[c0 + t] = (out[c0 + t] - z) * s;
    }
  }
}

}  // namespace pregated::cpu
