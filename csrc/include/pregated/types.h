// Element types, expert FFN shapes and cache keys shared by every part of the runtime.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "pregated/status.h"

namespace pregated {

enum class dtype { dtype_f32 = 0, dtype_f16 = 1, dtype_bf16 = 2 };

size_t dtype_size(dtype dt);
const char* dtype_name(dtype dt);
status parse_dtype(const std::string& name, dtype* out);

// How an expert turns a hidden vector into a hidden vector (b_* only with expert_spec::has_bias).
//   gated:     down( act(gate(x) + b_gate) * (up(x) + b_up) ) + b_down   Mixtral, Qwen-MoE, DeepSeek
//   non-gated: out( act(in(x) + b_in) ) + b_out                          SwitchTransformers, Nemotron-H
// gated_swiglu_oai is GPT-OSS's clamped SwiGLU: g = min(gate, limit), u = clamp(up, -limit, limit),
// act = (u + 1) * g * sigmoid(alpha * g). gated_silu_clamped (HY-V4, GLM-5, DeepSeek-V4) clamps
// the same way, then act = silu(g) * u.
enum class ffn_kind {
  ffn_kind_gated_silu = 0,
  ffn_kind_gated_gelu = 1,       // gelu with erf
  ffn_kind_relu = 2,
  ffn_kind_gelu = 3,             // gelu with erf
  ffn_kind_gated_gelu_tanh = 4,  // gelu with the tanh approximation
  ffn_kind_gated_relu = 5,
  ffn_kind_gated_swiglu_oai = 6,
  ffn_kind_silu = 7,
  ffn_kind_gelu_tanh = 8,
  ffn_kind_relu2 = 9,            // relu(x)^2
  ffn_kind_gated_silu_clamped = 10,
};

bool ffn_is_gated(ffn_kind kind);
const char* ffn_kind_name(ffn_kind kind);
status parse_ffn_kind(const std::string& name, ffn_kind* out);

// The shape of one expert. H = hidden size, I = intermediate size.
// Host and slot layout of one expert, one contiguous block, padded to a multiple of
// expert_block_align bytes (so every slot and every store block starts aligned):
//   gated:     gate [I, H] | up [I, H] | down [H, I] [| gate_bias [I] | up_bias [I] | down_bias [H]]
//   non-gated: in   [I, H] | out [H, I]              [| in_bias [I]   | out_bias [H]]
// gate and up are adjacent (one [2I, H] GEMM), and so are their biases.
constexpr size_t expert_block_align = 256;

struct expert_spec {
  ffn_kind kind = ffn_kind::ffn_kind_gated_silu;
  dtype dt = dtype::dtype_bf16;
  int64_t hidden = 0;        // H
  int64_t intermediate = 0;  // I
  bool has_bias = false;
  float alpha = 1.702f;      // gated_swiglu_oai only
  float limit = 7.0f;        // gated_swiglu_oai and gated_silu_clamped only

  status validate() const;
  // Weight matrices (3 gated, 2 otherwise); bias vectors follow them.
  int num_weights() const { return ffn_is_gated(kind) ? 3 : 2; }
  int num_parts() const { return has_bias ? 2 * num_weights() : num_weights(); }
  // The down (or out) projection's part index, and the first bias part's.
  int down_part() const { return num_weights() - 1; }
  int first_bias_part() const { return num_weights(); }
  // Rows of the first GEMM's weight: 2I for gated experts, I otherwise.
  int64_t up_rows() const { return ffn_is_gated(kind) ? 2 * intermediate : intermediate; }
  // Bytes of one expert's block, padding included.
  size_t bytes() const;
  // Byte offset and element count of part p inside one expert's block.
  size_t part_offset(int part) const;
  size_t part_elements(int part) const;
  // Shape of part p: rows x cols for a matrix; rows x 0 for a bias vector.
  void part_shape(int part, int64_t* rows, int64_t* cols) const;
  const char* part_name(int part) const;
};

// Which expert: (MoE layer index, expert index inside the layer).
struct expert_key {
  int32_t layer = -1;
  int32_t expert = -1;
  bool operator==(const expert_key& o) const { return layer == o.layer && expert == o.expert; }
  bool valid() const { return layer >= 0 && expert >= 0; }
};

// lru / lfu keep experts cached across blocks and tokens; none keeps only the experts in use:
// a block's experts leave their slots when the block is done (the Pre-gated MoE paper's setting).
enum class eviction_policy { eviction_policy_lru = 0, eviction_policy_lfu = 1, eviction_policy_none = 2 };

const char* eviction_policy_name(eviction_policy p);
status parse_eviction_policy(const std::string& name, eviction_policy* out);

// "8GiB", "512MB", "1.5G", "123456" -> bytes.
status parse_bytes(const std::string& text, int64_t* out);
std::string format_bytes(int64_t bytes);

}  // namespace pregated
