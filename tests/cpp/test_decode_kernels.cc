// The dense model's small CPU kernels on their pool paths (many rows or many (row, head) pairs
// split over the pool's threads) against double-precision loops: RMS norm, softmax-top-k, rotary
// embedding and the attention of new rows against a cache. The Python tests compare them with
// transformers; these run under the thread and address sanitizers too.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "harness.h"
#include "cpu/decode_attention.h"
#include "cpu/rms_norm.h"
#include "cpu/softmax_topk.h"

using namespace pregated;

namespace {

std::vector<float> normal_values(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

}  // namespace

TEST(cpu_rms_norm_over_the_pool) {
  const int64_t rows = 300, n = 512;  // 153600 elements: split over the pool
  for (bool portable : {false, true}) {
    cpu::rms_norm_force_portable(portable);
    const std::vector<float> x = normal_values(static_cast<size_t>(rows * n), 1), w = normal_values(n, 2);
    std::vector<float> out(x.size(), NAN);
    cpu::rms_norm(dtype::dtype_f32, rows, n, x.data(), w.data(), 1e-6f, out.data());
    double worst = 0;
    for (int64_t r = 0; r < rows; ++r) {
      double ss = 0;
      for (int64_t i = 0; i < n; ++i) ss += double(x[r * n + i]) * x[r * n + i];
      const double scale = 1.0 / std::sqrt(ss / n + 1e-6);
      for (int64_t i = 0; i < n; ++i) worst = std::max(worst, std::fabs(out[r * n + i] - w[i] * x[r * n + i] * scale));
    }
    CHECK(worst < 1e-4);
  }
  cpu::rms_norm_force_portable(false);
}

TEST(cpu_softmax_topk_picks_the_largest_in_order) {
  const int64_t rows = 7, experts = 16, k = 4;
  const std::vector<float> logits = normal_values(static_cast<size_t>(rows * experts), 3);
  std::vector<float> weights(static_cast<size_t>(rows * k));
  std::vector<int64_t> ids(static_cast<size_t>(rows * k));
  for (bool normalize : {false, true}) {
    cpu::softmax_topk(rows, experts, logits.data(), k, normalize, weights.data(), ids.data());
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<int64_t> order(experts);
      for (int64_t e = 0; e < experts; ++e) order[e] = e;
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t a, int64_t b) { return logits[r * experts + a] > logits[r * experts + b]; });
      double sum = 0, chosen = 0;
      for (int64_t e = 0; e < experts; ++e) sum += std::exp(double(logits[r * experts + e]));
      for (int64_t j = 0; j < k; ++j) chosen += std::exp(double(logits[r * experts + order[j]])) / sum;
      for (int64_t j = 0; j < k; ++j) {
        CHECK(ids[r * k + j] == order[j]);
        const double p = std::exp(double(logits[r * experts + order[j]])) / sum / (normalize ? chosen : 1.0);
        CHECK(std::fabs(weights[r * k + j] - p) < 1e-5);
      }
    }
  }
}

TEST(cpu_rope_and_attention_over_the_pool) {
  const int64_t batch = 2, fresh = 3, qh = 8, kvh = 2, d = 64, keys = 400;  // 48 (row, head) pairs x 400 keys
  for (bool portable : {false, true}) {
    cpu::decode_attention_force_portable(portable);
    // rotary embedding of the first qh + kvh heads of each row; the column past them is untouched
    const int64_t rows = batch * fresh, width = (qh + kvh) * d + 1;
    std::vector<float> x = normal_values(static_cast<size_t>(rows * width), 4), before = x, cs(rows * d), sn(rows * d);
    const std::vector<float> angles = normal_values(static_cast<size_t>(rows * d / 2), 5);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < d; ++i) {
        cs[r * d + i] = std::cos(angles[r * d / 2 + i % (d / 2)]);
        sn[r * d + i] = std::sin(angles[r * d / 2 + i % (d / 2)]);
      }
    }
    cpu::rope_rows(dtype::dtype_f32, rows, width, qh + kvh, d, x.data(), cs.data(), sn.data());
    double worst = 0;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t h = 0; h < qh + kvh; ++h) {
        const float* in = before.data() + r * width + h * d;
        for (int64_t i = 0; i < d; ++i) {
          const double rotated = i < d / 2 ? -in[i + d / 2] : in[i - d / 2];
          worst = std::max(worst, std::fabs(x[r * width + h * d + i] - (in[i] * cs[r * d + i] + rotated * sn[r * d + i])));
        }
      }
      CHECK(x[r * width + width - 1] == before[r * width + width - 1]);
    }
    CHECK(worst < 1e-5);
    // attention, causal over the fresh rows at the end of the keys; k and v are views of buffers
    // with room for `cap` keys a head (as a growing KV cache holds them), NaN past the keys
    const int64_t cap = keys + 5;
    std::vector<float> k = normal_values(static_cast<size_t>(batch * kvh * cap * d), 6),
                       v = normal_values(static_cast<size_t>(batch * kvh * cap * d), 7);
    for (int64_t head = 0; head < batch * kvh; ++head) {
      for (int64_t i = keys * d; i < cap * d; ++i) k[head * cap * d + i] = v[head * cap * d + i] = NAN;
    }
    const kv_layout layout{kvh * cap * d, cap * d};
    std::vector<float> out(static_cast<size_t>(rows * qh * d), NAN);
    const float scale = 0.125f;
    cpu::attention_rows(dtype::dtype_f32, batch, fresh, qh, kvh, keys, d, x.data(), width, k.data(), layout, v.data(),
                        layout, scale, out.data());
    worst = 0;
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t l = 0; l < fresh; ++l) {
        const int64_t row = b * fresh + l, limit = keys - fresh + l + 1;
        for (int64_t h = 0; h < qh; ++h) {
          const float* q = x.data() + row * width + h * d;
          const int64_t base = (b * kvh + h / (qh / kvh)) * cap * d;
          std::vector<double> s(limit);
          double top = -1e300, sum = 0;
          for (int64_t j = 0; j < limit; ++j) {
            double dot = 0;
            for (int64_t i = 0; i < d; ++i) dot += double(q[i]) * k[base + j * d + i];
            s[j] = scale * dot;
            top = std::max(top, s[j]);
          }
          for (auto& e : s) sum += (e = std::exp(e - top));
          for (int64_t i = 0; i < d; ++i) {
            double acc = 0;
            for (int64_t j = 0; j < limit; ++j) acc += s[j] / sum * v[base + j * d + i];
            worst = std::max(worst, std::fabs(out[(row * qh + h) * d + i] - acc));
          }
        }
      }
    }
    CHECK(worst < 1e-4);
  }
  cpu::decode_attention_force_portable(false);
}
