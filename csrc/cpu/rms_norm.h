// RMS norm of rows, as transformers' Llama-style RMSNorm computes it: in float32,
// y = x * rsqrt(mean(x^2) + eps), rounded to x's dtype, times the weight, rounded again. One
// call replaces the eight tensor ops of the Python version (a decode step runs 2 per layer + 1,
// each paying PyTorch's dispatch and, after an expert has streamed through the caches, cache
// misses on every op's code and data).
#pragma once

#include <cstdint>

#include "pregated/types.h"

namespace pregated::cpu {

// x, w, out in dt (float32, bfloat16 or float16); x and out are `rows` rows of n, w is n.
// Many rows are split over the current pool; AVX2 (+F16C) and portable paths, picked at run time.
void rms_norm(dtype dt, int64_t rows, int64_t n, const void* x, const void* w, float eps, void* out);

// For tests: true forces the portable path, false restores the best this CPU has.
void rms_norm_force_portable(bool portable);

}  // namespace pregated::cpu
