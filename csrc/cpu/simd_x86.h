// Small AVX2 and AVX-512 helpers shared by the CPU kernels (x86 with GCC/Clang only).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
// The kernel files that include this have their x86 paths (PREGATED_X86); GCC 12 warns inside its
// own AVX-512 intrinsics there (a known false positive), so those warnings are off in them.
#define PREGATED_X86 1
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <cstdint>

#include "pregated/types.h"

namespace pregated::cpu {

// Eight elements of p (float32, bfloat16 or float16) from index i, widened to float32.
template <dtype DT>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const void* p, int64_t i) {
  if constexpr (DT == dtype::dtype_f32) {
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    if constexpr (DT == dtype::dtype_bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
  }
}

// bf16 bits of 8 floats, rounded to nearest even, NaN kept NaN (as f32_to_bf16), in the low
// 16 bits of each 32-bit lane.
__attribute__((target("avx2,fma,f16c"))) inline __m256i bf16_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, quiet, nan);
}

// v rounded to DT and widened back (what `tensor.to(DT)` keeps of it); v stored as 8 elements of
// p in DT from index i.
template <dtype DT>
__attribute__((target("avx2,fma,f16c"))) inline __m256 round8(__m256 v) {
  if constexpr (DT == dtype::dtype_f32) return v;
  if constexpr (DT == dtype::dtype_bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(v), 16));
  return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <dtype DT>
__attribute__((target("avx2,fma,f16c"))) inline void store8(void* p, int64_t i, __m256 v) {
  if constexpr (DT == dtype::dtype_f32) {
    _mm256_storeu_ps(static_cast<float*>(p) + i, v);
  } else {
    __m128i h;
    if constexpr (DT == dtype::dtype_bf16) {
      const __m256i b = bf16_bits(v);
      h = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
    } else {
      h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), h);
  }
}

// The sum of a vector's eight lanes.
__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// v[i] lane r <- v[r] lane i: a 16 x 16 transpose of 32-bit elements in 64 shuffles (bits moved
// as they are, so any 32-bit data).
__attribute__((target("avx512f"))) inline void transpose16(__m512 (&v)[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {  // 32-bit pairs of rows
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // 64-bit: v[4 g + c], 128-bit chunk L: rows 4g..4g+3 of lane 4 L + c
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 2]);
    const __m512d a1 = _mm512_castps_pd(t[4 * g + 1]), b1 = _mm512_castps_pd(t[4 * g + 3]);
    v[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    v[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    v[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, b1));
    v[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, b1));
  }
  for (int q = 0; q < 4; ++q) {  // 128-bit chunks: lane 4 L + q of every row, chunk g rows 4g..
    const __m512 x0 = _mm512_shuffle_f32x4(v[q], v[4 + q], 0x88), x1 = _mm512_shuffle_f32x4(v[q], v[4 + q], 0xDD);
    const __m512 x2 = _mm512_shuffle_f32x4(v[8 + q], v[12 + q], 0x88), x3 = _mm512_shuffle_f32x4(v[8 + q], v[12 + q], 0xDD);
    t[q] = _mm512_shuffle_f32x4(x0, x2, 0x88);
    t[8 + q] = _mm512_shuffle_f32x4(x0, x2, 0xDD);
    t[4 + q] = _mm512_shuffle_f32x4(x1, x3, 0x88);
    t[12 + q] = _mm512_shuffle_f32x4(x1, x3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) v[i] = t[i];
}

}  // namespace pregated::cpu

#endif

namespace pregated::cpu {

// AVX2 with FMA and F16C, what the CPU kernels' AVX2 paths need (false off x86).
inline bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

}  // namespace pregated::cpu
