// Runs one MoE block through the installed pregated::core on the CPU backend and checks it
// against the plain-loop reference. Prints "downstream ok" and exits 0 on success.
#include <pregated/pregated.h>

#include <cstdio>
#include <random>

#include "reference.h"

int main() {
  using namespace pregated;
  const pgref::toy_model m = pgref::make_model(2, 8, 32, 24, ffn_kind::ffn_kind_gated_silu, 42);
  runtime_config cfg;
  cfg.num_layers = m.layers;
  cfg.num_experts = m.experts;
  cfg.spec = m.spec;
  cfg.expert_memory = 3 * static_cast<int64_t>(m.spec.bytes());  // 3 of 16 experts fit
  std::unique_ptr<runtime> rt;
  status st = runtime::create(make_cpu_backend(), cfg, &rt);
  if (!st) { std::fprintf(stderr, "create: %s\n", st.message().c_str()); return 1; }
  st = pgref::fill_store(*rt, m);
  if (!st) { std::fprintf(stderr, "fill: %s\n", st.message().c_str()); return 1; }

  const int64_t T = 9, K = 2;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  std::vector<float> x(T * 32), out(T * 32), w;
  std::vector<int32_t> ids;
  for (float& v : x) v = nd(rng);
  for (int64_t t = 0; t < T; ++t) {
    ids.push_back(static_cast<int32_t>(t % 8));
    ids.push_back(static_cast<int32_t>((t * 3 + 1) % 8 == t % 8 ? (t + 1) % 8 : (t * 3 + 1) % 8));
    w.push_back(0.7f);
    w.push_back(0.3f);
  }
  st = rt->moe_forward(pgref::block_args(1, x, out, ids, w, T, K));
  if (!st) { std::fprintf(stderr, "moe_forward: %s\n", st.message().c_str()); return 1; }
  const float diff = pgref::max_abs_diff(out, pgref::reference_forward(m, 1, x, ids, w, T, K));
  std::string report;
  st = rt->check(&report);
  if (!st) { std::fprintf(stderr, "check: %s\n", st.message().c_str()); return 1; }
  std::printf("pregated %s (%s), max |out - reference| = %g\n", PREGATED_VERSION,
              build_info().blas.c_str(), diff);
  if (diff > 1e-4f) return 1;
  std::printf("downstream ok\n");
  return 0;
}
