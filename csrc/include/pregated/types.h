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

// How an expert turns a hidden vector into a hidden vector.
//   gated:     down( act(gate(x)) * up(x) )    Mixtral, Qwen-MoE, OLMoE, DeepSeek (SiLU)
//   non-gated: out( act(in(x)) )               SwitchTransformers (ReLU), GELU variants
enum class ffn_kind {
  ffn_kind_gated_silu = 0,
  ffn_kind_gated_gelu = 1,
  ffn_kind_relu = 2,
  ffn_kind_gelu = 3,
};

bool ffn_is_gated(ffn_kind kind);
const char* ffn_kind_name(ffn_kind kind);
status parse_ffn_kind(const std::string& name, ffn_kind* out);

// The shape of one expert. H = hidden size, I = intermediate size.
// Host and slot layout of one expert, one contiguous block:
//   gated:     gate [I, H] | up [I, H] | down [H, I]   (gate and up adjacent: one [2I, H] GEMM)
//   non-gated: in   [I, H] | out [H, I]
struct expert_spec {
  ffn_kind kind = ffn_kind::ffn_kind_gated_silu;
  dtype dt = dtype::dtype_bf16;
  int64_t hidden = 0;        // H
  int64_t intermediate = 0;  // I

  status validate() const;
  int num_parts() const { return ffn_is_gated(kind) ? 3 : 2; }
  // Rows of the first GEMM's weight: 2I for gated experts, I otherwise.
  int64_t up_rows() const { return ffn_is_gated(kind) ? 2 * intermediate : intermediate; }
  size_t bytes() const;
  // Byte offset and element count of part p inside one expert's block.
  size_t part_offset(int part) const;
  size_t part_elements(int part) const;
  // Shape of part p as rows x cols.
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
