// bf16 GEMM on Intel AMX tiles (Sapphire Rapids and later): C[i, j] = A[i, :] . B[j, :] for any
// number of rows of A, B's rows (the weights' output columns) read in place, 16 at a time, as
// the tile multiply's first operand; A rounded to bf16 (exact where it came from bf16
// activations) and packed in pairs as its second. One TDPBF16PS takes 16 columns x 32 of k x 16
// rows of A, fp32 sums. Usable only where the CPU has AMX-BF16 and Linux lets the process use
// its tile state (asked once); PREGATED_AMX=0 turns it off.
#pragma once

#include <cstdint>
#include <vector>

namespace pregated::cpu {

// Whether the AMX path can run here: the CPU has it, the kernel grants it, PREGATED_AMX is not 0.
bool amx_usable();

// Whether amx_rows takes a GEMM with inner dimension k (whole 32s: tiles never read past a row).
inline bool amx_shape_ok(int64_t k) { return k > 0 && k % 32 == 0; }

// A's rows in blocks of 16 (the last padded with zeros), each block [k / 2][16][2] in bf16.
struct amx_input {
  int64_t m = 0, k = 0, blocks = 0;
  std::vector<uint16_t> packed;
};

// From A in bf16 ([m, k], row stride lda).
amx_input pack_amx(int64_t m, int64_t k, const uint16_t* a, int64_t lda);

// C[i, j] for every row i < in.m and columns j in [j0, j1) of bf16 B ([n, k], row stride ldb).
void amx_rows(const amx_input& in, const uint16_t* b, int64_t ldb, int64_t j0, int64_t j1, float* c, int64_t ldc);

}  // namespace pregated::cpu
