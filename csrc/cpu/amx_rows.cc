#include "amx_rows.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define PREGATED_AMX 1
#endif

namespace pregated::cpu {

namespace {

constexpr int64_t tile_rows = 16;  // columns of B (rows of a tile) and rows of A per block
constexpr int64_t tile_k = 32;     // bf16 values of k per tile row (64 bytes)

#ifdef PREGATED_AMX

bool cpu_has_amx_bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return (d & (1u << 22)) && (d & (1u << 24));  // AMX-BF16, AMX-TILE
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

#endif  // PREGATED_AMX

}  // namespace

bool amx_usable() {
#ifdef PREGATED_AMX
  static const bool usable = [] {
    const char* env = std::getenv("PREGATED_AMX");
    if (env != nullptr && std::strcmp(env, "0") == 0) return false;
    return cpu_has_amx_bf16() && kernel_grants_tiles();
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

}  // namespace pregated::cpu
