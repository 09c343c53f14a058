#include "pregated/types.h"

#include "pregated/backend.h"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace pregated {

size_t dtype_size(dtype dt) { return dt == dtype::dtype_f32 ? 4 : 2; }

const char* dtype_name(dtype dt) {
  switch (dt) {
    case dtype::dtype_f32: return "float32";
    case dtype::dtype_f16: return "float16";
    case dtype::dtype_bf16: return "bfloat16";
  }
  return "?";
}

status parse_dtype(const std::string& name, dtype* out) {
  if (name == "float32" || name == "fp32" || name == "f32") { *out = dtype::dtype_f32; return {}; }
  if (name == "float16" || name == "fp16" || name == "f16" || name == "half") {
    *out = dtype::dtype_f16;
    return {};
  }
  if (name == "bfloat16" || name == "bf16") { *out = dtype::dtype_bf16; return {}; }
  return invalid_argument("unknown dtype '" + name + "': use float32, float16 or bfloat16");
}

namespace {

constexpr ffn_kind all_ffn_kinds[] = {
    ffn_kind::ffn_kind_gated_silu,      ffn_kind::ffn_kind_gated_gelu,
    ffn_kind::ffn_kind_relu,            ffn_kind::ffn_kind_gelu,
    ffn_kind::ffn_kind_gated_gelu_tanh, ffn_kind::ffn_kind_gated_relu,
    ffn_kind::ffn_kind_gated_swiglu_oai, ffn_kind::ffn_kind_silu,
    ffn_kind::ffn_kind_gelu_tanh,       ffn_kind::ffn_kind_relu2,
    ffn_kind::ffn_kind_gated_silu_clamped,
};

}  // namespace

bool ffn_is_gated(ffn_kind kind) {
  switch (kind) {
    case ffn_kind::ffn_kind_gated_silu:
    case ffn_kind::ffn_kind_gated_gelu:
    case ffn_kind::ffn_kind_gated_gelu_tanh:
    case ffn_kind::ffn_kind_gated_relu:
    case ffn_kind::ffn_kind_gated_swiglu_oai:
    case ffn_kind::ffn_kind_gated_silu_clamped:
      return true;
    default:
      return false;
  }
}

const char* ffn_kind_name(ffn_kind kind) {
  switch (kind) {
    case ffn_kind::ffn_kind_gated_silu: return "gated_silu";
    case ffn_kind::ffn_kind_gated_gelu: return "gated_gelu";
    case ffn_kind::ffn_kind_relu: return "relu";
    case ffn_kind::ffn_kind_gelu: return "gelu";
    case ffn_kind::ffn_kind_gated_gelu_tanh: return "gated_gelu_tanh";
    case ffn_kind::ffn_kind_gated_relu: return "gated_relu";
    case ffn_kind::ffn_kind_gated_swiglu_oai: return "gated_swiglu_oai";
    case ffn_kind::ffn_kind_silu: return "silu";
    case ffn_kind::ffn_kind_gelu_tanh: return "gelu_tanh";
    case ffn_kind::ffn_kind_relu2: return "relu2";
    case ffn_kind::ffn_kind_gated_silu_clamped: return "gated_silu_clamped";
  }
  return "?";
}

status parse_ffn_kind(const std::string& name, ffn_kind* out) {
  std::string names;
  for (ffn_kind k : all_ffn_kinds) {
    if (name == ffn_kind_name(k)) { *out = k; return {}; }
    names += (names.empty() ? "" : ", ") + std::string(ffn_kind_name(k));
  }
  return invalid_argument("unknown ffn kind '" + name + "': use one of " + names);
}

status expert_spec::validate() const {
  if (hidden <= 0 || intermediate <= 0) {
    return invalid_argument("expert shape must be positive, got hidden=" +
                            std::to_string(hidden) + " intermediate=" +
                            std::to_string(intermediate));
  }
  if (hidden > (int64_t{1} << 31) || intermediate > (int64_t{1} << 31)) {
    return invalid_argument("expert shape too large for 32-bit BLAS dimensions");
  }
  if (!(std::isfinite(alpha) && std::isfinite(limit) && limit > 0)) {
    return invalid_argument("the clamped kinds need a finite alpha and a limit > 0");
  }
  if (quantized() && group_size != 32 && group_size != 64 && group_size != 128) {
    return invalid_argument("quantized experts need a group size of 32, 64 or 128, got " +
                            std::to_string(group_size));
  }
  return {};
}

int64_t expert_spec::row_bytes(int64_t cols) const {
  if (bits() == 3) return 3 * ((cols + 7) / 8);
  return (cols * bits() + 7) / 8;
}

namespace {

// Rows and columns of weight matrix w (0 gate/in, 1 up, last down/out).
void matrix_shape(const expert_spec& sp, int w, int64_t* rows, int64_t* cols) {
  const bool down = w == sp.down_part();
  *rows = down ? sp.hidden : sp.intermediate;
  *cols = down ? sp.intermediate : sp.hidden;
}

}  // namespace

void expert_spec::part_shape(int part, int64_t* rows, int64_t* cols) const {
  const int W = num_weights();
  if (part >= first_bias_part()) {  // a bias vector: down's (or out's) is the last
    *rows = part == num_parts() - 1 ? hidden : intermediate;
    *cols = 0;
    return;
  }
  int64_t r = 0, c = 0;
  matrix_shape(*this, part % W, &r, &c);
  *rows = r;
  if (part < W) *cols = quantized() ? row_bytes(c) : c;
  else *cols = groups(c);  // scales, zeros
}

const char* expert_spec::part_dtype(int part) const {
  if (!quantized() || part >= first_bias_part()) return dtype_name(dt);
  return part < num_weights() ? "uint8" : "float16";
}

size_t expert_spec::part_bytes(int part) const {
  int64_t rows = 0, cols = 0;
  part_shape(part, &rows, &cols);
  const std::string t = part_dtype(part);
  const size_t esz = t == "uint8" ? 1 : t == "float16" ? 2 : dtype_size(dt);
  return static_cast<size_t>(rows) * static_cast<size_t>(cols == 0 ? 1 : cols) * esz;
}

size_t expert_spec::part_offset(int part) const {
  size_t offset = 0;
  for (int p = 0; p < part; ++p) offset += part_bytes(p);
  return offset;
}

size_t expert_spec::bytes() const {
  const size_t used = part_offset(num_parts());
  return (used + expert_block_align - 1) / expert_block_align * expert_block_align;
}

const char* expert_spec::part_name(int part) const {
  static const char* gated[] = {"gate", "up", "down", "gate_bias", "up_bias", "down_bias"};
  static const char* plain[] = {"in", "out", "in_bias", "out_bias"};
  static const char* gated_q[] = {"gate", "up", "down", "gate.scale", "up.scale", "down.scale",
                                  "gate.zero", "up.zero", "down.zero", "gate_bias", "up_bias", "down_bias"};
  static const char* plain_q[] = {"in", "out", "in.scale", "out.scale", "in.zero", "out.zero", "in_bias", "out_bias"};
  if (part < 0 || part >= num_parts()) return "?";
  if (quantized()) return ffn_is_gated(kind) ? gated_q[part] : plain_q[part];
  return ffn_is_gated(kind) ? gated[part] : plain[part];
}

const char* weight_format_name(weight_format f) {
  switch (f) {
    case weight_format::weight_format_dense: return "dense";
    case weight_format::weight_format_int8: return "int8";
    case weight_format::weight_format_int4: return "int4";
    case weight_format::weight_format_int3: return "int3";
    case weight_format::weight_format_int2: return "int2";
  }
  return "?";
}

status parse_weight_format(const std::string& name, weight_format* out) {
  for (weight_format f : {weight_format::weight_format_dense, weight_format::weight_format_int8,
                          weight_format::weight_format_int4, weight_format::weight_format_int3,
                          weight_format::weight_format_int2}) {
    if (name == weight_format_name(f)) { *out = f; return {}; }
  }
  return invalid_argument("unknown expert weight format '" + name + "': use dense, int8, int4, int3 or int2");
}

const char* eviction_policy_name(eviction_policy p) {
  switch (p) {
    case eviction_policy::eviction_policy_lru: return "lru";
    case eviction_policy::eviction_policy_lfu: return "lfu";
    case eviction_policy::eviction_policy_none: return "none";
  }
  return "?";
}

status parse_eviction_policy(const std::string& name, eviction_policy* out) {
  if (name == "lru") { *out = eviction_policy::eviction_policy_lru; return {}; }
  if (name == "lfu") { *out = eviction_policy::eviction_policy_lfu; return {}; }
  if (name == "none") { *out = eviction_policy::eviction_policy_none; return {}; }
  return invalid_argument("unknown eviction policy '" + name + "': use lru, lfu or none");
}

status parse_bytes(const std::string& text, int64_t* out) {
  const char* s = text.c_str();
  char* end = nullptr;
  const double value = std::strtod(s, &end);
  if (end == s || !std::isfinite(value) || value < 0) {
    return invalid_argument("cannot read a byte count from '" + text +
                            "': write e.g. 8GiB, 512MiB, 1.5GB or 1234567");
  }
  std::string unit(end);
  while (!unit.empty() && std::isspace(static_cast<unsigned char>(unit.front()))) unit.erase(0, 1);
  for (char& c : unit) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  double scale = 0;
  if (unit.empty() || unit == "b") scale = 1;
  else if (unit == "k" || unit == "kb") scale = 1e3;
  else if (unit == "m" || unit == "mb") scale = 1e6;
  else if (unit == "g" || unit == "gb") scale = 1e9;
  else if (unit == "t" || unit == "tb") scale = 1e12;
  else if (unit == "kib") scale = 1024.0;
  else if (unit == "mib") scale = 1024.0 * 1024;
  else if (unit == "gib") scale = 1024.0 * 1024 * 1024;
  else if (unit == "tib") scale = 1024.0 * 1024 * 1024 * 1024;
  else {
    return invalid_argument("unknown unit '" + unit + "' in '" + text +
                            "': use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB");
  }
  *out = static_cast<int64_t>(std::llround(value * scale));
  return {};
}

std::string format_bytes(int64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 4) { v /= 1024.0; ++u; }
  char buf[64];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.2f %s", v, units[u]);
  return buf;
}

quantized_matrix quantized_part(const expert_spec& sp, const uint8_t* block, int weight) {
  int64_t rows = 0, cols = 0;
  matrix_shape(sp, weight, &rows, &cols);
  quantized_matrix q;
  q.bits = sp.bits();
  q.group_size = sp.group_size;
  q.codes = block + sp.part_offset(weight);
  q.row_bytes = sp.row_bytes(cols);
  q.scales = reinterpret_cast<const uint16_t*>(block + sp.part_offset(sp.scale_part(weight)));
  q.zeros = reinterpret_cast<const uint16_t*>(block + sp.part_offset(sp.zero_part(weight)));
  q.groups = sp.groups(cols);
  return q;
}

}  // namespace pregated
