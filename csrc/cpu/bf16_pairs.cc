#include "bf16_pairs.h"

#include <algorithm>

#include "simd_x86.h"

namespace pregated::cpu {

std::vector<uint32_t> bf16_pairs_of(int64_t m, int64_t k, const uint16_t* a, int64_t lda) {
  const int64_t kh = (k + 1) / 2;
  std::vector<uint32_t> out(static_cast<size_t>(m * kh), 0);
  for (int64_t i = 0; i < m; ++i) {
    const uint16_t* row = a + i * lda;
    uint32_t* dst = out.data() + i * kh;
    for (int64_t p = 0; p < k / 2; ++p) dst[p] = static_cast<uint32_t>(row[2 * p]) | static_cast<uint32_t>(row[2 * p + 1]) << 16;
    if (k % 2 != 0) dst[kh - 1] = row[k - 1];
  }
  return out;
}

#ifdef PREGATED_X86

namespace {

constexpr int64_t cols = 64;  // columns of a packed block: four vectors of 16
constexpr int rows_max = 6;   // rows of sums in registers: 6 x 4 vectors, plus B's 4 and A's one

#define PREGATED_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Columns [j, j + nb) of B (nb <= 64) as pairs of k: out[p * 64 + c] = (B[j + c, 2p], B[j + c, 2p + 1]),
// zero past k and past nb.
PREGATED_BF16_TARGET void pack_block(int64_t k, const uint16_t* b, int64_t ldb, int64_t j, int64_t nb, uint32_t* out) {
  const int64_t kh = (k + 1) / 2;
  for (int64_t g = 0; g < cols / 16; ++g) {
    for (int64_t p0 = 0; p0 < kh; p0 += 16) {
      const int64_t left = k - 2 * p0;  // bf16 values of each column from word p0 on
      const __mmask32 mask = left >= 32 ? __mmask32(0xFFFFFFFFu) : static_cast<__mmask32>((1u << left) - 1);
      __m512 r[16];
      for (int c = 0; c < 16; ++c) {
        const int64_t col = g * 16 + c;
        r[c] = col < nb ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(mask, b + (j + col) * ldb + 2 * p0))
                        : _mm512_setzero_ps();
      }
      transpose16(r);  // r[w] lane c: word p0 + w of column c
      const int64_t words = std::min<int64_t>(16, kh - p0);
      for (int64_t w = 0; w < words; ++w) _mm512_storeu_ps(reinterpret_cast<float*>(out + (p0 + w) * cols + g * 16), r[w]);
    }
  }
}

// Sums of R rows of A (pairs, row stride kh words) and a packed block, into C's first nb columns.
template <int R>
PREGATED_BF16_TARGET void block_rows(int64_t kh, const uint32_t* a, const uint32_t* packed, float* c, int64_t ldc,
                                     int64_t nb) {
  __m512 acc[R][4];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < 4; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kh; ++p) {
    const uint32_t* w = packed + p * cols;
    const __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 16);
    const __m512i w2 = _mm512_loadu_si512(w + 32), w3 = _mm512_loadu_si512(w + 48);
    for (int i = 0; i < R; ++i) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[i * kh + p]));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], x, (__m512bh)w0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], x, (__m512bh)w1);
      acc[i][2] = _mm512_dpbf16_ps(acc[i][2], x, (__m512bh)w2);
      acc[i][3] = _mm512_dpbf16_ps(acc[i][3], x, (__m512bh)w3);
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int v = 0; v < 4; ++v) {
      const int64_t left = nb - 16 * v;
      if (left <= 0) break;
      const __mmask16 mask = left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
      _mm512_mask_storeu_ps(c + i * ldc + 16 * v, mask, acc[i][v]);
    }
  }
}

}  // namespace

void bf16_pairs_gemm(int64_t m, int64_t k, const uint32_t* a, const uint16_t* b, int64_t ldb, int64_t j0,
                     int64_t j1, float* c, int64_t ldc) {
  const int64_t kh = (k + 1) / 2;
  thread_local std::vector<uint32_t> packed;
  if (packed.size() < static_cast<size_t>((kh + 16) * cols)) packed.resize(static_cast<size_t>((kh + 16) * cols));
  for (int64_t j = j0; j < j1; j += cols) {
    const int64_t nb = std::min(cols, j1 - j);
    pack_block(k, b, ldb, j, nb, packed.data());
    for (int64_t i = 0; i < m; i += rows_max) {
      const uint32_t* ai = a + i * kh;
      float* ci = c + i * ldc + j;
      switch (std::min<int64_t>(rows_max, m - i)) {
        case 1: block_rows<1>(kh, ai, packed.data(), ci, ldc, nb); break;
        case 2: block_rows<2>(kh, ai, packed.data(), ci, ldc, nb); break;
        case 3: block_rows<3>(kh, ai, packed.data(), ci, ldc, nb); break;
        case 4: block_rows<4>(kh, ai, packed.data(), ci, ldc, nb); break;
        case 5: block_rows<5>(kh, ai, packed.data(), ci, ldc, nb); break;
        default: block_rows<6>(kh, ai, packed.data(), ci, ldc, nb); break;
      }
    }
  }
}

#else

void bf16_pairs_gemm(int64_t, int64_t, const uint32_t*, const uint16_t*, int64_t, int64_t, int64_t, float*, int64_t) {}

#endif

}  // namespace pregated::cpu
