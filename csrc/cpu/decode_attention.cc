#include "decode_attention.h"

#include <cmath>
#include <vector>

#include "half.h"
#include "simd_x86.h"
#include "thread_pool.h"

namespace pregated::cpu {

namespace {

// --- portable ---------------------------------------------------------------------------------

void rope_head_portable(dtype dt, int64_t d, void* x, const void* cos, const void* sin) {
  const int64_t half = d / 2;
  std::vector<float> in(static_cast<size_t>(d));
  for (int64_t i = 0; i < d; ++i) in[i] = widen_at(dt, x, i);
  for (int64_t i = 0; i < d; ++i) {
    const float rotated = i < half ? -in[i + half] : in[i - half];
    const float a = round_to(dt, in[i] * widen_at(dt, cos, i));
    const float b = round_to(dt, rotated * widen_at(dt, sin, i));
    store_at(dt, x, i, a + b);
  }
}

float dot_portable(dtype dt, const float* q, const void* k, int64_t d) {
  float s = 0;
  for (int64_t i = 0; i < d; ++i) s += q[i] * widen_at(dt, k, i);
  return s;
}

void axpy_portable(dtype dt, float p, const void* v, float* acc, int64_t d) {
  for (int64_t i = 0; i < d; ++i) acc[i] += p * widen_at(dt, v, i);
}

// --- AVX2 -------------------------------------------------------------------------------------

#if defined(__x86_64__) && defined(__GNUC__)

template <dtype DT>
__attribute__((target("avx2,fma,f16c"))) void rope_head_avx2(int64_t d, void* x, const void* cos, const void* sin) {
  const int64_t half = d / 2;
  if (half % 8 != 0) return rope_head_portable(DT, d, x, cos, sin);
  for (int64_t i = 0; i < half; i += 8) {
    const __m256 x1 = load8<DT>(x, i), x2 = load8<DT>(x, i + half);
    const __m256 lo = _mm256_add_ps(round8<DT>(_mm256_mul_ps(x1, load8<DT>(cos, i))),
                                    round8<DT>(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), x2), load8<DT>(sin, i))));
    const __m256 hi = _mm256_add_ps(round8<DT>(_mm256_mul_ps(x2, load8<DT>(cos, i + half))),
                                    round8<DT>(_mm256_mul_ps(x1, load8<DT>(sin, i + half))));
    store8<DT>(x, i, lo);  // both halves of chunk i were read above; later chunks are elsewhere
    store8<DT>(x, i + half, hi);
  }
}

template <dtype DT>
__attribute__((target("avx2,fma,f16c"))) float dot_avx2(const float* q, const void* k, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8<DT>(k, i), acc);
  float s = hsum8(acc);
  for (; i < d; ++i) s += q[i] * widen_at(DT, k, i);
  return s;
}

template <dtype DT>
__attribute__((target("avx2,fma,f16c"))) void axpy_avx2(float p, const void* v, float* acc, int64_t d) {
  const __m256 vp = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(vp, load8<DT>(v, i), _mm256_loadu_ps(acc + i)));
  for (; i < d; ++i) acc[i] += p * widen_at(DT, v, i);
}

#endif

bool& use_avx2() {
  static bool value = cpu_has_avx2();
  return value;
}

void rope_head(dtype dt, int64_t d, void* x, const void* cos, const void* sin) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) {
    switch (dt) {
      case dtype::dtype_f32: return rope_head_avx2<dtype::dtype_f32>(d, x, cos, sin);
      case dtype::dtype_bf16: return rope_head_avx2<dtype::dtype_bf16>(d, x, cos, sin);
      default: return rope_head_avx2<dtype::dtype_f16>(d, x, cos, sin);
    }
  }
#endif
  rope_head_portable(dt, d, x, cos, sin);
}

float dot(dtype dt, const float* q, const void* k, int64_t d) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) {
    switch (dt) {
      case dtype::dtype_f32: return dot_avx2<dtype::dtype_f32>(q, k, d);
      case dtype::dtype_bf16: return dot_avx2<dtype::dtype_bf16>(q, k, d);
      default: return dot_avx2<dtype::dtype_f16>(q, k, d);
    }
  }
#endif
  return dot_portable(dt, q, k, d);
}

void axpy(dtype dt, float p, const void* v, float* acc, int64_t d) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) {
    switch (dt) {
      case dtype::dtype_f32: return axpy_avx2<dtype::dtype_f32>(p, v, acc, d);
      case dtype::dtype_bf16: return axpy_avx2<dtype::dtype_bf16>(p, v, acc, d);
      default: return axpy_avx2<dtype::dtype_f16>(p, v, acc, d);
    }
  }
#endif
  axpy_portable(dt, p, v, acc, d);
}

// Below this many multiply-adds one thread does the whole call: a job on the pool costs more.
constexpr int64_t pool_work = int64_t{1} << 17;

}  // namespace

void rope_rows(dtype dt, int64_t rows, int64_t width, int64_t heads, int64_t d, void* x, const void* cos,
               const void* sin) {
  const int64_t es = dtype_size(dt);
  auto* xb = static_cast<uint8_t*>(x);
  const auto* cb = static_cast<const uint8_t*>(cos);
  const auto* sb = static_cast<const uint8_t*>(sin);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < heads; ++h) rope_head(dt, d, xb + (r * width + h * d) * es, cb + r * d * es, sb + r * d * es);
  }
}

void attention_rows(dtype dt, int64_t batch, int64_t new_rows, int64_t q_heads, int64_t kv_heads, int64_t keys,
                    int64_t d, const void* q, int64_t q_width, const void* k, kv_layout k_layout, const void* v,
                    kv_layout v_layout, float scale, void* out) {
  const int64_t es = dtype_size(dt);
  const int64_t group = q_heads / kv_heads;
  const auto* qb = static_cast<const uint8_t*>(q);
  const auto* kb = static_cast<const uint8_t*>(k);
  const auto* vb = static_cast<const uint8_t*>(v);
  auto* ob = static_cast<uint8_t*>(out);
  auto one = [&](int64_t task) {  // task = (b * new_rows + l) * q_heads + h
    const int64_t h = task % q_heads, row = task / q_heads, b = row / new_rows, l = row % new_rows;
    const int64_t limit = keys - new_rows + l + 1;
    const int64_t g = h / group;
    const uint8_t* kh = kb + (b * k_layout.batch_stride + g * k_layout.head_stride) * es;
    const uint8_t* vh = vb + (b * v_layout.batch_stride + g * v_layout.head_stride) * es;
    thread_local std::vector<float> qf, scores, acc;
    qf.resize(static_cast<size_t>(d));
    acc.assign(static_cast<size_t>(d), 0.0f);
    scores.resize(static_cast<size_t>(limit > 0 ? limit : 1));
    const uint8_t* qrow = qb + (row * q_width + h * d) * es;
    for (int64_t i = 0; i < d; ++i) qf[i] = widen_at(dt, qrow, i);
    float top = -INFINITY;
    for (int64_t j = 0; j < limit; ++j) {
      scores[j] = scale * dot(dt, qf.data(), kh + j * d * es, d);
      top = std::fmax(top, scores[j]);
    }
    float sum = 0;
    for (int64_t j = 0; j < limit; ++j) {
      scores[j] = std::exp(scores[j] - top);
      sum += scores[j];
    }
    for (int64_t j = 0; j < limit; ++j) axpy(dt, scores[j] / sum, vh + j * d * es, acc.data(), d);
    uint8_t* orow = ob + (row * q_heads + h) * d * es;
    for (int64_t i = 0; i < d; ++i) store_at(dt, orow, i, acc[i]);
  };
  const int64_t tasks = batch * new_rows * q_heads;
  if (tasks * keys * d < pool_work) {
    for (int64_t t = 0; t < tasks; ++t) one(t);
    return;
  }
  thread_pool::current().run(tasks, one);
}

void decode_attention_force_portable(bool portable) { use_avx2() = !portable && cpu_has_avx2(); }

}  // namespace pregated::cpu
