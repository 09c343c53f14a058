#include "rms_norm.h"

#include <cmath>

#include "half.h"
#include "simd_x86.h"
#include "thread_pool.h"

namespace pregated::cpu {

namespace {

// The per-row scale and the output of elements [from, n), portable.
float sum_squares_portable(dtype dt, const void* x, int64_t from, int64_t n) {
  float s = 0;
  for (int64_t i = from; i < n; ++i) {
    const float v = widen_at(dt, x, i);
    s += v * v;
  }
  return s;
}

void scale_portable(dtype dt, const void* x, const void* w, float r, int64_t from, int64_t n, void* out) {
  for (int64_t i = from; i < n; ++i) {
    store_at(dt, out, i, widen_at(dt, w, i) * round_to(dt, widen_at(dt, x, i) * r));
  }
}

void row_portable(dtype dt, int64_t n, const void* x, const void* w, float eps, void* out) {
  const float r = 1.0f / std::sqrt(sum_squares_portable(dt, x, 0, n) / static_cast<float>(n) + eps);
  scale_portable(dt, x, w, r, 0, n, out);
}

#if defined(__x86_64__) && defined(__GNUC__)

template <dtype DT>
__attribute__((target("avx2,fma,f16c"))) void row_avx2(int64_t n, const void* x, const void* w, float eps, void* out) {
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  const int64_t whole = n / 8 * 8;
  for (int64_t i = 0; i < whole; i += 8) {
    const __m256 v = load8<DT>(x, i);
    acc[(i / 8) & 1] = _mm256_fmadd_ps(v, v, acc[(i / 8) & 1]);
  }
  const float s = hsum8(_mm256_add_ps(acc[0], acc[1])) + sum_squares_portable(DT, x, whole, n);
  const float r = 1.0f / std::sqrt(s / static_cast<float>(n) + eps);
  const __m256 vr = _mm256_set1_ps(r);
  for (int64_t i = 0; i < whole; i += 8) {
    store8<DT>(out, i, _mm256_mul_ps(load8<DT>(w, i), round8<DT>(_mm256_mul_ps(load8<DT>(x, i), vr))));
  }
  scale_portable(DT, x, w, r, whole, n, out);
}

#endif

bool& use_avx2() {
  static bool value = cpu_has_avx2();
  return value;
}

void row(dtype dt, int64_t n, const void* x, const void* w, float eps, void* out) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) {
    switch (dt) {
      case dtype::dtype_f32: return row_avx2<dtype::dtype_f32>(n, x, w, eps, out);
      case dtype::dtype_bf16: return row_avx2<dtype::dtype_bf16>(n, x, w, eps, out);
      default: return row_avx2<dtype::dtype_f16>(n, x, w, eps, out);
    }
  }
#endif
  row_portable(dt, n, x, w, eps, out);
}

// Below this many elements one thread does all rows: a job on the pool costs more.
constexpr int64_t pool_elements = int64_t{1} << 16;

}  // namespace

void rms_norm(dtype dt, int64_t rows, int64_t n, const void* x, const void* w, float eps, void* out) {
  const int64_t es = dt == dtype::dtype_f32 ? 4 : 2;
  const auto* xb = static_cast<const uint8_t*>(x);
  auto* ob = static_cast<uint8_t*>(out);
  if (rows * n < pool_elements) {
    for (int64_t i = 0; i < rows; ++i) row(dt, n, xb + i * n * es, w, eps, ob + i * n * es);
    return;
  }
  thread_pool::current().run(rows, [&](int64_t i) { row(dt, n, xb + i * n * es, w, eps, ob + i * n * es); });
}

void rms_norm_force_portable(bool portable) { use_avx2() = !portable && cpu_has_avx2(); }

}  // namespace pregated::cpu
