#include "quantized_int8.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "half.h"
#include "simd_x86.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PREGATED_X86 1
#endif

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

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

// The scale of each lane of a chunk: one group's, or (groups shorter than the chunk) lane l's
// group is the chunk's first + lanes[l].
__attribute__((target("avx2,fma"))) inline __m256 chunk_scales(const float* cs, bool one_group, __m256i lanes) {
  return one_group ? _mm256_broadcast_ss(cs) : _mm256_permutevar8x32_ps(_mm256_loadu_ps(cs), lanes);
}

// The codes of one chunk as vpmaddubsw wants them. int8: codes - 128 as int8 (v[0]) and its
// absolute value (v[1]); |x| * sign(a, x) keeps the products in range. Fewer bits: planes.
template <int BITS>
__attribute__((target("avx2,fma"))) inline void prepare_codes(const uint8_t* src, __m256i* v) {
  if constexpr (BITS == 3) {
    // 24 bytes, read exactly: units 0-3 (bytes 0-11) in the low lane, 4-7 (bytes 12-23) in the
    // high one, each unit's 3 bytes in a dword; then the four codes of each half-unit in bytes.
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m128i hi = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 16));
    const __m256i both = _mm256_set_m128i(_mm_alignr_epi8(hi, lo, 12), lo);
    const __m256i units = _mm256_shuffle_epi8(
        both, _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
                               0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1));
    for (int p = 0; p < 2; ++p) {
      const __m256i t = p == 0 ? units : _mm256_srli_epi32(units, 12);
      __m256i x = _mm256_and_si256(t, _mm256_set1_epi32(0x7));
      x = _mm256_or_si256(x, _mm256_and_si256(_mm256_slli_epi32(t, 5), _mm256_set1_epi32(0x700)));
      x = _mm256_or_si256(x, _mm256_and_si256(_mm256_slli_epi32(t, 10), _mm256_set1_epi32(0x70000)));
      v[p] = _mm256_or_si256(x, _mm256_and_si256(_mm256_slli_epi32(t, 15), _mm256_set1_epi32(0x7000000)));
    }
  } else {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    if constexpr (BITS == 8) {
      v[0] = _mm256_xor_si256(raw, _mm256_set1_epi8(static_cast<char>(0x80)));
      v[1] = _mm256_abs_epi8(v[0]);
    } else {
      const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << BITS) - 1));
      for (int p = 0; p < 8 / BITS; ++p) v[p] = _mm256_and_si256(_mm256_srli_epi16(raw, p * BITS), mask);
    }
  }
}

// One chunk of codes against one row's int8 activations: 8 int32 partial sums.
template <int BITS>
__attribute__((target("avx2,fma"))) inline __m256i chunk_dot(const __m256i* v, const int8_t* q) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (BITS == 8) {
    const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(v[1], _mm256_sign_epi8(av, v[0])), ones);
  } else {
    // (2^BITS - 1) * 127 * 2 per plane, at most 4 planes: within int16
    __m256i s16 = _mm256_maddubs_epi16(v[0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
    for (int p = 1; p < planes_of(BITS); ++p) {
      s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(v[p], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * p))));
    }
    return _mm256_madd_epi16(s16, ones);
  }
}

// Unit u of a row, its chunks whole: part[i][a] += (int32 sums of the unit's chunks) * scales.
// A unit is a group of `span` chunks (groups of at least a chunk), or one chunk whose lanes
// belong to several groups (smaller groups: their scales permuted into the lanes).
// SPAN > 0: the unit's chunk count known at compile time (the loop unrolled), else `span`.
template <int BITS, int M, int A, int SPAN>
__attribute__((target("avx2,fma"), always_inline)) inline void unit_fma(const uint8_t* row, const int8_t* qa,
                                                                        const float* cs, int64_t srow, int64_t kpad,
                                                                        int64_t u, int64_t span_rt, int64_t groups_per_unit,
                                                                        __m256i lanes, __m256 (&part)[M][A], int a) {
  constexpr int P = planes_of(BITS);
  constexpr int64_t CH = chunk_bytes * P, SB = stride_of(BITS);
  const int64_t span = SPAN > 0 ? SPAN : span_rt;
  __m256i isum[M];
  for (int i = 0; i < M; ++i) isum[i] = _mm256_setzero_si256();
#pragma GCC unroll 4
  for (int64_t s = 0; s < span; ++s) {
    const int64_t ch = u * span + s;
    __m256i v[P > 2 ? P : 2];
    prepare_codes<BITS>(row + ch * SB, v);
    for (int i = 0; i < M; ++i) isum[i] = _mm256_add_epi32(isum[i], chunk_dot<BITS>(v, qa + i * kpad + ch * CH));
  }
  for (int i = 0; i < M; ++i) {
    const __m256 sc = chunk_scales(cs + i * srow + u * groups_per_unit, groups_per_unit == 1, lanes);
    part[i][a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), sc, part[i][a]);
  }
}

// Units [0, full) of a row into part (A accumulators per row taken in turn).
template <int BITS, int M, int A, int SPAN>
__attribute__((target("avx2,fma"))) void units_pass(const uint8_t* row, const int8_t* qa, const float* cs, int64_t srow,
                                                    int64_t kpad, int64_t full, int64_t span, int64_t per_unit,
                                                    __m256i lanes, __m256 (&part)[M][A]) {
  int64_t u = 0;
  for (; u + A <= full; u += A) {
#pragma GCC unroll 4
    for (int a = 0; a < A; ++a) unit_fma<BITS, M, A, SPAN>(row, qa, cs, srow, kpad, u + a, span, per_unit, lanes, part, a);
  }
  for (; u < full; ++u) unit_fma<BITS, M, A, SPAN>(row, qa, cs, srow, kpad, u, span, per_unit, lanes, part, 0);
}

// Lane l of a chunk's 8 int32 partial sums covers codes [l * CH / 8, (l + 1) * CH / 8) of it.
template <int BITS, int M>
__attribute__((target("avx2,fma,f16c"))) void rows_avx2(const int8_rows_input& in, const quantized_matrix& b,
                                                       int64_t j0, int64_t j1, float* c, int64_t ldc) {
  constexpr int P = planes_of(BITS);
  constexpr int64_t CH = chunk_bytes * P, SB = stride_of(BITS);
  constexpr int A = M == 1 ? 4 : M == 2 ? 2 : 1;  // accumulators per row in the whole-group loop
  const int64_t G = b.group_size, kpad = in.kpad, chunks = kpad / CH, srow = in.groups_pad + 8;
  const int8_t* qa = in.q.data();
  const int64_t whole = b.row_bytes / SB;  // chunks lying inside a row
  const int64_t span = G >= CH ? G / CH : 1;  // chunks summed in int32 before their scale
  // G < CH: lane l belongs to group (chunk's first group) + l * CH / (8 G)
  alignas(32) int32_t lanes[8];
  for (int l = 0; l < 8; ++l) lanes[l] = static_cast<int32_t>(l * CH / (8 * G));
  const __m256i lane_group = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
  std::vector<float> cs(static_cast<size_t>(M * srow), 0.0f);  // scale_w * scale_a per row and group
  alignas(32) uint8_t tail[chunk_bytes];
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* row = b.codes + j * b.row_bytes;
    // Eight groups at a time: cs = scale_w * scale_a, and the zero term
    // sum_g scale_w * zero * (scale_a * sum of q) in lanes.
    __m256 acc[M], zt[M];
    for (int i = 0; i < M; ++i) acc[i] = zt[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < b.groups; g += 8) {
      const uint16_t* sp = b.scales + j * b.groups + g;
      const uint16_t* zp = b.zeros + j * b.groups + g;
      alignas(16) uint16_t s16[8] = {}, z16[8] = {};
      if (g + 8 > b.groups) {  // the row's last groups: never read past them
        std::memcpy(s16, sp, static_cast<size_t>(b.groups - g) * 2);
        std::memcpy(z16, zp, static_cast<size_t>(b.groups - g) * 2);
        sp = s16, zp = z16;
      }
      const __m256 sw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sp)));
      __m256 z = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zp)));
      if constexpr (BITS == 8) z = _mm256_sub_ps(z, _mm256_set1_ps(128.0f));
      const __m256 wz = _mm256_mul_ps(sw, z);
      for (int i = 0; i < M; ++i) {
        _mm256_storeu_ps(cs.data() + i * srow + g, _mm256_mul_ps(sw, _mm256_loadu_ps(in.scale.data() + i * srow + g)));
        zt[i] = _mm256_fmadd_ps(wz, _mm256_loadu_ps(in.scaled_sum.data() + i * srow + g), zt[i]);
      }
    }
    // Groups of whole chunks lying inside the row: int32 sums over the group's chunks, then one
    // FMA per group into A accumulators taken in turn (few rows: the FMA's latency, not the
    // loads, would set the pace with one).
    int64_t ch0 = 0;
    if (G % CH == 0 || CH % G == 0) {
      const int64_t per_unit = G >= CH ? 1 : CH / G;           // groups in a unit
      const int64_t full = std::min(G >= CH ? b.groups : chunks, whole / span);  // units of whole chunks
      __m256 part[M][A];
      for (int i = 0; i < M; ++i)
        for (int a = 0; a < A; ++a) part[i][a] = _mm256_setzero_ps();
      switch (span) {
        case 1: units_pass<BITS, M, A, 1>(row, qa, cs.data(), srow, kpad, full, span, per_unit, lane_group, part); break;
        case 2: units_pass<BITS, M, A, 2>(row, qa, cs.data(), srow, kpad, full, span, per_unit, lane_group, part); break;
        case 4: units_pass<BITS, M, A, 4>(row, qa, cs.data(), srow, kpad, full, span, per_unit, lane_group, part); break;
        default: units_pass<BITS, M, A, 0>(row, qa, cs.data(), srow, kpad, full, span, per_unit, lane_group, part);
      }
      for (int i = 0; i < M; ++i)
        for (int a = 0; a < A; ++a) acc[i] = _mm256_add_ps(acc[i], part[i][a]);
      ch0 = full * span;
    }
    for (; ch0 < chunks; ch0 += span) {  // the rest: chunks of one group, or one chunk
      __m256i isum[M];
      for (int i = 0; i < M; ++i) isum[i] = _mm256_setzero_si256();
      for (int64_t ch = ch0; ch < std::min(chunks, ch0 + span); ++ch) {
        const uint8_t* src = row + ch * SB;
        if (ch >= whole) {  // the row's last bytes: never read past them
          std::memset(tail, 0, sizeof tail);
          const int64_t left = b.row_bytes - ch * SB;
          if (left > 0) std::memcpy(tail, src, static_cast<size_t>(left));
          src = tail;
        }
        __m256i v[P > 2 ? P : 2];
        prepare_codes<BITS>(src, v);
        for (int i = 0; i < M; ++i) isum[i] = _mm256_add_epi32(isum[i], chunk_dot<BITS>(v, qa + i * kpad + ch * CH));
      }
      const float* cs0 = cs.data() + ch0 * CH / G;  // row i's scales at cs0 + i * srow
      for (int i = 0; i < M; ++i) {
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), chunk_scales(cs0 + i * srow, G >= CH, lane_group), acc[i]);
      }
    }
    for (int i = 0; i < M; ++i) c[i * ldc + j] = hsum8(_mm256_sub_ps(acc[i], zt[i]));
  }
}

template <int BITS>
void rows_m(const int8_rows_input& in, const quantized_matrix& b, int64_t j0, int64_t j1, float* c,
            int64_t ldc) {
  switch (in.m) {
    case 1: return rows_avx2<BITS, 1>(in, b, j0, j1, c, ldc);
    case 2: return rows_avx2<BITS, 2>(in, b, j0, j1, c, ldc);
    case 3: return rows_avx2<BITS, 3>(in, b, j0, j1, c, ldc);
    case 4: return rows_avx2<BITS, 4>(in, b, j0, j1, c, ldc);
    case 5: return rows_avx2<BITS, 5>(in, b, j0, j1, c, ldc);
    case 6: return rows_avx2<BITS, 6>(in, b, j0, j1, c, ldc);
    case 7: return rows_avx2<BITS, 7>(in, b, j0, j1, c, ldc);
    default: return rows_avx2<BITS, 8>(in, b, j0, j1, c, ldc);
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
      const int64_t c0 = g * G, n = std::min(G, k - c0);
      float amax = 0.0f;
      for (int64_t t = 0; t < n; ++t) amax = std::max(amax, std::fabs(ai[c0 + t]));
      const float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      int32_t sum = 0;
      for (int64_t t = 0; t < n; ++t) {
        const int v = static_cast<int>(std::lrint(ai[c0 + t] * inv));
        natural[static_cast<size_t>(c0 + t)] = static_cast<int8_t>(std::clamp(v, -127, 127));
        sum += natural[static_cast<size_t>(c0 + t)];
      }
      in.scale[static_cast<size_t>(i * srow + g)] = scale;
      in.scaled_sum[static_cast<size_t>(i * srow + g)] = scale * static_cast<float>(sum);
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
  switch (b.bits) {
    case 8: return rows_m<8>(in, b, j0, j1, c, ldc);
    case 4: return rows_m<4>(in, b, j0, j1, c, ldc);
    case 3: return rows_m<3>(in, b, j0, j1, c, ldc);
    case 2: return rows_m<2>(in, b, j0, j1, c, ldc);
    default: break;
  }
#endif
  (void)in, (void)b, (void)j0, (void)j1, (void)c, (void)ldc;
}

}  // namespace pregated::cpu
