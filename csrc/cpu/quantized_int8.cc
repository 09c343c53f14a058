#include "quantized_int8.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "half.h"
#include "simd_x86.h"
#include "small_rows.h"


namespace pregated::cpu {

namespace {

constexpr int64_t chunk_bytes = 32;  // one 256-bit register of codes (a plane)

// Codes per chunk: 32 (int8), 64 (int4), 128 (int2). A chunk of b-bit codes is read as 8 / b
// "planes" of 32 bytes: plane p holds, in byte t, code (8 / b) * t + p of the chunk. int3: 64
// codes in 24 bytes (8 units of 8 codes in 3 bytes) make two planes: plane p holds, in byte t,
// code 8 (t / 4) + 4 p + t % 4. Either way lane l of the int32 sums covers the chunk's codes
// [l CH / 8, (l + 1) CH / 8).
constexpr int planes_of(int bits) { return bits == 3 ? 2 : 8 / bits; }
constexpr int64_t stride_of(int bits) { return bits == 3 ? 24 : chunk_bytes; }  // bytes of a chunk in a row
int64_t chunk_codes(int bits) { return chunk_bytes * planes_of(bits); }

#ifdef PREGATED_X86

// The kernels, once per instruction set (quantized_int8_kernels.inc).
#define PREGATED_INT8_TARGET "avx2,fma,f16c"
#define PREGATED_INT8_VNNI 0
namespace maddubs {
#include "quantized_int8_kernels.inc"
}
#undef PREGATED_INT8_TARGET
#undef PREGATED_INT8_VNNI
#define PREGATED_INT8_TARGET "avx2,fma,f16c,avxvnni"
#define PREGATED_INT8_VNNI 1
#define PREGATED_DPBUSD _mm256_dpbusd_avx_epi32
namespace avx_vnni {
#include "quantized_int8_kernels.inc"
}
#undef PREGATED_INT8_TARGET
#undef PREGATED_DPBUSD
#define PREGATED_INT8_TARGET "avx2,fma,f16c,avx512f,avx512vl,avx512vnni"
#define PREGATED_DPBUSD _mm256_dpbusd_epi32
namespace avx512_vnni {
#include "quantized_int8_kernels.inc"
}
#undef PREGATED_INT8_TARGET
#undef PREGATED_INT8_VNNI
#undef PREGATED_DPBUSD

enum class dot_kind { maddubs, avx_vnni, avx512_vnni };

// vpdpbusd where the CPU has it and the chosen kernels are above AVX2 (forcing "avx2" tests the
// vpmaddubsw path on any CPU).
dot_kind best_dot() {
  const std::string isa = cpu_kernel_isa();
  if (isa == "avx2" || isa == "portable") return dot_kind::maddubs;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")) return dot_kind::avx512_vnni;
  if (__builtin_cpu_supports("avxvnni")) return dot_kind::avx_vnni;
  return dot_kind::maddubs;
}

using rows_fn = void (*)(const int8_rows_input&, const quantized_matrix&, int64_t, int64_t, float*, int64_t);

template <rows_fn R8, rows_fn R4, rows_fn R3, rows_fn R2>
void rows_bits(const int8_rows_input& in, const quantized_matrix& b, int64_t j0, int64_t j1, float* c, int64_t ldc) {
  switch (b.bits) {
    case 8: return R8(in, b, j0, j1, c, ldc);
    case 4: return R4(in, b, j0, j1, c, ldc);
    case 3: return R3(in, b, j0, j1, c, ldc);
    case 2: return R2(in, b, j0, j1, c, ldc);
    default: return;
  }
}
#endif  // PREGATED_X86

}  // namespace

bool int8_rows_usable(const quantized_matrix& b) {
#ifdef PREGATED_X86
  static const bool avx2 = cpu_has_avx2();
  return avx2 && std::strcmp(cpu_kernel_isa(), "portable") != 0 && (b.bits == 8 || b.bits == 4 || b.bits == 3 || b.bits == 2);
#else
  (void)b;
  return false;
#endif
}

#ifdef PREGATED_X86
namespace {

// round_group 16 activations at a time: the same float operations (cvtps rounds to nearest even,
// as lrint does), so the same codes and scales. Decode rounds every row once per weight matrix:
// in scalar code that was 0.3 ms of one core for a row of Mixtral's 14336 at 8 rows.
__attribute__((target("avx512f,avx512bw"))) void round_group_avx512(const float* a, int64_t n, int8_t* q,
                                                                   float* scale, float* scaled_sum) {
  const int64_t whole = n / 16 * 16;
  __m512 vmax = _mm512_setzero_ps();
  for (int64_t t = 0; t < whole; t += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(a + t)));
  float amax = _mm512_reduce_max_ps(vmax);
  for (int64_t t = whole; t < n; ++t) amax = std::max(amax, std::fabs(a[t]));
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i hi = _mm512_set1_epi32(127), lo = _mm512_set1_epi32(-127);
  __m512i vsum = _mm512_setzero_si512();
  for (int64_t t = 0; t < whole; t += 16) {
    const __m512i x = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(a + t), vinv)), hi), lo);
    vsum = _mm512_add_epi32(vsum, x);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + t), _mm512_cvtepi32_epi8(x));
  }
  int32_t sum = _mm512_reduce_add_epi32(vsum);
  for (int64_t t = whole; t < n; ++t) {
    q[t] = static_cast<int8_t>(std::clamp(static_cast<int>(std::lrint(a[t] * inv)), -127, 127));
    sum += q[t];
  }
  *scale = amax / 127.0f;
  *scaled_sum = *scale * static_cast<float>(sum);
}

}  // namespace
#endif

void round_group(const float* a, int64_t n, int8_t* q, float* scale, float* scaled_sum) {
#ifdef PREGATED_X86
  // the chosen kernels' path: forcing "avx2" (or below) tests the scalar rounding on any CPU
  if (avx512_chosen()) return round_group_avx512(a, n, q, scale, scaled_sum);
#endif
  float amax = 0.0f;
  for (int64_t t = 0; t < n; ++t) amax = std::max(amax, std::fabs(a[t]));
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  int32_t sum = 0;
  for (int64_t t = 0; t < n; ++t) {
    q[t] = static_cast<int8_t>(std::clamp(static_cast<int>(std::lrint(a[t] * inv)), -127, 127));
    sum += q[t];
  }
  *scale = amax / 127.0f;
  *scaled_sum = *scale * static_cast<float>(sum);
}

int8_rows_input prepare_int8_rows(int64_t m, int64_t k, const float* a, const quantized_matrix& b) {
  int8_rows_input in;
  const int64_t ch = chunk_codes(b.bits), planes = planes_of(b.bits), G = b.group_size;
  in.m = m;
  in.kpad = (k + ch - 1) / ch * ch;
  in.groups_pad = (in.kpad + G - 1) / G;
  const int64_t srow = in.groups_pad + 8;
  in.q.assign(static_cast<size_t>(m * in.kpad), 0);
  in.scale.assign(static_cast<size_t>(m * srow), 0.0f);
  in.scaled_sum.assign(static_cast<size_t>(m * srow), 0.0f);
  std::vector<int8_t> natural(static_cast<size_t>(in.kpad));
  for (int64_t i = 0; i < m; ++i) {
    const float* ai = a + i * k;
    std::fill(natural.begin(), natural.end(), int8_t{0});
    for (int64_t g = 0; g < b.groups; ++g) {
      const int64_t c0 = g * G;
      round_group(ai + c0, std::min(G, k - c0), natural.data() + c0, &in.scale[static_cast<size_t>(i * srow + g)],
                  &in.scaled_sum[static_cast<size_t>(i * srow + g)]);
    }
    int8_t* q = in.q.data() + i * in.kpad;
    for (int64_t base = 0; base < in.kpad; base += ch) {
      for (int64_t p = 0; p < planes; ++p) {
        for (int64_t t = 0; t < chunk_bytes; ++t) {
          const int64_t code = b.bits == 3 ? 8 * (t / 4) + 4 * p + t % 4 : planes * t + p;
          q[base + chunk_bytes * p + t] = natural[static_cast<size_t>(base + code)];
        }
      }
    }
  }
  return in;
}

void int8_rows(const int8_rows_input& in, const quantized_matrix& b, int64_t j0, int64_t j1, float* c,
               int64_t ldc) {
#ifdef PREGATED_X86
  switch (best_dot()) {
    case dot_kind::avx512_vnni: return rows_bits<avx512_vnni::rows_m<8>, avx512_vnni::rows_m<4>, avx512_vnni::rows_m<3>, avx512_vnni::rows_m<2>>(in, b, j0, j1, c, ldc);
    case dot_kind::avx_vnni: return rows_bits<avx_vnni::rows_m<8>, avx_vnni::rows_m<4>, avx_vnni::rows_m<3>, avx_vnni::rows_m<2>>(in, b, j0, j1, c, ldc);
    default: return rows_bits<maddubs::rows_m<8>, maddubs::rows_m<4>, maddubs::rows_m<3>, maddubs::rows_m<2>>(in, b, j0, j1, c, ldc);
  }
#endif
  (void)in, (void)b, (void)j0, (void)j1, (void)c, (void)ldc;
}

}  // namespace pregated::cpu
