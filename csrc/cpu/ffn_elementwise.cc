#include "ffn_elementwise.h"

#include <cmath>
#include <cstring>

#include "half.h"
#include "pregated/backend.h"
#include "simd_x86.h"
#include "thread_pool.h"

namespace pregated::cpu {

namespace {

// act(x) of every kind but the clamped ones, which need both halves (see act_portable).
float activation(ffn_kind kind, float x) {
  switch (kind) {
    case ffn_kind::ffn_kind_gated_silu:
    case ffn_kind::ffn_kind_silu:
      return x / (1.0f + std::exp(-x));
    case ffn_kind::ffn_kind_relu:
    case ffn_kind::ffn_kind_gated_relu:
      return x > 0 ? x : 0.0f;
    case ffn_kind::ffn_kind_relu2:
      return x > 0 ? x * x : 0.0f;
    case ffn_kind::ffn_kind_gated_gelu:
    case ffn_kind::ffn_kind_gelu:
      return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f));
    case ffn_kind::ffn_kind_gated_gelu_tanh:
    case ffn_kind::ffn_kind_gelu_tanh:
      return 0.5f * x * (1.0f + std::tanh(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    case ffn_kind::ffn_kind_gated_swiglu_oai:
    case ffn_kind::ffn_kind_gated_silu_clamped:
      break;
  }
  return x;
}

// Columns [from, I) of one row, any kind.
void act_portable(const expert_spec& sp, void* row, int64_t from) {
  const dtype dt = sp.dt;
  const int64_t width = sp.intermediate;
  const bool gated = ffn_is_gated(sp.kind);
  const bool oai = sp.kind == ffn_kind::ffn_kind_gated_swiglu_oai;
  const bool clamped = oai || sp.kind == ffn_kind::ffn_kind_gated_silu_clamped;
  for (int64_t j = from; j < width; ++j) {
    const float x = widen_at(dt, row, j);
    float v;
    if (clamped) {
      const float g = std::fmin(x, sp.limit);
      const float u = std::fmax(std::fmin(widen_at(dt, row, width + j), sp.limit), -sp.limit);
      v = oai ? (u + 1.0f) * g / (1.0f + std::exp(-sp.alpha * g)) : g / (1.0f + std::exp(-g)) * u;
    } else {
      v = activation(sp.kind, x);
      if (gated) v *= widen_at(dt, row, width + j);
    }
    store_at(dt, row, j, v);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)

// e^x for 8 floats: x = n ln2 + r, |r| <= ln2 / 2, e^r by Cephes' degree-6 polynomial, 2^n
// through the exponent bits; within 2 ulp of std::exp on [-87.3, 88.3] (x is clamped to it).
__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3365f)), _mm256_set1_ps(88.3762f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// silu(gate) (* up) for the silu kinds, 8 columns at a time; the rest portable.
template <dtype DT, bool GATED>
__attribute__((target("avx2,fma,f16c"))) void silu_avx2(const expert_spec& sp, void* row) {
  const int64_t width = sp.intermediate, whole = width / 8 * 8;
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t j = 0; j < whole; j += 8) {
    const __m256 x = load8<DT>(row, j);
    __m256 v = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
    if constexpr (GATED) v = _mm256_mul_ps(v, load8<DT>(row, width + j));
    store8<DT>(row, j, v);
  }
  act_portable(sp, row, whole);
}

template <dtype DT>
__attribute__((target("avx2,fma,f16c"))) void bias_avx2(void* row, int64_t width, const void* bias) {
  const int64_t whole = width / 8 * 8;
  for (int64_t j = 0; j < whole; j += 8) store8<DT>(row, j, _mm256_add_ps(load8<DT>(row, j), load8<DT>(bias, j)));
  for (int64_t j = whole; j < width; ++j) store_at(DT, row, j, widen_at(DT, row, j) + widen_at(DT, bias, j));
}

template <dtype DT>
__attribute__((target("avx2,fma,f16c"))) void combine_avx2(void* out, const void* y, const int32_t* rows,
                                                           const float* w, int64_t top_k, int64_t width) {
  const int64_t whole = width / 8 * 8, es = DT == dtype::dtype_f32 ? 4 : 2;
  const auto* yb = static_cast<const uint8_t*>(y);
  for (int64_t c = 0; c < whole; c += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < top_k; ++k) {
      acc = _mm256_fmadd_ps(_mm256_set1_ps(w[k]), load8<DT>(yb + rows[k] * width * es, c), acc);
    }
    store8<DT>(out, c, acc);
  }
  for (int64_t c = whole; c < width; ++c) {
    float acc = 0;
    for (int64_t k = 0; k < top_k; ++k) acc += w[k] * widen_at(DT, yb + rows[k] * width * es, c);
    store_at(DT, out, c, acc);
  }
}

#endif

bool vectors() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx2 = cpu_has_avx2();
  return avx2 && std::strcmp(cpu_kernel_isa(), "portable") != 0;
#else
  return false;
#endif
}

void activate_row(const expert_spec& sp, void* row, bool vec) {
#if defined(__x86_64__) && defined(__GNUC__)
  const bool silu = sp.kind == ffn_kind::ffn_kind_gated_silu || sp.kind == ffn_kind::ffn_kind_silu;
  if (silu && vec) {
    const bool gated = sp.kind == ffn_kind::ffn_kind_gated_silu;
    switch (sp.dt) {
      case dtype::dtype_f32: return gated ? silu_avx2<dtype::dtype_f32, true>(sp, row) : silu_avx2<dtype::dtype_f32, false>(sp, row);
      case dtype::dtype_bf16: return gated ? silu_avx2<dtype::dtype_bf16, true>(sp, row) : silu_avx2<dtype::dtype_bf16, false>(sp, row);
      case dtype::dtype_f16: return gated ? silu_avx2<dtype::dtype_f16, true>(sp, row) : silu_avx2<dtype::dtype_f16, false>(sp, row);
    }
  }
#endif
  act_portable(sp, row, 0);
}

void bias_row(dtype dt, void* row, int64_t width, const void* bias, bool vec) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (vec) {
    switch (dt) {
      case dtype::dtype_f32: return bias_avx2<dtype::dtype_f32>(row, width, bias);
      case dtype::dtype_bf16: return bias_avx2<dtype::dtype_bf16>(row, width, bias);
      case dtype::dtype_f16: return bias_avx2<dtype::dtype_f16>(row, width, bias);
    }
  }
#endif
  for (int64_t j = 0; j < width; ++j) store_at(dt, row, j, widen_at(dt, row, j) + widen_at(dt, bias, j));
}

void combine_row(dtype dt, void* out, const void* y, const int32_t* rows, const float* w, int64_t top_k, int64_t width,
                 bool vec) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (vec) {
    switch (dt) {
      case dtype::dtype_f32: return combine_avx2<dtype::dtype_f32>(out, y, rows, w, top_k, width);
      case dtype::dtype_bf16: return combine_avx2<dtype::dtype_bf16>(out, y, rows, w, top_k, width);
      case dtype::dtype_f16: return combine_avx2<dtype::dtype_f16>(out, y, rows, w, top_k, width);
    }
  }
#endif
  const int64_t es = static_cast<int64_t>(dtype_size(dt));
  for (int64_t c = 0; c < width; ++c) {
    float acc = 0;
    for (int64_t k = 0; k < top_k; ++k) acc += w[k] * widen_at(dt, static_cast<const uint8_t*>(y) + rows[k] * width * es, c);
    store_at(dt, out, c, acc);
  }
}

// Below this many elements one thread does every row: a job on the pool costs more.
constexpr int64_t pool_elements = int64_t{1} << 16;

// fn(r) for r in [0, rows), in tasks of whole rows on the current pool when there is enough work.
template <class Fn>
void over_rows(int64_t rows, int64_t width, Fn&& fn) {
  thread_pool::current().run_split(rows, rows * width >= pool_elements, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) fn(r);
  });
}

}  // namespace

void activate_rows(const expert_spec& sp, void* data, int64_t rows, int64_t ld) {
  const int64_t es = static_cast<int64_t>(dtype_size(sp.dt));
  const bool vec = vectors();
  over_rows(rows, sp.intermediate, [&](int64_t r) { activate_row(sp, static_cast<uint8_t*>(data) + r * ld * es, vec); });
}

void add_bias_rows(dtype dt, void* data, int64_t rows, int64_t width, int64_t ld, const void* bias) {
  const int64_t es = static_cast<int64_t>(dtype_size(dt));
  const bool vec = vectors();
  over_rows(rows, width, [&](int64_t r) { bias_row(dt, static_cast<uint8_t*>(data) + r * ld * es, width, bias, vec); });
}

void combine_rows(dtype dt, void* out, const void* y, const int32_t* row_of, const float* weights, int64_t tokens,
                  int64_t top_k, int64_t width) {
  const int64_t es = static_cast<int64_t>(dtype_size(dt));
  const bool vec = vectors();
  over_rows(tokens, width * top_k, [&](int64_t t) {
    combine_row(dt, static_cast<uint8_t*>(out) + t * width * es, y, row_of + t * top_k, weights + t * top_k, top_k, width,
                vec);
  });
}

}  // namespace pregated::cpu
