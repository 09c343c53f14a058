// The CPU backend's bf16 GEMM on every kernel path this CPU can run (AMX tiles, vdpbf16ps,
// AVX-512, AVX2, portable) against a double-precision loop: row counts below, at and past a
// tile's 16, a row stride longer than k, column counts that leave tails, k whole 32s (the tiles
// take it) and not. Built into the sanitizer runs too.
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "harness.h"
#include "cpu/cpu_gemm.h"
#include "cpu/half.h"
#include "cpu/small_rows.h"

using namespace pregated;

namespace {

double relative_error(const std::vector<uint16_t>& c, const std::vector<double>& ref, int64_t m, int64_t n,
                      int64_t ldc) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const double d = cpu::bf16_to_f32(c[static_cast<size_t>(i * ldc + j)]) - ref[static_cast<size_t>(i * n + j)];
      num += d * d;
      den += ref[static_cast<size_t>(i * n + j)] * ref[static_cast<size_t>(i * n + j)];
    }
  }
  return std::sqrt(num / den);
}

}  // namespace

TEST(cpu_bf16_gemm_on_every_kernel_path) {
  const std::string best = cpu::small_rows_isa();
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const char* isa : {"amx", "avx512bf16", "avx512", "avx2", "portable"}) {
    if (!cpu::small_rows_force(isa)) continue;
    for (int64_t k : {64, 96, 45}) {
      // 40: a pair of 16-row blocks and one of 8; 100: three pairs and a block of 4 (prefill sizes)
      for (int64_t m : {1, 3, 8, 17, 40, 100}) {
        const int64_t n = 53, lda = k + 3, ldc = n + 2;
        std::vector<uint16_t> a(static_cast<size_t>(m * lda)), b(static_cast<size_t>(n * k));
        std::vector<uint16_t> c(static_cast<size_t>(m * ldc), 0x7FC0);  // NaN: every written entry is checked
        for (auto& v : a) v = cpu::f32_to_bf16(normal(rng));
        for (auto& v : b) v = cpu::f32_to_bf16(normal(rng));
        std::vector<double> ref(static_cast<size_t>(m * n));
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = 0; j < n; ++j) {
            double s = 0;
            for (int64_t t = 0; t < k; ++t) {
              s += static_cast<double>(cpu::bf16_to_f32(a[static_cast<size_t>(i * lda + t)])) *
                   cpu::bf16_to_f32(b[static_cast<size_t>(j * k + t)]);
            }
            ref[static_cast<size_t>(i * n + j)] = s;
          }
        }
        CHECK_OK(cpu::gemm_nt(dtype::dtype_bf16, m, n, k, a.data(), lda, b.data(), k, c.data(), ldc));
        const double err = relative_error(c, ref, m, n, ldc);
        if (!(err < 1e-2)) {
          CHECK(err < 1e-2);
          std::printf("    %s m=%lld k=%lld: relative error %.3g\n", isa, static_cast<long long>(m),
                      static_cast<long long>(k), err);
        }
      }
    }
  }
  cpu::small_rows_force(best.c_str());
}
