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

// How an expert's weight matrices are stored: in the compute dtype, or as group-wise integer
// codes (packed little-endian along each row; int3 packs 8 codes in 3 bytes) with an fp16 scale
// and zero per group of group_size weights along the input dimension: w = (code - zero) * scale.
enum class weight_format {
  weight_format_dense = 0,
  weight_format_int8 = 8,
  weight_format_int4 = 4,
  weight_format_int3 = 3,
  weight_format_int2 = 2,
};

const char* weight_format_name(weight_format f);
status parse_weight_format(const std::string& name, weight_format* out);

// The shape of one expert. H = hidden size, I = intermediate size.
// Host and slot layout of one expert, one contiguous block, padded to a multiple of
// expert_block_align bytes (so every slot and every store block starts aligned):
//   gated:     gate [I, H] | up [I, H] | down [H, I] [| gate_bias [I] | up_bias [I] | down_bias [H]]
//   non-gated: in   [I, H] | out [H, I]              [| in_bias [I]   | out_bias [H]]
// gate and up are adjacent (one [2I, H] GEMM), and so are their biases. A quantized expert holds
// each matrix as codes [rows, row_bytes(cols)], then every matrix's scales [rows, groups(cols)],
// then every matrix's zeros, then the biases (parts "gate", "up", "down", "gate.scale", ...,
// "down.zero", biases): gate and up stay adjacent in each section.
constexpr size_t expert_block_align = 256;

struct expert_spec {
  ffn_kind kind = ffn_kind::ffn_kind_gated_silu;
  dtype dt = dtype::dtype_bf16;
  int64_t hidden = 0;        // H
  int64_t intermediate = 0;  // I
  bool has_bias = false;
  float alpha = 1.702f;      // gated_swiglu_oai only
  float limit = 7.0f;        // gated_swiglu_oai and gated_silu_clamped only
  weight_format format = weight_format::weight_format_dense;
  int64_t group_size = 64;   // quantized formats: weights per scale and zero (32, 64 or 128)

  status validate() const;
  bool quantized() const { return format != weight_format::weight_format_dense; }
  int bits() const { return static_cast<int>(format); }  // of a quantized format
  // Weight matrices (3 gated, 2 otherwise); then (quantized) their scales and zeros; then biases.
  int num_weights() const { return ffn_is_gated(kind) ? 3 : 2; }
  int num_parts() const { return num_weights() * ((quantized() ? 3 : 1) + (has_bias ? 1 : 0)); }
  // The down (or out) projection's part index, its scales' and zeros' (quantized), the first bias.
  int down_part() const { return num_weights() - 1; }
  int scale_part(int weight) const { return num_weights() + weight; }
  int zero_part(int weight) const { return 2 * num_weights() + weight; }
  int first_bias_part() const { return num_weights() * (quantized() ? 3 : 1); }
  // Rows of the first GEMM's weight: 2I for gated experts, I otherwise.
  int64_t up_rows() const { return ffn_is_gated(kind) ? 2 * intermediate : intermediate; }
  // Quantized matrices: bytes of one row of codes with `cols` columns, and its groups.
  int64_t row_bytes(int64_t cols) const;
  int64_t groups(int64_t cols) const { return (cols + group_size - 1) / group_size; }
  // Bytes of one expert's block, padding included.
  size_t bytes() const;
  // Byte offset and size of part p inside one expert's block.
  size_t part_offset(int part) const;
  size_t part_bytes(int part) const;
  // Shape of part p: rows x cols of a matrix (codes: rows x row bytes, scales and zeros: rows x
  // groups); rows x 0 for a bias vector. Its element type: "uint8" (codes), "float16" (scales,
  // zeros), else the compute dtype's name.
  void part_shape(int part, int64_t* rows, int64_t* cols) const;
  const char* part_dtype(int part) const;
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
