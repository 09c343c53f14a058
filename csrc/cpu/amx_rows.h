// GEMMs on Intel AMX tiles (Sapphire Rapids and later), C[i, j] = A[i, :] . B[j, :]:
// - bf16 weights, any number of rows of A (the callers take it from two): B's rows (the
//   weights' output columns) read in place, 16 at a time, as the tile multiply's first operand;
//   A rounded to bf16 (exact where it came from bf16 activations) and packed in pairs as its
//   second. One TDPBF16PS takes 16 columns x 32 of k x 16 rows of A, fp32 sums.
// - int8 and int4 codes (quantized experts), int8 up to 16 rows and int4 up to 8: A rounded to
//   int8 per weight group exactly as the AVX2/VNNI kernel does (quantized_int8.h); one TDPBUSD
//   takes 16 columns x 64 codes x 16 columns of activations, int32 sums, scaled per group in
//   fp32. int8 codes are read in place; int4 in pieces of 64 bytes of a row (128 codes), the
//   high nibbles masked in place and the low ones shifted up (16 x the codes, two tiles a piece).
//   Decode has few rows, so the activations' 16 columns carry 16 / rows groups side by side and
//   one tile of sums holds that many groups.
// Usable only where the CPU has AMX-BF16 and AMX-INT8 and Linux lets the process use its tile
// state (asked once); PREGATED_AMX=0 turns it off.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "pregated/backend.h"

namespace pregated::cpu {

// Whether the AMX path can run here: the CPU has it, the kernel grants it, PREGATED_AMX is not 0.
bool amx_usable();

// Whether amx_rows takes a GEMM with inner dimension k (whole 32s: tiles never read past a row).
inline bool amx_shape_ok(int64_t k) { return k > 0 && k % 32 == 0; }

// `count` values from a 64-byte boundary, zeroed or not: a tile row is one cache line (a tile
// load from 16-byte aligned rows, as std::vector gives, reads two lines a row and took twice the
// time of the int4 tiles' whole multiply). Throws std::bad_alloc.
struct aligned_free {
  void operator()(void* p) const { std::free(p); }
};
template <class T>
using aligned_buffer = std::unique_ptr<T[], aligned_free>;
void* aligned_bytes(int64_t bytes, bool zeroed);
template <class T>
aligned_buffer<T> aligned_array(int64_t count, bool zeroed = false) {
  return aligned_buffer<T>(static_cast<T*>(aligned_bytes(count * static_cast<int64_t>(sizeof(T)), zeroed)));
}
using bf16_buffer = aligned_buffer<uint16_t>;

// A's rows in blocks of 16 (the last padded with zeros), each block [k / 2][16][2] in bf16.
struct amx_input {
  int64_t m = 0, k = 0, blocks = 0;
  bf16_buffer packed;  // blocks * 16 * k
};

// From A in bf16 ([m, k], row stride lda).
amx_input pack_amx(int64_t m, int64_t k, const uint16_t* a, int64_t lda);
// The same in two steps, so that blocks can be packed on several threads: the buffer for m rows,
// then blocks [blk0, blk1) of it from A.
amx_input amx_buffer(int64_t m, int64_t k);
void pack_amx_blocks(amx_input& in, const uint16_t* a, int64_t lda, int64_t blk0, int64_t blk1);

// C[i, j] in bf16 (rounded to nearest even) for every row i < in.m and columns j in [j0, j1) of
// bf16 B ([n, k], row stride ldb).
void amx_rows(const amx_input& in, const uint16_t* b, int64_t ldb, int64_t j0, int64_t j1, uint16_t* c, int64_t ldc);

// Prefill with quantized weights in a bf16 model: whether amx_dequantize takes b (int8 or int4,
// groups of whole 16 codes, k whole groups and whole 32s), and rows [j0, j1) of b dequantized
// to bf16 ([j1 - j0, k]) for amx_rows. (code - zero) * scale in fp32, rounded to bf16.
bool amx_dequantize_ok(const quantized_matrix& b, int64_t k);
void amx_dequantize(const quantized_matrix& b, int64_t j0, int64_t j1, uint16_t* dst);

// Quantized weights: whether amx_codes takes b with inner dimension k and m rows (int8 or int4,
// groups of whole 64 codes, k whole groups, m <= 16 for int8 and <= 8 for int4).
bool amx_codes_ok(const quantized_matrix& b, int64_t m, int64_t k);

// A rounded to int8 per group of b and packed for the tiles, with each group's scales. The
// tiles' 16 columns carry `per_tile` groups side by side (16 / m rounded up to a power of two):
// group g, row i in column i * per_tile + g % per_tile (so a column's per-group weight scales,
// repeated every per_tile columns, are one broadcast load).
struct amx_codes_input {
  int64_t m = 0, per_tile = 16, blocks = 0;  // blocks: groups / per_tile, rounded up
  // int8, per 64 codes of k: [16 quads of codes][16 columns][4]. int4, per piece s of 128 codes:
  // two such tiles, tile h holding codes 128 s + 2 p + h at position p.
  aligned_buffer<int8_t> packed;
  std::vector<float> scale;       // [blocks][16 columns]: A ~= q * scale (0 in unused columns)
  std::vector<float> scaled_sum;  // [blocks][16 columns]: scale * (sum of the group's q)
};

amx_codes_input pack_amx_codes(int64_t m, int64_t k, const float* a, const quantized_matrix& b);

// C[i, j] for i < in.m and j in [j0, j1).
void amx_codes(const amx_codes_input& in, const quantized_matrix& b, int64_t j0, int64_t j1, float* c, int64_t ldc);

}  // namespace pregated::cpu
