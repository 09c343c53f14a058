#include "amx_rows.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "half.h"
#include "quantized_int8.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define PREGATED_AMX 1
// GCC 12 warns inside its own AVX-512 intrinsics (a known false positive), as in small_rows.cc.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace pregated::cpu {

namespace {

constexpr int64_t tile_rows = 16;  // columns of B (rows of a tile) and rows of A per block
constexpr int64_t tile_k = 32;     // bf16 values of k per tile row (64 bytes)
constexpr int64_t code_k = 64;     // codes of k per tile row (64 bytes)

// Byte p of a tile row of 64 codes holds code code_at(p): int8 in place; int4 unpacked as the
// low nibbles of the row's 32 bytes (even codes), then the high ones (odd codes).
inline int64_t code_at(int bits, int64_t p) { return bits == 8 ? p : p < 32 ? 2 * p : 2 * (p - 32) + 1; }

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

// Palette 1; tiles 0-1: C (two blocks of 16 columns), 2-3: B's rows, 4: A's packed pairs.
struct alignas(64) tile_config {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

tile_config config_for(int64_t columns) {  // columns <= 16 per C/B tile
  tile_config cfg;
  for (int t = 0; t < 4; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(columns);
    cfg.colsb[t] = 64;
  }
  cfg.rows[4] = tile_k / 2;
  cfg.colsb[4] = 64;
  return cfg;
}

// One block of 16 rows of A against `cols` (<= 16) columns from j, or two such runs of 16 (pair).
template <bool PAIR>
__attribute__((target("amx-tile,amx-bf16"))) void block(const uint16_t* pa, int64_t k, const uint16_t* b,
                                                        int64_t ldb, int64_t j, float* out) {
  _tile_zero(0);
  if constexpr (PAIR) _tile_zero(1);
  const long stride = static_cast<long>(ldb * 2);
  for (int64_t kk = 0; kk < k; kk += tile_k) {
    _tile_loadd(4, pa + kk * tile_rows, 64);
    _tile_loadd(2, b + j * ldb + kk, stride);
    _tile_dpbf16ps(0, 2, 4);
    if constexpr (PAIR) {
      _tile_loadd(3, b + (j + tile_rows) * ldb + kk, stride);
      _tile_dpbf16ps(1, 3, 4);
    }
  }
  _tile_stored(0, out, 64);
  if constexpr (PAIR) _tile_stored(1, out + tile_rows * tile_rows, 64);
}

// out holds C^T for columns j.. (16 per tile, each row 16 rows of A); write the first m rows.
void scatter(const float* out, int64_t cols, int64_t rows, float* c, int64_t ldc, int64_t j) {
  for (int64_t r = 0; r < cols; ++r) {
    for (int64_t i = 0; i < rows; ++i) c[i * ldc + j + r] = out[r * tile_rows + i];
  }
}

__attribute__((target("amx-tile,amx-bf16"))) void run_tiles(const amx_input& in, const uint16_t* b, int64_t ldb,
                                                            int64_t j0, int64_t j1, float* c, int64_t ldc) {
  alignas(64) float out[2 * tile_rows * tile_rows];
  const int64_t whole = j0 + (j1 - j0) / tile_rows * tile_rows;
  if (whole > j0) {
    const tile_config cfg = config_for(tile_rows);
    _tile_loadconfig(&cfg);
    // Column blocks outside, row blocks inside: a block of B (16 x k) stays in L2 for every block of A.
    int64_t j = j0;
    for (; j + 2 * tile_rows <= whole; j += 2 * tile_rows) {
      for (int64_t blk = 0; blk < in.blocks; ++blk) {
        block<true>(in.packed.data() + blk * in.k * tile_rows, in.k, b, ldb, j, out);
        const int64_t rows = std::min(tile_rows, in.m - blk * tile_rows);
        scatter(out, 2 * tile_rows, rows, c + blk * tile_rows * ldc, ldc, j);
      }
    }
    for (; j < whole; j += tile_rows) {
      for (int64_t blk = 0; blk < in.blocks; ++blk) {
        block<false>(in.packed.data() + blk * in.k * tile_rows, in.k, b, ldb, j, out);
        scatter(out, tile_rows, std::min(tile_rows, in.m - blk * tile_rows), c + blk * tile_rows * ldc, ldc, j);
      }
    }
  }
  if (whole < j1) {  // the last columns: tiles of fewer rows
    const tile_config cfg = config_for(j1 - whole);
    _tile_loadconfig(&cfg);
    for (int64_t blk = 0; blk < in.blocks; ++blk) {
      block<false>(in.packed.data() + blk * in.k * tile_rows, in.k, b, ldb, whole, out);
      scatter(out, j1 - whole, std::min(tile_rows, in.m - blk * tile_rows), c + blk * tile_rows * ldc, ldc, whole);
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

// 16 rows of 32 bytes of int4 codes from `src` (row stride `stride`) as 16 rows of 64 bytes.
__attribute__((target("avx2"))) inline void unpack_int4(const uint8_t* src, int64_t stride, int64_t rows,
                                                        uint8_t* dst) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t r = 0; r < rows; ++r) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + r * stride));
    _mm256_store_si256(reinterpret_cast<__m256i*>(dst + r * 64), _mm256_and_si256(v, low));
    _mm256_store_si256(reinterpret_cast<__m256i*>(dst + r * 64 + 32), _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
  }
}

// The scales of 16 columns from j as fp32, row r at r * stride: sw[g], swz[g] = scale * zero
// (zeros past the last column and past the last group, up to `stride`).
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) void column_scales(const quantized_matrix& b, int64_t j,
                                                                            int64_t cols, int64_t stride, float* sw,
                                                                            float* swz) {
  const int64_t groups = b.groups;
  for (int64_t r = 0; r < tile_rows; ++r) {
    for (int64_t g = 0; g < stride; g += 16) {
      const int64_t valid = r < cols ? std::clamp<int64_t>(groups - g, 0, 16) : 0;
      const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
      const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, b.scales + (j + r) * groups + g));
      const __m512 z = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, b.zeros + (j + r) * groups + g));
      _mm512_storeu_ps(sw + r * stride + g, s);
      _mm512_storeu_ps(swz + r * stride + g, _mm512_mul_ps(s, z));
    }
  }
}

// Group g's products into C tile U (B's codes through tile CT, the activations through tile
// AT); `buf` holds int4 codes unpacked. Tile numbers are literal in the instructions, so this
// is a macro.
#define PREGATED_GROUP_PRODUCTS(U, CT, AT, g, buf)                                                \
  for (int64_t s = 0; s < per_group; ++s) {                                                      \
    const int64_t c0 = (g) * G + s * code_k;                                                     \
    if constexpr (BITS == 8) {                                                                   \
      _tile_loadd(CT, codes + c0, static_cast<long>(b.row_bytes));                               \
    } else {                                                                                     \
      unpack_int4(codes + c0 / 2, b.row_bytes, cols, buf);                                       \
      _tile_loadd(CT, buf, 64);                                                                  \
    }                                                                                            \
    _tile_loadd(AT, in.packed.data() + (c0 / code_k) * tile_rows * code_k, 64);                  \
    _tile_dpbusd(U, CT, AT);                                                                     \
  }

// Block blk0 + U's P groups into C tile U; the int4 unpacking alternates between two buffers per
// tile.
#define PREGATED_BLOCK_PRODUCTS(U, CT, AT)                                                        \
  for (int64_t u = 0; u < P; ++u) {                                                               \
    const int64_t g = (blk0 + (U)) * P + u;                                                       \
    uint8_t* buf = unpacked + ((u & 1) * 4 + (U)) * tile_rows * 64;                               \
    if (g < groups) PREGATED_GROUP_PRODUCTS(U, CT, AT, g, buf)                                    \
  }

// C tile U's P groups (block blk) scaled into acc: lane (u, i) of column r's sums times
// scale_w[r, group u] * scale_a[i, group u], less the zero term.
#define PREGATED_SCALE_BLOCK(U, blk)                                                              \
  {                                                                                               \
    const int32_t* su = sums + (U) * tile_rows * tile_rows;                                       \
    const __m512 sa = _mm512_loadu_ps(in.scale.data() + (blk) * tile_rows);                       \
    const __m512 ss = _mm512_loadu_ps(in.scaled_sum.data() + (blk) * tile_rows);                  \
    const int64_t g0 = (blk) * P;                                                                 \
    _Pragma("GCC unroll 16") for (int r = 0; r < tile_rows; ++r) {                                \
      const __m512 x = _mm512_cvtepi32_ps(_mm512_load_si512(su + r * tile_rows));                 \
      const __m512 w = _mm512_permutexvar_ps(group_of_lane, _mm512_loadu_ps(sw.data() + r * gpad + g0));  \
      const __m512 wz = _mm512_permutexvar_ps(group_of_lane, _mm512_loadu_ps(swz.data() + r * gpad + g0)); \
      acc[r] = _mm512_fmadd_ps(x, _mm512_mul_ps(w, sa), acc[r]);                                   \
      acc[r] = _mm512_fnmadd_ps(wz, ss, acc[r]);                                                   \
    }                                                                                             \
  }

// A tile multiply sums 64 codes of k into C[column][n] for the 16 columns n of the activations'
// tile, and decode has few rows: the activations' tiles carry P = 16 / L groups side by side (L:
// the rows rounded up to a power of two; group g's rows in columns (g % P) * L + i, zeros
// elsewhere), so P consecutive groups add into one C tile without mixing, and one tile store and
// one pass of scaling serve P groups. Four C tiles in flight (blocks of P groups each).
template <int BITS>
__attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,f16c,avx2"))) void run_codes(
    const amx_codes_input& in, const quantized_matrix& b, int64_t j0, int64_t j1, float* c, int64_t ldc) {
  alignas(64) int32_t sums[4 * tile_rows * tile_rows];
  alignas(64) uint8_t unpacked[8 * tile_rows * 64];
  alignas(64) float out[tile_rows * tile_rows];
  const int64_t G = b.group_size, per_group = G / code_k, groups = b.groups, P = in.per_tile, L = in.lanes;
  // rows of whole 16 scales, and a 16-lane load from any block's first group stays inside
  const int64_t gpad = (in.blocks * P + 15) / 16 * 16 + 16;
  std::vector<float> sw(static_cast<size_t>(tile_rows * gpad)), swz(static_cast<size_t>(tile_rows * gpad));
  const __m512i group_of_lane = _mm512_srlv_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(__builtin_ctzll(static_cast<unsigned long long>(L))));
  int64_t configured = 0;
  for (int64_t j = j0; j < j1; j += tile_rows) {
    const int64_t cols = std::min(tile_rows, j1 - j);
    if (cols != configured) {
      const tile_config cfg = codes_config(cols);
      _tile_loadconfig(&cfg);
      configured = cols;
    }
    column_scales(b, j, cols, gpad, sw.data(), swz.data());
    __m512 acc[tile_rows];  // column r's sums, lanes (group slot u, row i)
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
    for (int r = 0; r < tile_rows; ++r) _mm512_store_ps(out + r * tile_rows, acc[r]);
    for (int64_t r = 0; r < cols; ++r) {
      for (int64_t i = 0; i < in.m; ++i) {
        float v = 0.0f;
        for (int64_t u = 0; u < P; ++u) v += out[r * tile_rows + u * L + i];
        c[i * ldc + j + r] = v;
      }
    }
  }
  _tile_release();
}
#undef PREGATED_SCALE_BLOCK
#undef PREGATED_BLOCK_PRODUCTS
#undef PREGATED_GROUP_PRODUCTS

#endif  // PREGATED_AMX

}  // namespace

bool amx_usable() {
#ifdef PREGATED_AMX
  static const bool usable = [] {
    const char* env = std::getenv("PREGATED_AMX");
    if (env != nullptr && std::strcmp(env, "0") == 0) return false;
    return cpu_has_amx() && kernel_grants_tiles();
  }();
  return usable;
#else
  return false;
#endif
}

amx_input pack_amx(int64_t m, int64_t k, const uint16_t* a, int64_t lda) {
  amx_input in;
  in.m = m;
  in.k = k;
  in.blocks = (m + tile_rows - 1) / tile_rows;
  in.packed.assign(static_cast<size_t>(in.blocks * tile_rows * k), 0);
  // block b, pair p = k / 2, row r within the block: [b][p][r][2]
  for (int64_t i = 0; i < m; ++i) {
    const int64_t blk = i / tile_rows, r = i % tile_rows;
    uint16_t* dst = in.packed.data() + blk * k * tile_rows + 2 * r;
    const uint16_t* src = a + i * lda;
    for (int64_t p = 0; p < k / 2; ++p) {
      dst[p * 2 * tile_rows] = src[2 * p];
      dst[p * 2 * tile_rows + 1] = src[2 * p + 1];
    }
  }
  return in;
}

void amx_rows(const amx_input& in, const uint16_t* b, int64_t ldb, int64_t j0, int64_t j1, float* c, int64_t ldc) {
#ifdef PREGATED_AMX
  if (j0 < j1) run_tiles(in, b, ldb, j0, j1, c, ldc);
#else
  (void)in, (void)b, (void)ldb, (void)j0, (void)j1, (void)c, (void)ldc;
#endif
}

bool amx_codes_ok(const quantized_matrix& b, int64_t m, int64_t k) {
  return (b.bits == 8 || b.bits == 4) && b.group_size % 64 == 0 && k % b.group_size == 0 && m >= 1 && m <= tile_rows &&
         b.groups * b.group_size == k;
}

amx_codes_input pack_amx_codes(int64_t m, int64_t k, const float* a, const quantized_matrix& b) {
  amx_codes_input in;
  in.m = m;
  while (in.lanes < m) in.lanes *= 2;
  in.per_tile = tile_rows / in.lanes;
  in.blocks = (b.groups + in.per_tile - 1) / in.per_tile;
  const int64_t G = b.group_size, L = in.lanes, P = in.per_tile;
  in.packed.assign(static_cast<size_t>(k * tile_rows), 0);
  in.scale.assign(static_cast<size_t>(in.blocks * tile_rows), 0.0f);
  in.scaled_sum.assign(static_cast<size_t>(in.blocks * tile_rows), 0.0f);
  std::vector<int8_t> q(static_cast<size_t>(k));
  for (int64_t i = 0; i < m; ++i) {
    const float* ai = a + i * k;
    for (int64_t g = 0; g < b.groups; ++g) {
      const size_t lane = static_cast<size_t>((g / P) * tile_rows + (g % P) * L + i);
      round_group(ai + g * G, G, q.data() + g * G, &in.scale[lane], &in.scaled_sum[lane]);
    }
    // tile of codes [c0, c0 + 64) of group g: byte (quad, column (g % P) L + i, e) holds the code
    // at tile position 4 quad + e; the other columns stay zero
    for (int64_t c0 = 0; c0 < k; c0 += code_k) {
      int8_t* tile = in.packed.data() + (c0 / code_k) * tile_rows * code_k;
      const int64_t col = (c0 / G) % P * L + i;
      for (int64_t p = 0; p < code_k; ++p) {
        tile[(p / 4) * tile_rows * 4 + col * 4 + p % 4] = q[static_cast<size_t>(c0 + code_at(b.bits, p))];
      }
    }
  }
  return in;
}

void amx_codes(const amx_codes_input& in, const quantized_matrix& b, int64_t j0, int64_t j1, float* c, int64_t ldc) {
#ifdef PREGATED_AMX
  if (j0 >= j1) return;
  if (b.bits == 8) run_codes<8>(in, b, j0, j1, c, ldc);
  else run_codes<4>(in, b, j0, j1, c, ldc);
#else
  (void)in, (void)b, (void)j0, (void)j1, (void)c, (void)ldc;
#endif
}

}  // namespace pregated::cpu
