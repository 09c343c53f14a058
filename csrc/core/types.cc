#include "pregated/types.h"

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

bool ffn_is_gated(ffn_kind kind) {
  return kind == ffn_kind::ffn_kind_gated_silu || kind == ffn_kind::ffn_kind_gated_gelu;
}

const char* ffn_kind_name(ffn_kind kind) {
  switch (kind) {
    case ffn_kind::ffn_kind_gated_silu: return "gated_silu";
    case ffn_kind::ffn_kind_gated_gelu: return "gated_gelu";
    case ffn_kind::ffn_kind_relu: return "relu";
    case ffn_kind::ffn_kind_gelu: return "gelu";
  }
  return "?";
}

status parse_ffn_kind(const std::string& name, ffn_kind* out) {
  for (ffn_kind k : {ffn_kind::ffn_kind_gated_silu, ffn_kind::ffn_kind_gated_gelu,
                     ffn_kind::ffn_kind_relu, ffn_kind::ffn_kind_gelu}) {
    if (name == ffn_kind_name(k)) { *out = k; return {}; }
  }
  return invalid_argument("unknown ffn kind '" + name +
                          "': use gated_silu, gated_gelu, relu or gelu");
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
  return {};
}

size_t expert_spec::part_elements(int part) const {
  (void)part;  // every part is I x H or H x I
  return static_cast<size_t>(hidden) * static_cast<size_t>(intermediate);
}

size_t expert_spec::part_offset(int part) const {
  return static_cast<size_t>(part) * part_elements(0) * dtype_size(dt);
}

size_t expert_spec::bytes() const {
  return static_cast<size_t>(num_parts()) * part_elements(0) * dtype_size(dt);
}

void expert_spec::part_shape(int part, int64_t* rows, int64_t* cols) const {
  const bool last = part == num_parts() - 1;  // down / out: [H, I]
  *rows = last ? hidden : intermediate;
  *cols = last ? intermediate : hidden;
}

const char* expert_spec::part_name(int part) const {
  static const char* gated[] = {"gate", "up", "down"};
  static const char* plain[] = {"in", "out"};
  if (part < 0 || part >= num_parts()) return "?";
  return ffn_is_gated(kind) ? gated[part] : plain[part];
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

}  // namespace pregated
