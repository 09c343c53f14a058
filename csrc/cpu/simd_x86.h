// Small AVX2 helpers shared by the CPU kernels (x86 with GCC/Clang only).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

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

// The sum of a vector's eight lanes.
__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
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
