#include "amx_rows.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

#include "half.h"
#include "quantized_int8.h"
#include "simd_x86.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define PREGATED_AMX 1
// GCC 12 warns inside its own AVX-512 intrinsics (a known false positive), as in simd_x86.h.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace pregated::cpu {

namespace {

constexpr int64_t tile_rows = 16;  // columns of B (rows of a tile) and rows of A per block
constexpr int64_t tile_k = 32;     // bf16 values of k per tile row (64 bytes)
constexpr int64_t code_k = 64;     // codes of k per tile row (64 bytes)

#ifdef PREGATED_AMX

bool cpu_has_amx() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return (d & (1u << 22)) && (d & (1u << 24)) && (d & (1u << 25));  // AMX-BF16, AMX-TILE, AMX-INT8
}

bool kernel_grants_tiles() {
  constexpr long arch_req_xcomp_perm = 0x1023, xfeature_xtiledata = 18;
  return syscall(SYS_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0;
}

// A tile configuration, palette 1 (LDTILECFG's 64 bytes).
struct alignas(64) tile_config {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Palette 1; tiles 0-3: C (two blocks of rows of A x two blocks of 16 columns), 4-5: B's rows
// (16 columns each), 6-7: A's packed pairs (16 rows each).
tile_config config_for(int64_t columns) {  // columns <= 16 per C/B tile
  tile_config cfg;
  for (int t = 0; t < 6; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(columns);
    cfg.colsb[t] = 64;
  }
  for (int t = 6; t < 8; ++t) {
    cfg.rows[t] = tile_k / 2;
    cfg.colsb[t] = 64;
  }
  return cfg;
}

// NR blocks of 16 rows of A (pa0, pa1) against NC runs of `columns` (<= 16) columns of B from
// j and j + 16: C tile 2 r + c takes row block r and column run c; out[2 r + c] its 16 x 16 sums
// (row: a column of B, lane: a row of A). Per 32 of k: NC + NR tile loads, NC x NR multiplies.
template <int NR, int NC>
__attribute__((target("amx-tile,amx-bf16"))) void block(const uint16_t* pa0, const uint16_t* pa1, int64_t k,
                                                        const uint16_t* b, int64_t ldb, int64_t j, float* out) {
  _tile_zero(0);
  if constexpr (NC == 2) _tile_zero(1);
  if constexpr (NR == 2) _tile_zero(2);
  if constexpr (NR == 2 && NC == 2) _tile_zero(3);
  const long stride = static_cast<long>(ldb * 2);
  for (int64_t kk = 0; kk < k; kk += tile_k) {
    _tile_loadd(4, b + j * ldb + kk, stride);
    _tile_loadd(6, pa0 + kk * tile_rows, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NC == 2) {
      _tile_loadd(5, b + (j + tile_rows) * ldb + kk, stride);
      _tile_dpbf16ps(1, 5, 6);
    }
    if constexpr (NR == 2) {
      _tile_loadd(7, pa1 + kk * tile_rows, 64);
      _tile_dpbf16ps(2, 4, 7);
      if constexpr (NC == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  constexpr int64_t T = tile_rows * tile_rows;
  _tile_stored(0, out, 64);
  if constexpr (NC == 2) _tile_stored(1, out + T, 64);
  if constexpr (NR == 2) _tile_stored(2, out + 2 * T, 64);
  if constexpr (NR == 2 && NC == 2) _tile_stored(3, out + 3 * T, 64);
}

// Rows [16 blk, 16 blk + 16) of A (those from m on as zeros) packed in pairs: dst[p][r] = the
// pair p (32 bits) of row r, 16 pairs of 16 rows (1 KiB) at a time through transpose16.
__attribute__((target("avx512f"))) void pack_block(const uint16_t* a, int64_t lda, int64_t m, int64_t k, int64_t blk,
                                                  uint16_t* dst) {
  for (int64_t p0 = 0; p0 < k / 2; p0 += 16) {
    __m512 v[16];
    for (int64_t r = 0; r < 16; ++r) {
      const int64_t i = blk * tile_rows + r;
      v[r] = i < m ? _mm512_loadu_ps(reinterpret_cast<const float*>(a + i * lda + 2 * p0)) : _mm512_setzero_ps();
    }
    transpose16(v);
    for (int64_t q = 0; q < 16; ++q) _mm512_store_ps(reinterpret_cast<float*>(dst + (p0 + q) * 2 * tile_rows), v[q]);
  }
}

// Rows [j0, j1) of int8 or int4 codes dequantized, (code - zero) * scale in fp32 as
// dequantize_rows computes it, rounded to bf16 (VCVTNEPS2BF16), 16 codes at a time.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,f16c"))) void dequantize_block(const quantized_matrix& b,
                                                                                           int64_t j0, int64_t j1,
                                                                                           uint16_t* dst) {
  const int64_t G = b.group_size, k = b.groups * G;
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* row = b.codes + j * b.row_bytes;
    uint16_t* out = dst + (j - j0) * k;
    for (int64_t g = 0; g < b.groups; ++g) {
      const __m512 s = _mm512_set1_ps(_cvtsh_ss(b.scales[j * b.groups + g]));
      const __m512 z = _mm512_set1_ps(_cvtsh_ss(b.zeros[j * b.groups + g]));
      for (int64_t c0 = g * G; c0 < (g + 1) * G; c0 += 16) {
        __m128i codes;
        if (b.bits == 8) {
          codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c0));
        } else {  // code 2t in the low nibble of byte t, 2t + 1 in the high one
          const __m128i packed = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c0 / 2));
          const __m128i low = _mm_and_si128(packed, _mm_set1_epi8(0x0F));
          const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F));
          codes = _mm_unpacklo_epi8(low, high);
        }
        const __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes));
        const __m512 w = _mm512_mul_ps(_mm512_sub_ps(x, z), s);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c0), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(w)));
      }
    }
  }
}

// A block's sums (out: row r = column j + r of C, lane i = row i of the block) into C's rows
// [0, rows) and columns [j, j + cols) in bf16, rounded to nearest even (VCVTNEPS2BF16: as
// f32_to_bf16, but a denormal sum becomes a zero of its sign). Many rows: a 16 x 16 transpose in
// registers (64 shuffles) and a store of 16 columns a row; few rows: one element at a time (fewer
// operations).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void write_block(const float* out, int64_t rows, int64_t cols,
                                                                     uint16_t* c, int64_t ldc, int64_t j) {
  if (rows < 6) {
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t r = 0; r < cols; ++r) c[i * ldc + j + r] = f32_to_bf16(out[r * tile_rows + i]);
    }
    return;
  }
  __m512 v[16];
  for (int i = 0; i < 16; ++i) v[i] = _mm512_load_ps(out + i * tile_rows);  // v[r] lane i: C[i][j + r]
  transpose16(v);  // v[i] lane r: C[i][j + r]
  const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
  for (int64_t i = 0; i < rows; ++i) {
    _mm256_mask_storeu_epi16(c + i * ldc + j, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v[i])));
  }
}

// Columns [j, j + NC * 16) (the last run `cols` wide) for row blocks [blk0, blk1) of A, in pairs.
// Each block's sums are written out after the next block's tile work is issued (two buffers), so
// the vector work of the writing overlaps the tile multiplies instead of waiting between them.
template <int NC>
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16"))) void column_runs(
    const amx_input& in, const uint16_t* b, int64_t ldb, int64_t j, int64_t cols, int64_t blk0, int64_t blk1,
    uint16_t* c, int64_t ldc) {
  constexpr int64_t T = tile_rows * tile_rows;
  alignas(64) float out[2][4 * T];
  const auto pa = [&](int64_t blk) { return in.packed.get() + blk * in.k * tile_rows; };
  // the row blocks blk and blk + 1 (pair) whose sums are in out[buf]
  const auto write = [&](int64_t blk, bool pair, int buf) {
    for (int64_t r = 0; r < (pair ? 2 : 1); ++r) {
      const int64_t rows = std::min(tile_rows, in.m - (blk + r) * tile_rows);
      for (int64_t run = 0; run < NC; ++run) {
        write_block(out[buf] + (2 * r + run) * T, rows, run + 1 < NC ? tile_rows : cols,
                    c + (blk + r) * tile_rows * ldc, ldc, j + run * tile_rows);
      }
    }
  };
  int64_t pending = -1;  // the pair in out[buf ^ 1] not yet written
  int buf = 0;
  int64_t blk = blk0;
  for (; blk + 2 <= blk1; blk += 2, buf ^= 1) {
    block<2, NC>(pa(blk), pa(blk + 1), in.k, b, ldb, j, out[buf]);
    if (pending >= 0) write(pending, true, buf ^ 1);
    pending = blk;
  }
  if (blk < blk1) block<1, NC>(pa(blk), nullptr, in.k, b, ldb, j, out[buf]);
  if (pending >= 0) write(pending, true, buf ^ 1);
  if (blk < blk1) write(blk, false, buf);
}

// Chunks of rows of A outside, then column runs, then the chunk's row blocks: a run's rows of B
// (32 x k) stay in L1 or L2 for every block of the chunk, and the chunk's A (up to 256 rows) in L2
// for every run. Without the chunks every run read all of A again: 2000 rows x 512 of k is 2 MiB,
// about L2, read from further out by each of 96 runs of the 3072 columns of a prefill's gate/up.
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16"))) void run_tiles(
    const amx_input& in, const uint16_t* b, int64_t ldb, int64_t j0, int64_t j1, uint16_t* c, int64_t ldc) {
  constexpr int64_t chunk_blocks = 16;  // 256 rows: 256 KiB of A at k = 512
  const int64_t whole = j0 + (j1 - j0) / tile_rows * tile_rows;
  for (int64_t blk0 = 0; blk0 < in.blocks; blk0 += chunk_blocks) {
    const int64_t blk1 = std::min(in.blocks, blk0 + chunk_blocks);
    if (whole > j0) {
      const tile_config cfg = config_for(tile_rows);
      _tile_loadconfig(&cfg);
      int64_t j = j0;
      for (; j + 2 * tile_rows <= whole; j += 2 * tile_rows) column_runs<2>(in, b, ldb, j, tile_rows, blk0, blk1, c, ldc);
      if (j < whole) column_runs<1>(in, b, ldb, j, tile_rows, blk0, blk1, c, ldc);
    }
    if (whole < j1) {  // the last columns: tiles of fewer rows
      const tile_config cfg = config_for(j1 - whole);
      _tile_loadconfig(&cfg);
      column_runs<1>(in, b, ldb, whole, j1 - whole, blk0, blk1, c, ldc);
    }
  }
  _tile_release();
}

// --- quantized codes -------------------------------------------------------------------------


// Tiles 0-3: C of four groups (int32, `columns` rows x 16 rows of A), 4-5: B's codes (`columns`
// rows x 64), 6-7: A's packed codes; four groups in flight, so the tile multiplies overlap.
tile_config codes_config(int64_t columns) {
  tile_config cfg;
  for (int t = 0; t < 6; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(columns);
    cfg.colsb[t] = 64;
  }
  for (int t = 6; t < 8; ++t) {
    cfg.rows[t] = code_k / 4;
    cfg.colsb[t] = 64;
  }
  return cfg;
}

// The weights' scales of groups [g0, g0 + 16) of the 16 columns from j, as fp32, column r's at
// r * 16: sw[u] = scale, swz[u] = scale * zero (zeros past the last column and the last group).
// Taken a slice at a time as the blocks reach it, so that the conversion overlaps the stream of
// codes: all groups at once at the start of each 16 columns took 11% of the int4 host lane's time
// at 8 rows, most of it waiting on memory.
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) void slice_scales(const quantized_matrix& b, int64_t j,
                                                                           int64_t cols, int64_t g0, float* sw,
                                                                           float* swz) {
  const int64_t groups = b.groups;
  const __mmask16 mask = static_cast<__mmask16>((1u << std::clamp<int64_t>(groups - g0, 0, 16)) - 1);
  for (int64_t r = 0; r < tile_rows; ++r) {
    const __mmask16 m = r < cols ? mask : 0;
    const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, b.scales + (j + r) * groups + g0));
    const __m512 z = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, b.zeros + (j + r) * groups + g0));
    _mm512_store_ps(sw + r * 16, s);
    _mm512_store_ps(swz + r * 16, _mm512_mul_ps(s, z));
  }
}

// Per-slot values p[0, P) of one column over the lanes of a tile of sums, lane (row i, group slot
// u) = i * P + u: the P values repeated, one broadcast load (a permute by group was a second
// operation, on the port the scaling's arithmetic needs).
template <int P>
__attribute__((target("avx512f"))) inline __m512 slot_lanes(const float* p) {
  if constexpr (P == 16) {
    return _mm512_loadu_ps(p);
  } else if constexpr (P == 8) {
    return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(reinterpret_cast<const double*>(p))));
  } else if constexpr (P == 4) {
    return _mm512_broadcast_f32x4(_mm_loadu_ps(p));
  } else if constexpr (P == 2) {
    double pair;
    std::memcpy(&pair, p, sizeof pair);
    return _mm512_castpd_ps(_mm512_set1_pd(pair));
  } else {
    static_assert(P == 1, "group slots: 16 / rows rounded up to a power of two");
    return _mm512_set1_ps(*p);
  }
}

// Group g's products into C tile U (int8 codes read in place through tile CT, the activations
// through tile AT). Tile numbers are literal in the instructions, so this is a macro.
#define PREGATED_GROUP_PRODUCTS(U, CT, AT, g)                                                     \
  for (int64_t s = 0; s < per_group; ++s) {                                                      \
    const int64_t c0 = (g) * G + s * code_k;                                                     \
    _tile_loadd(CT, codes + c0, static_cast<long>(b.row_bytes));                                 \
    _tile_loadd(AT, in.packed.get() + (c0 / code_k) * tile_rows * code_k, 64);                  \
    _tile_dpbusd(U, CT, AT);                                                                     \
  }

// Block blk0 + U's P groups into C tile U.
#define PREGATED_BLOCK_PRODUCTS(U, CT, AT)                                                        \
  for (int64_t u = 0; u < P; ++u) {                                                               \
    const int64_t g = (blk0 + (U)) * P + u;                                                       \
    if (g < groups) PREGATED_GROUP_PRODUCTS(U, CT, AT, g)                                         \
  }

// A block's sums (column r's in row r, lanes (row i, group slot u)) into acc: times `factor` *
// scale_w[r, group u] (sw[r * 16 + u]) * scale_a[i, group u] (lane of sa_row), less the zero
// term scale_w * zero (swz) * scale_a * (sum of the group's activation codes) (ss_row).
template <int P>
__attribute__((target("avx512f"))) inline void scale_sums(const int32_t* sums, const float* sa_row, const float* ss_row,
                                                         float factor, const float* sw, const float* swz,
                                                         __m512 (&acc)[tile_rows]) {
  const __m512 sa = _mm512_mul_ps(_mm512_loadu_ps(sa_row), _mm512_set1_ps(factor));
  const __m512 ss = _mm512_loadu_ps(ss_row);
#pragma GCC unroll 16
  for (int r = 0; r < tile_rows; ++r) {
    const __m512 x = _mm512_cvtepi32_ps(_mm512_load_si512(sums + r * tile_rows));
    const __m512 w = slot_lanes<P>(sw + r * 16);
    const __m512 wz = slot_lanes<P>(swz + r * 16);
    acc[r] = _mm512_fnmadd_ps(wz, ss, _mm512_fmadd_ps(x, _mm512_mul_ps(w, sa), acc[r]));
  }
}

// Columns [0, cols) of C (row stride ldc) from acc: row i of column r is the sum over the group
// slots u of lane (i, u).
template <int P>
__attribute__((target("avx512f"))) inline void write_columns(const __m512 (&acc)[tile_rows], const amx_codes_input& in,
                                                            int64_t cols, float* c, int64_t ldc) {
  alignas(64) float out[tile_rows * tile_rows];
#pragma GCC unroll 16
  for (int r = 0; r < tile_rows; ++r) _mm512_store_ps(out + r * tile_rows, acc[r]);
  for (int64_t r = 0; r < cols; ++r) {
    for (int64_t i = 0; i < in.m; ++i) {
      float v = 0.0f;
      for (int64_t u = 0; u < P; ++u) v += out[r * tile_rows + i * P + u];
      c[i * ldc + r] = v;
    }
  }
}

// Block blk's sums (P groups from blk * P) scaled into acc, `factor` as scale_sums; the weights'
// scales of the next 16 groups converted when the block starts them.
template <int P>
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) inline void scale_block(
    const amx_codes_input& in, const quantized_matrix& b, int64_t j, int64_t cols, int64_t blk, const int32_t* sums,
    float factor, float* sw, float* swz, __m512 (&acc)[tile_rows]) {
  const int64_t g0 = blk * P;
  if (g0 % 16 == 0) slice_scales(b, j, cols, g0, sw, swz);
  scale_sums<P>(sums, in.scale.data() + blk * tile_rows, in.scaled_sum.data() + blk * tile_rows, factor, sw + g0 % 16,
                swz + g0 % 16, acc);
}

// C tile U's block blk scaled into acc.
#define PREGATED_SCALE_BLOCK(U, blk) \
  scale_block<P>(in, b, j, cols, blk, sums + (U) * tile_rows * tile_rows, 1.0f, sw, swz, acc);

// A tile multiply sums 64 codes of k into C[column][n] for the 16 columns n of the activations'
// tile, and decode has few rows: the activations' tiles carry P = 16 / L groups side by side (L:
// the rows rounded up to a power of two; group g's row i in column i * P + g % P, zeros
// elsewhere), so P consecutive groups add into one C tile without mixing, and one tile store and
// one pass of scaling serve P groups. Four C tiles in flight (blocks of P groups each). int8
// codes (int4 goes through run_pieces below).
template <int P>
__attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,f16c"))) void run_codes(
    const amx_codes_input& in, const quantized_matrix& b, int64_t j0, int64_t j1, float* c, int64_t ldc) {
  alignas(64) int32_t sums[4 * tile_rows * tile_rows];
  const int64_t G = b.group_size, per_group = G / code_k, groups = b.groups;
  alignas(64) float sw[tile_rows * 16], swz[tile_rows * 16];  // slice_scales
  int64_t configured = 0;
  for (int64_t j = j0; j < j1; j += tile_rows) {
    const int64_t cols = std::min(tile_rows, j1 - j);
    if (cols != configured) {
      const tile_config cfg = codes_config(cols);
      _tile_loadconfig(&cfg);
      configured = cols;
    }
    __m512 acc[tile_rows];  // column r's sums, lanes (row i, group slot u)
#pragma GCC unroll 16
    for (int r = 0; r < tile_rows; ++r) acc[r] = _mm512_setzero_ps();
    const uint8_t* codes = b.codes + j * b.row_bytes;
    for (int64_t blk0 = 0; blk0 < in.blocks; blk0 += 4) {
      const int64_t nb = std::min<int64_t>(4, in.blocks - blk0);
      // groups in order (each row of codes read front to back), tile U taking block blk0 + U
      _tile_zero(0);
      if (nb > 1) _tile_zero(1);
      if (nb > 2) _tile_zero(2);
      if (nb > 3) _tile_zero(3);
      PREGATED_BLOCK_PRODUCTS(0, 4, 6)
      if (nb > 1) PREGATED_BLOCK_PRODUCTS(1, 5, 7)
      if (nb > 2) PREGATED_BLOCK_PRODUCTS(2, 4, 6)
      if (nb > 3) PREGATED_BLOCK_PRODUCTS(3, 5, 7)
      _tile_stored(0, sums, 64);
      if (nb > 1) _tile_stored(1, sums + tile_rows * tile_rows, 64);
      if (nb > 2) _tile_stored(2, sums + 2 * tile_rows * tile_rows, 64);
      if (nb > 3) _tile_stored(3, sums + 3 * tile_rows * tile_rows, 64);
      PREGATED_SCALE_BLOCK(0, blk0)
      if (nb > 1) PREGATED_SCALE_BLOCK(1, blk0 + 1)
      if (nb > 2) PREGATED_SCALE_BLOCK(2, blk0 + 2)
      if (nb > 3) PREGATED_SCALE_BLOCK(3, blk0 + 3)
    }
    write_columns<P>(acc, in, cols, c + j, ldc);
  }
  _tile_release();
}
#undef PREGATED_SCALE_BLOCK
#undef PREGATED_BLOCK_PRODUCTS
#undef PREGATED_GROUP_PRODUCTS

// --- int4 codes in pieces ---------------------------------------------------------------------
//
// A piece is 64 bytes of a row of int4 codes (128 codes). Its high nibbles masked in place are 16 x
// the odd codes, its low nibbles shifted up 4 are 16 x the even codes: two tiles of 64 bytes a
// row, each byte of codes read once, three vector operations for 128 codes of a row (the half
// chunks unpacked to bytes took six for 64). Tile 2s + h of the activations holds the codes
// 128 s + 2 p + h at position p, so the even tile meets the even codes; the sums carry a factor
// 16, taken out in the scaling. 16 columns x 128 codes: two tile multiplies, at any row count.
//
// A tile load does not take data from the store buffer: it waits until the stores it reads have
// left the core. So piece s is unpacked into one buffer while piece s - 1's, unpacked a step
// earlier, goes through the tiles (its tile work issued first). Each row's codes are prefetched
// `piece_prefetch` pieces ahead, and the last pieces of a block of 16 columns prefetch the first
// ones of the next block, with its scales and zeros: sixteen rows read side by side are more
// streams than the hardware's prefetch keeps ahead of, and nothing else runs ahead across the
// block's end (Mixtral's gate and up at 4 rows, two cores: 5.0 ms without the prefetch, 4.0 with
// it; 0.9x of that again with the prefetch across blocks). Measured and not kept: 32 or 64 columns
// at a time sharing the activations' tiles (slower from memory: too many streams), chunks of k
// whose activation tiles stay in L1 (slower), the sums alternating between two C tiles, with the
// scaling a block late, unpacking two pieces ahead, the shift by an affine byte map (GFNI), the
// codes stored 16 rows by 16 rows (one sequential stream), the codes read by a tile load and
// stored for the unpack, prefetches into L2 further ahead, the zero points' term taken once per 16
// columns (m x groups FMAs and a sum across lanes, against 3 x 16 operations per block; faster
// from L2, the same from memory): none was faster.

constexpr int64_t piece_bytes = 2 * tile_rows * code_k;  // one unpacked piece: even tile, then odd
constexpr int64_t piece_prefetch = 4;

// Piece s of 16 rows (row stride `stride`; `valid` bytes of each row there; rows from `rows` on
// are left alone) as 16 x the even codes in buf and 16 x the odd codes after them, 64 bytes a row.
// Each row r also prefetches ahead + r * stride (ahead: null for nothing). Full: 16 rows of 64
// valid bytes and something ahead, the common case, unrolled with no mask or checks (the general
// loop spends as many instructions on its counters, mask and checks as on the unpack).
template <bool Full>
__attribute__((target("avx512f,avx512bw"))) inline void unpack_rows(const uint8_t* src, int64_t stride, int64_t rows,
                                                                    int64_t valid, const uint8_t* ahead, uint8_t* buf) {
  const __m512i high = _mm512_set1_epi8(static_cast<char>(0xF0));
  const __mmask64 mask = Full || valid >= 64 ? ~__mmask64{0} : (__mmask64{1} << valid) - 1;
#pragma GCC unroll 16
  for (int64_t r = 0; r < (Full ? tile_rows : rows); ++r) {
    if (Full || ahead != nullptr) _mm_prefetch(reinterpret_cast<const char*>(ahead + r * stride), _MM_HINT_T0);
    const __m512i v = Full ? _mm512_loadu_si512(src + r * stride) : _mm512_maskz_loadu_epi8(mask, src + r * stride);
    _mm512_store_si512(buf + r * 64, _mm512_and_si512(_mm512_slli_epi16(v, 4), high));
    _mm512_store_si512(buf + tile_rows * code_k + r * 64, _mm512_and_si512(v, high));
  }
}

__attribute__((target("avx512f,avx512bw"))) inline void unpack_piece(const uint8_t* src, int64_t stride, int64_t rows,
                                                                    int64_t valid, const uint8_t* ahead, uint8_t* buf) {
  if (rows == tile_rows && valid >= 64 && ahead != nullptr) return unpack_rows<true>(src, stride, rows, valid, ahead, buf);
  unpack_rows<false>(src, stride, rows, valid, ahead, buf);
}

// The scales and zeros of rows [j, j + rows) prefetched over `steps` steps, a share each (none
// for no rows).
struct scales_prefetch {
  const char *scales, *zeros;
  int64_t lines, per;  // 64-byte lines of each; lines a step
  scales_prefetch(const quantized_matrix& b, int64_t j, int64_t rows, int64_t steps)
      : scales(reinterpret_cast<const char*>(b.scales + j * b.groups)),
        zeros(reinterpret_cast<const char*>(b.zeros + j * b.groups)),
        lines((rows * b.groups * 2 + 63) / 64),
        per((lines + steps - 1) / steps) {}
  void step(int64_t q) const {
    for (int64_t l = q * per; l < std::min(lines, (q + 1) * per); ++l) {
      _mm_prefetch(scales + l * 64, _MM_HINT_T0);
      _mm_prefetch(zeros + l * 64, _MM_HINT_T0);
    }
  }
};

// An unpacked piece into C tile 0: the activations' even and odd tiles through 4 and 5, the
// codes' through 6 and 7.
__attribute__((target("amx-tile,amx-int8"))) inline void piece_products(const int8_t* activations, const uint8_t* buf) {
  _tile_loadd(4, activations, 64);
  _tile_loadd(5, activations + tile_rows * code_k, 64);
  _tile_loadd(6, buf, 64);
  _tile_loadd(7, buf + tile_rows * code_k, 64);
  _tile_dpbusd(0, 6, 4);
  _tile_dpbusd(0, 7, 5);
}

template <int P>
__attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,f16c"))) void run_pieces(
    const amx_codes_input& in, const quantized_matrix& b, int64_t j0, int64_t j1, float* c, int64_t ldc) {
  alignas(64) int32_t sums[tile_rows * tile_rows];
  alignas(64) uint8_t unpacked[2][piece_bytes];  // pieces s and s - 1
  const int64_t G = b.group_size;
  const int64_t pieces = (b.groups * G + 127) / 128, per_block = P * G / 128;  // k = groups * G
  alignas(64) float sw[tile_rows * 16], swz[tile_rows * 16];  // slice_scales
  const tile_config cfg = codes_config(tile_rows);
  _tile_loadconfig(&cfg);
  for (int64_t j = j0; j < j1; j += tile_rows) {
    const int64_t cols = std::min(tile_rows, j1 - j);
    if (cols < tile_rows) {  // the last columns: zero codes, zero sums in the rows past them
      for (auto& buf : unpacked) {
        std::memset(buf + cols * code_k, 0, static_cast<size_t>((tile_rows - cols) * code_k));
        std::memset(buf + (tile_rows + cols) * code_k, 0, static_cast<size_t>((tile_rows - cols) * code_k));
      }
    }
    __m512 acc[tile_rows];  // column r's sums, lanes (row i, group slot u)
#pragma GCC unroll 16
    for (auto& a : acc) a = _mm512_setzero_ps();
    const uint8_t* codes = b.codes + j * b.row_bytes;
    // the block after this one (its columns; 0: none), whose first pieces and scales it prefetches
    const int64_t next_cols = std::clamp<int64_t>(j1 - j - tile_rows, 0, tile_rows);
    const scales_prefetch next_scales(b, j + tile_rows, next_cols, pieces);
    // row 0's address `piece_prefetch` pieces after piece s, counted on into the next block
    const auto ahead = [&](int64_t s) -> const uint8_t* {
      const int64_t t = s + piece_prefetch;
      return t < pieces ? codes + t * 64 : next_cols > 0 ? codes + tile_rows * b.row_bytes + (t - pieces) * 64 : nullptr;
    };
    _tile_zero(0);
    unpack_piece(codes, b.row_bytes, cols, b.row_bytes, ahead(0), unpacked[0]);
    int64_t in_block = 0, blk = 0;  // pieces of block blk through the tiles
    for (int64_t s = 1; s <= pieces; ++s) {
      piece_products(in.packed.get() + (s - 1) * piece_bytes, unpacked[(s - 1) & 1]);
      next_scales.step(s - 1);
      if (s < pieces) unpack_piece(codes + s * 64, b.row_bytes, cols, b.row_bytes - s * 64, ahead(s), unpacked[s & 1]);
      if (++in_block < per_block && s != pieces) continue;
      // block blk's P groups are in (the sums carry 16 x the codes)
      in_block = 0;
      _tile_stored(0, sums, 64);
      _tile_zero(0);
      scale_block<P>(in, b, j, cols, blk, sums, 1.0f / 16, sw, swz, acc);
      ++blk;
    }
    write_columns<P>(acc, in, cols, c + j, ldc);
  }
  _tile_release();
}

// int4 codes in pieces, int8 codes in place, with P group slots a tile.
template <int P>
void run_slots(const amx_codes_input& in, const quantized_matrix& b, int64_t j0, int64_t j1, float* c, int64_t ldc) {
  if (b.bits == 4) run_pieces<P>(in, b, j0, j1, c, ldc);
  else run_codes<P>(in, b, j0, j1, c, ldc);
}

// scatter_codes (below). int4 pieces: each 16 codes' four dwords (two of even codes, two of odd)
// gathered in their 128-bit lane by one shuffle first.
__attribute__((target("avx512f,avx512bw"))) void scatter_codes_avx512(const int8_t* q, int64_t c0, int64_t col,
                                                                    bool pieces, int8_t* packed) {
  if (!pieces) {  // dword d of the 64 codes: quad d of the tile of c0
    const __m512i quads = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(tile_rows));
    _mm512_i32scatter_epi32(reinterpret_cast<int*>(packed) + (c0 / code_k) * tile_rows * tile_rows + col, quads,
                            _mm512_loadu_si512(q), 4);
    return;
  }
  // in each 128-bit lane: codes 0 2 4 6 | 8 10 12 14 | 1 3 5 7 | 9 11 13 15
  const __m512i order = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
  const __m512i v = _mm512_shuffle_epi8(_mm512_loadu_si512(q), order);
  // dword d of lane l: tile 2s + (d >= 2), quad (c0 % 128) / 8 + 2 l + d % 2; in dwords of packed
  const __m512i lanes = _mm512_setr_epi32(0, 16, 256, 256 + 16, 32, 48, 256 + 32, 256 + 48, 64, 80, 256 + 64, 256 + 80,
                                          96, 112, 256 + 96, 256 + 112);
  const int64_t base = (c0 / 128) * 2 * 256 + (c0 % 128) / 8 * 16 + col;
  _mm512_i32scatter_epi32(reinterpret_cast<int*>(packed) + base, lanes, v, 4);
}

#endif  // PREGATED_AMX


}  // namespace

bool amx_usable() {
#ifdef PREGATED_AMX
  static const bool usable = [] {
    const char* env = std::getenv("PREGATED_AMX");
    if (env != nullptr && std::strcmp(env, "0") == 0) return false;
    // AMX-BF16 CPUs have AVX512-BF16 (the bf16 results' rounding); asked all the same
    __builtin_cpu_init();
    return cpu_has_amx() && __builtin_cpu_supports("avx512bf16") && kernel_grants_tiles();
  }();
  return usable;
#else
  return false;
#endif
}

void* aligned_bytes(int64_t bytes, bool zeroed) {
  const size_t size = (static_cast<size_t>(bytes) + 63) / 64 * 64;  // aligned_alloc: whole alignments
  void* p = std::aligned_alloc(64, size == 0 ? 64 : size);
  if (p == nullptr) throw std::bad_alloc();
  if (zeroed) std::memset(p, 0, size);
  return p;
}

amx_input amx_buffer(int64_t m, int64_t k) {
  amx_input in;
  in.m = m;
  in.k = k;
  in.blocks = (m + tile_rows - 1) / tile_rows;
  in.packed = aligned_array<uint16_t>(in.blocks * tile_rows * k);
  return in;
}

void pack_amx_blocks(amx_input& in, const uint16_t* a, int64_t lda, int64_t blk0, int64_t blk1) {
  // block b, pair p = k / 2, row r within the block: [b][p][r][2], one pair a 32-bit word
#ifdef PREGATED_AMX
  for (int64_t blk = blk0; blk < blk1; ++blk) pack_block(a, lda, in.m, in.k, blk, in.packed.get() + blk * in.k * tile_rows);
#else
  (void)in, (void)a, (void)lda, (void)blk0, (void)blk1;
#endif
}

amx_input pack_amx(int64_t m, int64_t k, const uint16_t* a, int64_t lda) {
  amx_input in = amx_buffer(m, k);
  pack_amx_blocks(in, a, lda, 0, in.blocks);
  return in;
}

void amx_rows(const amx_input& in, const uint16_t* b, int64_t ldb, int64_t j0, int64_t j1, uint16_t* c, int64_t ldc) {
#ifdef PREGATED_AMX
  if (j0 < j1) run_tiles(in, b, ldb, j0, j1, c, ldc);
#else
  (void)in, (void)b, (void)ldb, (void)j0, (void)j1, (void)c, (void)ldc;
#endif
}

bool amx_codes_ok(const quantized_matrix& b, int64_t m, int64_t k) {
  // int4 up to 8 rows: then a block of groups (16 / rows rounded up, at least two) covers whole pieces
  const int64_t rows = b.bits == 8 ? tile_rows : tile_rows / 2;
  return (b.bits == 8 || b.bits == 4) && b.group_size % 64 == 0 && k % b.group_size == 0 && m >= 1 && m <= rows &&
         b.groups * b.group_size == k;
}

bool amx_dequantize_ok(const quantized_matrix& b, int64_t k) {
  return (b.bits == 8 || b.bits == 4) && b.group_size % 16 == 0 && b.groups * b.group_size == k && amx_shape_ok(k);
}

void amx_dequantize(const quantized_matrix& b, int64_t j0, int64_t j1, uint16_t* dst) {
#ifdef PREGATED_AMX
  dequantize_block(b, j0, j1, dst);
#else
  (void)b, (void)j0, (void)j1, (void)dst;
#endif
}

namespace {

// 64 activation codes from c0 (a multiple of 64, so one group) into the tiles at column `col`.
// int8: code c at tile c / 64, position p = c % 64, byte (p / 4) * 64 + col * 4 + p % 4. int4
// pieces: code c at tile 2 (c / 128) + c % 2, position p = (c % 128) / 2, the same byte of it.
// The tiles run only where the chosen path is "amx", which small_rows picks only with AVX-512F/BW/VL.
void scatter_codes(const int8_t* q, int64_t c0, int64_t col, bool pieces, int8_t* packed) {
#ifdef PREGATED_AMX
  scatter_codes_avx512(q, c0, col, pieces, packed);
#else
  (void)q, (void)c0, (void)col, (void)pieces, (void)packed;
#endif
}

}  // namespace

amx_codes_input pack_amx_codes(int64_t m, int64_t k, const float* a, const quantized_matrix& b) {
  amx_codes_input in;
  in.m = m;
  int64_t lanes = 1;  // m rounded up to a power of two
  while (lanes < m) lanes *= 2;
  in.per_tile = tile_rows / lanes;
  in.blocks = (b.groups + in.per_tile - 1) / in.per_tile;
  const int64_t G = b.group_size, P = in.per_tile;
  const bool pieces = b.bits == 4;
  in.packed = aligned_array<int8_t>(pieces ? (k + 127) / 128 * 2 * tile_rows * code_k : k * tile_rows, true);
  in.scale.assign(static_cast<size_t>(in.blocks * tile_rows), 0.0f);
  in.scaled_sum.assign(static_cast<size_t>(in.blocks * tile_rows), 0.0f);
  std::vector<int8_t> q(static_cast<size_t>(k));
  for (int64_t i = 0; i < m; ++i) {
    const float* ai = a + i * k;
    for (int64_t g = 0; g < b.groups; ++g) {
      const size_t lane = static_cast<size_t>((g / P) * tile_rows + i * P + g % P);
      round_group(ai + g * G, G, q.data() + g * G, &in.scale[lane], &in.scaled_sum[lane]);
    }
    for (int64_t c0 = 0; c0 < k; c0 += code_k) scatter_codes(q.data() + c0, c0, i * P + (c0 / G) % P, pieces, in.packed.get());
  }
  return in;
}

void amx_codes(const amx_codes_input& in, const quantized_matrix& b, int64_t j0, int64_t j1, float* c, int64_t ldc) {
#ifdef PREGATED_AMX
  if (j0 >= j1) return;
  switch (in.per_tile) {  // group slots a tile: 16 / rows rounded up to a power of two
    case 16: return run_slots<16>(in, b, j0, j1, c, ldc);
    case 8: return run_slots<8>(in, b, j0, j1, c, ldc);
    case 4: return run_slots<4>(in, b, j0, j1, c, ldc);
    case 2: return run_slots<2>(in, b, j0, j1, c, ldc);
    default: return run_slots<1>(in, b, j0, j1, c, ldc);
  }
#else
  (void)in, (void)b, (void)j0, (void)j1, (void)c, (void)ldc;
#endif
}

}  // namespace pregated::cpu
