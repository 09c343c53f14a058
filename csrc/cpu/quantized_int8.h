// The AVX2 decode kernel for int8, int4, int3 and int2 expert weights: A rounded to int8 per weight
// group (one scale per row and group, like llama.cpp's and KTransformers' CPU kernels), so 32
// products take one instruction (vpmaddubsw) instead of four conversions and FMAs. The rounding
// error, below 0.4% of each group's largest activation, is small beside the weights' own (int4:
// about 1/30 of a group's range). The portable path keeps fp32 activations.
#pragma once

#include <cstdint>
#include <vector>

#include "pregated/backend.h"

namespace pregated::cpu {

// A rounded to int8, in the order the kernel reads each 32-byte chunk of codes.
struct int8_rows_input {
  int64_t m = 0;
  int64_t kpad = 0;                  // k padded to whole chunks (zeros)
  int64_t groups_pad = 0;            // groups of kpad; scale rows carry 8 more (zeros)
  std::vector<int8_t> q;             // [m, kpad]
  std::vector<float> scale;          // [m, groups_pad + 8]: A ~= q * scale per group
  std::vector<float> scaled_sum;     // [m, groups_pad + 8]: scale * (sum of q) per group
};

// Whether the int8 kernel runs b's format on this CPU (AVX2 chosen; 8, 4, 3 or 2 bits).
bool int8_rows_usable(const quantized_matrix& b);

// One group of n activations rounded to int8 (scale = the group's largest |a| / 127): q, and
// the scale and scale * (sum of q) written to *scale and *scaled_sum. Every int8-activation
// kernel rounds through this, so they multiply the same values.
void round_group(const float* a, int64_t n, int8_t* q, float* scale, float* scaled_sum);

int8_rows_input prepare_int8_rows(int64_t m, int64_t k, const float* a, const quantized_matrix& b);

// C[i, j] for i < m (<= 8), j in [j0, j1).
void int8_rows(const int8_rows_input& in, const quantized_matrix& b, int64_t j0, int64_t j1, float* c,
               int64_t ldc);

}  // namespace pregated::cpu
