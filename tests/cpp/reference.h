// A float32 MoE model with random experts and a plain-loop reference of one MoE block, for the
// C++ tests and the downstream package test.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "pregated/pregated.h"

namespace pgref {

struct toy_model {
  int32_t layers = 0;
  int32_t experts = 0;
  pregated::expert_spec spec;
  std::vector<std::vector<float>> blocks;  // [layer * experts]: one expert block each (spec layout), fp32

  const std::vector<float>& expert(int32_t layer, int32_t e) const {
    return blocks[static_cast<size_t>(layer) * static_cast<size_t>(experts) + static_cast<size_t>(e)];
  }
};

inline toy_model make_model(int32_t layers, int32_t experts, int64_t hidden, int64_t inter,
                            pregated::ffn_kind kind, uint32_t seed, bool has_bias = false) {
  toy_model m;
  m.layers = layers;
  m.experts = experts;
  m.spec.kind = kind;
  m.spec.has_bias = has_bias;
  m.spec.dt = pregated::dtype::dtype_f32;
  m.spec.hidden = hidden;
  m.spec.intermediate = inter;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f / std::sqrt(static_cast<float>(hidden)));
  const size_t n = m.spec.bytes() / sizeof(float);
  const size_t used = m.spec.part_offset(m.spec.num_parts()) / sizeof(float);  // padding stays 0
  for (int32_t i = 0; i < layers * experts; ++i) {
    std::vector<float> w(n, 0.0f);
    for (size_t j = 0; j < used; ++j) w[j] = nd(rng);
    m.blocks.push_back(std::move(w));
  }
  return m;
}

// Copies every expert of `m` into the runtime's expert store.
inline pregated::status fill_store(pregated::runtime& rt, const toy_model& m) {
  for (int32_t l = 0; l < m.layers; ++l) {
    for (int32_t e = 0; e < m.experts; ++e) {
      const float* w = m.expert(l, e).data();
      for (int p = 0; p < m.spec.num_parts(); ++p) {
        const size_t off = m.spec.part_offset(p) / sizeof(float);
        PREGATED_RETURN_IF_ERROR(rt.store().set_part({l, e}, p, w + off, m.spec.part_bytes(p)));
      }
    }
  }
  return {};
}

// act(gate) * up for gated kinds (up = 1 for the others), as PyTorch writes each activation.
inline float act(const pregated::expert_spec& sp, float g, float u) {
  using pregated::ffn_kind;
  switch (sp.kind) {
    case ffn_kind::ffn_kind_gated_silu: case ffn_kind::ffn_kind_silu: return g / (1.0f + std::exp(-g)) * u;
    case ffn_kind::ffn_kind_relu: case ffn_kind::ffn_kind_gated_relu: return std::fmax(g, 0.0f) * u;
    case ffn_kind::ffn_kind_relu2: return std::fmax(g, 0.0f) * std::fmax(g, 0.0f);
    case ffn_kind::ffn_kind_gelu: case ffn_kind::ffn_kind_gated_gelu:
      return 0.5f * g * (1.0f + std::erf(g / std::sqrt(2.0f))) * u;
    case ffn_kind::ffn_kind_gelu_tanh: case ffn_kind::ffn_kind_gated_gelu_tanh:
      return 0.5f * g * (1.0f + std::tanh(std::sqrt(2.0f / 3.14159265358979f) * (g + 0.044715f * g * g * g))) * u;
    case ffn_kind::ffn_kind_gated_swiglu_oai: {
      const float gc = std::fmin(g, sp.limit), uc = std::fmax(std::fmin(u, sp.limit), -sp.limit);
      return (uc + 1.0f) * gc / (1.0f + std::exp(-sp.alpha * gc));
    }
    case ffn_kind::ffn_kind_gated_silu_clamped: {
      const float gc = std::fmin(g, sp.limit), uc = std::fmax(std::fmin(u, sp.limit), -sp.limit);
      return gc / (1.0f + std::exp(-gc)) * uc;
    }
  }
  return 0.0f;
}

// out[t] = sum_k w[t, k] * FFN_{ids[t, k]}(x[t]), computed one token and one expert at a time.
inline std::vector<float> reference_forward(const toy_model& m, int32_t layer,
                                            const std::vector<float>& x,
                                            const std::vector<int32_t>& ids,
                                            const std::vector<float>& w, int64_t T, int64_t K) {
  const pregated::expert_spec& sp = m.spec;
  const int64_t H = sp.hidden, I = sp.intermediate;
  const bool gated = pregated::ffn_is_gated(sp.kind);
  auto part = [&](const std::vector<float>& e, int p) { return e.data() + sp.part_offset(p) / sizeof(float); };
  std::vector<float> out(static_cast<size_t>(T * H), 0.0f), a(static_cast<size_t>(I));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const std::vector<float>& e = m.expert(layer, ids[static_cast<size_t>(t * K + k)]);
      const float* up0 = part(e, 0);                            // gate (or in): [I, H]
      const float* up1 = gated ? part(e, 1) : nullptr;          // up: [I, H]
      const float* down = part(e, sp.down_part());              // [H, I]
      const float* b0 = sp.has_bias ? part(e, sp.first_bias_part()) : nullptr;  // [I] (gate | in)
      const float* b1 = sp.has_bias && gated ? b0 + I : nullptr;                // [I] (up)
      const float* b2 = sp.has_bias ? part(e, sp.num_parts() - 1) : nullptr;    // [H]
      for (int64_t i = 0; i < I; ++i) {
        double g = b0 ? b0[i] : 0.0, u = b1 ? b1[i] : 0.0;
        for (int64_t h = 0; h < H; ++h) {
          g += static_cast<double>(up0[i * H + h]) * x[static_cast<size_t>(t * H + h)];
          if (gated) u += static_cast<double>(up1[i * H + h]) * x[static_cast<size_t>(t * H + h)];
        }
        a[static_cast<size_t>(i)] = act(sp, static_cast<float>(g), gated ? static_cast<float>(u) : 1.0f);
      }
      for (int64_t h = 0; h < H; ++h) {
        double y = b2 ? b2[h] : 0.0;
        for (int64_t i = 0; i < I; ++i) y += static_cast<double>(down[h * I + i]) * a[static_cast<size_t>(i)];
        out[static_cast<size_t>(t * H + h)] += w[static_cast<size_t>(t * K + k)] * static_cast<float>(y);
      }
    }
  }
  return out;
}

// The runtime's arguments for one block over host vectors (CPU backend).
inline pregated::moe_args block_args(int32_t layer, const std::vector<float>& x, std::vector<float>& out,
                                     const std::vector<int32_t>& ids, const std::vector<float>& w,
                                     int64_t T, int64_t K) {
  pregated::moe_args a;
  a.layer = layer;
  a.tokens = T;
  a.top_k = K;
  a.x = x.data();
  a.out = out.data();
  a.ids = ids.data();
  a.weights = w.data();
  return a;
}

inline float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  float d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::fmax(d, std::fabs(a[i] - b[i]));
  return d;
}

}  // namespace pgref
