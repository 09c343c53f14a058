// The CPU backend's bf16 GEMM on every kernel path this CPU can run (AMX tiles, vdpbf16ps,
// AVX-512, AVX2, portable) against a double-precision loop: row counts below, at and past a
// tile's 16, a row stride longer than k, column counts that leave tails, k whole 32s (the tiles
// take it) and not. Built into the sanitizer runs too.
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "harness.h"
#include "cpu/amx_rows.h"
#include "cpu/cpu_gemm.h"
#include "cpu/ffn_elementwise.h"
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
       for (int64_t n : {53, 150}) {  // 150: several blocks of 64 columns, and a partial one
        const int64_t lda = k + 3, ldc = n + 2;
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
          std::printf("    %s m=%lld k=%lld n=%lld: relative error %.3g\n", isa, static_cast<long long>(m),
                      static_cast<long long>(k), static_cast<long long>(n), err);
        }
       }
      }
    }
  }
  cpu::small_rows_force(best.c_str());
}

// The vector paths of the FFN's elementwise steps against the portable ones (float64 references
// for silu): gate values across silu's whole range (exp saturating at both ends), widths that are
// not multiples of 8, and rows enough to go over the pool.
TEST(cpu_ffn_elementwise_vector_paths_match_portable) {
  const std::string best = cpu::small_rows_isa();
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> wide(-95.0f, 95.0f), unit(-1.0f, 1.0f);
  for (ffn_kind kind : {ffn_kind::ffn_kind_gated_silu, ffn_kind::ffn_kind_silu}) {
    for (int64_t rows : {1, 300}) {
      expert_spec sp;
      sp.kind = kind;
      sp.dt = dtype::dtype_f32;
      sp.intermediate = 237;
      const int64_t ld = 2 * sp.intermediate + 3;
      std::vector<float> data(static_cast<size_t>(rows * ld));
      for (size_t i = 0; i < data.size(); ++i) data[i] = i % 5 == 0 ? wide(rng) : 4.0f * unit(rng);
      std::vector<float> vec = data, port = data;
      cpu::activate_rows(sp, vec.data(), rows, ld);
      CHECK(cpu::small_rows_force("portable"));
      cpu::activate_rows(sp, port.data(), rows, ld);
      cpu::small_rows_force(best.c_str());
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t j = 0; j < ld; ++j) {
          const size_t i = static_cast<size_t>(r * ld + j);
          if (j >= sp.intermediate) {
            CHECK(vec[i] == data[i]);  // the up half and the padding are left alone
            continue;
          }
          const double x = data[i], up = kind == ffn_kind::ffn_kind_gated_silu ? data[i + static_cast<size_t>(sp.intermediate)] : 1.0;
          const double ref = x / (1.0 + std::exp(-x)) * up;
          const double tol = 4e-7 * std::fabs(ref) + 1e-30;
          CHECK(std::fabs(vec[i] - ref) <= tol);
          CHECK(std::fabs(port[i] - ref) <= tol);
        }
      }
    }
  }
  // bias and the weighted combine, bf16: the vector path rounds the same float sums once
  for (int64_t tokens : {3, 400}) {
    const int64_t width = 45, top_k = 2, rows = tokens * top_k;
    std::vector<uint16_t> y(static_cast<size_t>(rows * width)), bias(static_cast<size_t>(width));
    for (auto& v : y) v = cpu::f32_to_bf16(unit(rng));
    for (auto& v : bias) v = cpu::f32_to_bf16(unit(rng));
    std::vector<int32_t> row_of(static_cast<size_t>(rows));
    std::vector<float> w(static_cast<size_t>(rows));
    for (int64_t i = 0; i < rows; ++i) {
      row_of[static_cast<size_t>(i)] = static_cast<int32_t>((i * 7) % rows);
      w[static_cast<size_t>(i)] = 0.5f + 0.25f * unit(rng);
    }
    std::vector<uint16_t> out(static_cast<size_t>(tokens * width)), biased = y;
    cpu::combine_rows(dtype::dtype_bf16, out.data(), y.data(), row_of.data(), w.data(), tokens, top_k, width);
    cpu::add_bias_rows(dtype::dtype_bf16, biased.data(), rows, width, width, bias.data());
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t c = 0; c < width; ++c) {
        double ref = 0;
        for (int64_t k = 0; k < top_k; ++k) {
          ref += w[static_cast<size_t>(t * top_k + k)] *
                 cpu::bf16_to_f32(y[static_cast<size_t>(row_of[static_cast<size_t>(t * top_k + k)] * width + c)]);
        }
        CHECK(std::fabs(cpu::bf16_to_f32(out[static_cast<size_t>(t * width + c)]) - ref) <= 1e-2 * std::fabs(ref) + 1e-6);
      }
    }
    for (int64_t i = 0; i < rows * width; ++i) {
      const float ref = cpu::bf16_to_f32(y[static_cast<size_t>(i)]) + cpu::bf16_to_f32(bias[static_cast<size_t>(i % width)]);
      CHECK(biased[static_cast<size_t>(i)] == cpu::f32_to_bf16(ref));
    }
  }
}

// The tiles' packed activations start on 64-byte boundaries (a tile row is one cache line: from
// a 16-byte aligned std::vector, as before, every row spanned two and the int4 tile loads took
// twice the multiply; nothing but the time showed it). aligned_array zeroes on request.
TEST(cpu_tile_buffers_are_cache_line_aligned) {
  for (int64_t count : {1, 63, 64, 1000, 4097}) {
    auto bytes = cpu::aligned_array<int8_t>(count, true);
    CHECK(reinterpret_cast<uintptr_t>(bytes.get()) % 64 == 0);
    bool zero = true;
    for (int64_t i = 0; i < count; ++i) zero = zero && bytes[i] == 0;
    CHECK(zero);
    CHECK(reinterpret_cast<uintptr_t>(cpu::aligned_array<uint16_t>(count).get()) % 64 == 0);
  }
  const int64_t k = 256, n = 16;
  std::vector<uint8_t> codes(static_cast<size_t>(n * k));
  std::vector<uint16_t> halves(static_cast<size_t>(n * k / 64), 0x3C00);  // scales and zeros 1.0
  std::vector<float> a(static_cast<size_t>(8 * k), 0.5f);
  for (int bits : {8, 4}) {
    quantized_matrix b;
    b.bits = bits;
    b.group_size = 64;
    b.codes = codes.data();
    b.row_bytes = bits == 8 ? k : k / 2;
    b.scales = b.zeros = halves.data();
    b.groups = k / 64;
    for (int64_t m : {1, 3, 8}) {
      const cpu::amx_codes_input in = cpu::pack_amx_codes(m, k, a.data(), b);
      CHECK(reinterpret_cast<uintptr_t>(in.packed.get()) % 64 == 0);
    }
  }
  for (int64_t m : {2, 17}) CHECK(reinterpret_cast<uintptr_t>(cpu::amx_buffer(m, 64).packed.get()) % 64 == 0);
}
