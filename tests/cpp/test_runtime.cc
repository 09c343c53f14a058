// The runtime on the CPU backend against the plain-loop reference, and its error paths.
#include <algorithm>
#include <memory>
#include <random>
#include <set>

#include "harness.h"
#include "reference.h"

using namespace pregated;

namespace {

std::unique_ptr<runtime> make_runtime(const pgref::toy_model& m, int64_t slots,
                                      eviction_policy ev = eviction_policy::eviction_policy_lru,
                                      int64_t copy_delay_us = -1) {
  runtime_config cfg;
  cfg.num_layers = m.layers;
  cfg.num_experts = m.experts;
  cfg.spec = m.spec;
  cfg.expert_memory = slots < 0 ? -1 : slots * static_cast<int64_t>(m.spec.bytes());
  cfg.eviction = ev;
  std::unique_ptr<runtime> rt;
  cpu_backend_options opts;
  opts.copy_delay_us = copy_delay_us;
  CHECK_OK(runtime::create(make_cpu_backend(opts), cfg, &rt));
  if (rt) CHECK_OK(pgref::fill_store(*rt, m));
  return rt;
}

struct batch {
  std::vector<float> x, w;
  std::vector<int32_t> ids;
};

batch random_batch(std::mt19937& rng, int64_t T, int64_t K, int64_t H, int32_t experts) {
  batch b;
  std::normal_distribution<float> nd;
  std::uniform_real_distribution<float> ud(0.1f, 1.0f);
  b.x.resize(static_cast<size_t>(T * H));
  for (float& v : b.x) v = nd(rng);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> all(static_cast<size_t>(experts));
    for (int32_t e = 0; e < experts; ++e) all[static_cast<size_t>(e)] = e;
    std::shuffle(all.begin(), all.end(), rng);  // K distinct experts per token
    for (int64_t k = 0; k < K; ++k) {
      b.ids.push_back(all[static_cast<size_t>(k)]);
      b.w.push_back(ud(rng));
    }
  }
  return b;
}

status run(runtime& rt, int32_t layer, const batch& b, int64_t T, int64_t K, std::vector<float>* out) {
  out->assign(b.x.size(), -1.0f);
  return rt.moe_forward(pgref::block_args(layer, b.x, *out, b.ids, b.w, T, K));
}

}  // namespace

TEST(forward_matches_reference_for_every_budget) {
  const pgref::toy_model m = pgref::make_model(2, 6, 24, 20, ffn_kind::ffn_kind_gated_silu, 1);
  std::mt19937 rng(7);
  for (int64_t slots : {1, 2, 5, 12}) {
    auto rt = make_runtime(m, slots);
    if (!rt) return;
    for (int64_t K : {1, 2, 6}) {
      for (int64_t T : {1, 3, 33}) {
        for (int32_t layer = 0; layer < 2; ++layer) {
          batch b = random_batch(rng, T, K, 24, 6);
          std::vector<float> out;
          CHECK_OK(run(*rt, layer, b, T, K, &out));
          const auto ref = pgref::reference_forward(m, layer, b.x, b.ids, b.w, T, K);
          CHECK(pgref::max_abs_diff(out, ref) < 1e-4f);
        }
      }
    }
    CHECK_OK(rt->check(nullptr));
  }
}

TEST(forward_with_asynchronous_copies_waits_for_them) {
  const pgref::toy_model m = pgref::make_model(3, 6, 24, 20, ffn_kind::ffn_kind_gated_silu, 2);
  std::mt19937 rng(11);
  for (int64_t slots : {2, 5}) {
    auto rt = make_runtime(m, slots, eviction_policy::eviction_policy_lru, /*copy_delay_us=*/300);
    if (!rt) return;
    for (int step = 0; step < 6; ++step) {
      for (int32_t layer = 0; layer < 3; ++layer) {
        batch b = random_batch(rng, 3, 2, 24, 6);
        int32_t next[2] = {static_cast<int32_t>(rng() % 6), static_cast<int32_t>(rng() % 6)};
        std::vector<float> out(b.x.size());
        moe_args a = pgref::block_args(layer, b.x, out, b.ids, b.w, 3, 2);
        if (layer < 2) {
          a.next_layer = layer + 1;
          a.next_experts = next;
          a.num_next = 2;
        }
        CHECK_OK(rt->moe_forward(a));
        CHECK(pgref::max_abs_diff(out, pgref::reference_forward(m, layer, b.x, b.ids, b.w, 3, 2)) < 1e-4f);
      }
    }
    CHECK_OK(rt->check(nullptr));
    const runtime_stats s = rt->stats();
    CHECK(s.total.stall_seconds > 0);  // forwards waited for copies still in flight
    CHECK(s.total.prefetch_used <= s.total.prefetch_issued);
    CHECK_OK(rt->close());
  }
}

TEST(resident_forward_matches_reference_and_needs_every_expert_resident) {
  for (bool bias : {false, true}) {
    const pgref::toy_model m = pgref::make_model(2, 6, 24, 20, ffn_kind::ffn_kind_gated_silu, 4, bias);
    auto rt = make_runtime(m, -1);  // every expert fits
    if (!rt) return;
    std::mt19937 rng(3);
    batch b = random_batch(rng, 5, 2, 24, 6);
    std::vector<float> out(b.x.size());
    resident_args a;
    a.layer = 1, a.tokens = 5, a.top_k = 2, a.x = b.x.data(), a.out = out.data(), a.ids = b.ids.data(),
    a.weights = b.w.data();
    CHECK_ERR(rt->moe_forward_resident(a), "not every expert of layer 1 is resident");
    for (int32_t l = 0; l < 2; ++l)
      for (int32_t e = 0; e < 6; ++e) CHECK_OK(rt->pin({l, e}));
    CHECK_OK(rt->wait_idle());
    for (int64_t T : {1, 5}) {
      a.tokens = T;
      CHECK_OK(rt->moe_forward_resident(a));
      CHECK(pgref::max_abs_diff(std::vector<float>(out.begin(), out.begin() + T * 24),
                                pgref::reference_forward(m, 1, std::vector<float>(b.x.begin(), b.x.begin() + T * 24),
                                                         b.ids, b.w, T, 2)) < 1e-4f);
    }
    std::vector<int32_t> table;
    CHECK_OK(rt->slot_table(&table));
    for (int32_t v : table) CHECK(v >= 0);  // every expert is in a ready slot
    CHECK(rt->stats().resident_forwards == 2);
    CHECK_OK(rt->check(nullptr));
  }
}

// The device path: ids on the "device", experts read from their slot or in place from the store,
// the routing learnt one step behind (counted, missed experts loaded, predictions prefetched).
TEST(device_forward_matches_reference_and_learns_routing_one_step_behind) {
  const pgref::toy_model m = pgref::make_model(3, 6, 24, 20, ffn_kind::ffn_kind_gated_silu, 5);
  for (int64_t delay : {int64_t{-1}, int64_t{300}}) {
    for (eviction_policy ev : {eviction_policy::eviction_policy_lru, eviction_policy::eviction_policy_none}) {
      for (int64_t slots : {1, 4, 18}) {
        auto rt = make_runtime(m, slots, ev, delay);
        if (!rt) return;
        std::mt19937 rng(static_cast<unsigned>(slots * 7 + delay));
        int64_t uses = 0;
        std::vector<batch> last(3);
        for (int step = 0; step < 5; ++step) {
          for (int32_t layer = 0; layer < 3; ++layer) {
            const int64_t T = 1 + step % 3, K = 2;
            batch b = random_batch(rng, T, K, 24, 6);
            std::vector<float> out(b.x.size());
            std::vector<int32_t> next = {static_cast<int32_t>(rng() % 6), static_cast<int32_t>(rng() % 6), 6};
            resident_args a;
            a.layer = layer, a.tokens = T, a.top_k = K, a.x = b.x.data(), a.out = out.data(), a.ids = b.ids.data(),
            a.weights = b.w.data();
            if (layer < 2) a.next_layer = layer + 1, a.next_ids = next.data(), a.num_next = 3;  // 6: no such expert
            CHECK_OK(rt->moe_forward_device(a));
            CHECK(pgref::max_abs_diff(out, pgref::reference_forward(m, layer, b.x, b.ids, b.w, T, K)) < 1e-4f);
            uses += static_cast<int64_t>(std::set<int32_t>(b.ids.begin(), b.ids.end()).size());
            last[static_cast<size_t>(layer)] = b;
          }
        }
        CHECK_OK(rt->check(nullptr));  // waits for the route reader and the copies
        const runtime_stats s = rt->stats();
        CHECK(s.device_forwards == 15);
        CHECK(s.total.expert_hits + s.total.expert_misses == uses);
        CHECK(s.total.store_reads == s.total.expert_misses);
        CHECK(s.total.store_read_bytes >= s.total.store_reads * static_cast<int64_t>(m.spec.bytes()));
        CHECK(s.total.prefetch_used <= s.total.prefetch_issued);
        CHECK(s.total.prefetch_issued + s.total.prefetch_dropped > 0);  // the predictions reached the copy engine
        if (slots == 18 && ev == eviction_policy::eviction_policy_lru) {
          // Every expert fits: what was read in place was loaded, so every layer's last block
          // again reads each of its experts from a slot.
          for (int32_t layer = 0; layer < 3; ++layer) {
            const batch& b = last[static_cast<size_t>(layer)];
            std::vector<float> out(b.x.size());
            resident_args a;
            a.layer = layer, a.tokens = static_cast<int64_t>(b.ids.size()) / 2, a.top_k = 2, a.x = b.x.data(),
            a.out = out.data(), a.ids = b.ids.data(), a.weights = b.w.data();
            CHECK_OK(rt->moe_forward_device(a));
          }
          CHECK_OK(rt->wait_idle());
          CHECK(rt->stats().total.store_reads == s.total.store_reads);
        }
        for (const slot_snapshot& sl : rt->slots()) CHECK(sl.refs == 0);
      }
    }
  }
}

TEST(device_forward_reads_a_block_from_slots_once_its_experts_are_loaded) {
  const pgref::toy_model m = pgref::make_model(2, 6, 24, 20, ffn_kind::ffn_kind_gated_silu, 6);
  auto rt = make_runtime(m, 12, eviction_policy::eviction_policy_lru, /*copy_delay_us=*/200);
  if (!rt) return;
  std::mt19937 rng(9);
  batch b = random_batch(rng, 2, 2, 24, 6);
  std::vector<float> out(b.x.size());
  resident_args a;
  a.layer = 1, a.tokens = 2, a.top_k = 2, a.x = b.x.data(), a.out = out.data(), a.ids = b.ids.data(),
  a.weights = b.w.data();
  CHECK_OK(rt->moe_forward_device(a));  // nothing is in a slot: every expert read in place
  CHECK_OK(rt->wait_idle());
  runtime_stats s = rt->stats();
  const int64_t distinct = static_cast<int64_t>(std::set<int32_t>(b.ids.begin(), b.ids.end()).size());
  CHECK(s.total.store_reads == distinct);
  CHECK(s.total.bytes_h2d == distinct * static_cast<int64_t>(m.spec.bytes()));  // then loaded for later
  std::vector<int32_t> table;
  CHECK_OK(rt->moe_forward_device(a));  // the same experts: from their slots now
  CHECK_OK(rt->wait_idle());
  s = rt->stats();
  CHECK(s.total.store_reads == distinct);
  CHECK(s.total.expert_hits == distinct);
  CHECK_OK(rt->slot_table(&table));
  for (int32_t e : b.ids) CHECK(table[static_cast<size_t>(6 + e)] >= 0);
  CHECK(pgref::max_abs_diff(out, pgref::reference_forward(m, 1, b.x, b.ids, b.w, 2, 2)) < 1e-4f);
  CHECK_OK(rt->check(nullptr));
}

TEST(device_forward_rejects_what_it_cannot_run) {
  const pgref::toy_model m = pgref::make_model(2, 6, 24, 20, ffn_kind::ffn_kind_gated_silu, 7);
  auto rt = make_runtime(m, 3);
  if (!rt) return;
  std::vector<float> x(static_cast<size_t>(40 * 24)), out(x.size()), w(80, 0.5f);
  std::vector<int32_t> ids(80, 1), next(300, 2);
  resident_args a;
  a.layer = 0, a.tokens = 40, a.top_k = 2, a.x = x.data(), a.out = out.data(), a.ids = ids.data(), a.weights = w.data();
  CHECK_ERR(rt->moe_forward_device(a), "80 (token, expert) rows; the device path takes up to 64");
  a.tokens = 2;
  a.next_layer = 1, a.next_ids = next.data(), a.num_next = 300;
  CHECK_ERR(rt->moe_forward_device(a), "300 predicted ids for the next layer; give 0 to 256");
  a.num_next = 3, a.next_layer = 2;
  CHECK_ERR(rt->moe_forward_device(a), "next_layer: layer 2 is out of range");
  a.layer = 5;
  CHECK_ERR(rt->moe_forward_device(a), "moe_forward_device: layer 5 is out of range");
  CHECK(rt->stats().device_forwards == 0);
  CHECK_OK(rt->check(nullptr));
}

TEST(forward_every_ffn_kind_with_and_without_biases) {
  for (int k = 0; k <= static_cast<int>(ffn_kind::ffn_kind_gated_silu_clamped); ++k) {
    for (bool bias : {false, true}) {
      const ffn_kind kind = static_cast<ffn_kind>(k);
      pgref::toy_model m = pgref::make_model(1, 4, 17, 9, kind, 3 + static_cast<uint32_t>(k), bias);
      m.spec.limit = 0.4f;  // small enough that gated_swiglu_oai's clamps bite on these values
      auto rt = make_runtime(m, 2);
      if (!rt) return;
      std::mt19937 rng(5);
      batch b = random_batch(rng, 10, 2, 17, 4);
      std::vector<float> out;
      CHECK_OK(run(*rt, 0, b, 10, 2, &out));
      const float diff = pgref::max_abs_diff(out, pgref::reference_forward(m, 0, b.x, b.ids, b.w, 10, 2));
      if (!(diff < 1e-4f)) std::printf("  %s, bias %d: max diff %g\n", ffn_kind_name(kind), bias, diff);
      CHECK(diff < 1e-4f);
    }
  }
}

TEST(errors_name_the_problem) {
  const pgref::toy_model m = pgref::make_model(2, 4, 8, 8, ffn_kind::ffn_kind_gated_silu, 2);
  runtime_config cfg;
  cfg.num_layers = 2;
  cfg.num_experts = 4;
  cfg.spec = m.spec;
  cfg.expert_memory = static_cast<int64_t>(m.spec.bytes()) - 1;
  std::unique_ptr<runtime> rt;
  CHECK_ERR(runtime::create(make_cpu_backend(), cfg, &rt), "smaller than one expert");
  cfg.expert_memory = -1;
  cfg.spec.hidden = 0;
  CHECK_ERR(runtime::create(make_cpu_backend(), cfg, &rt), "must be positive");

  auto good = make_runtime(m, 2);
  if (!good) return;
  std::mt19937 rng(1);
  batch b = random_batch(rng, 2, 2, 8, 4);
  b.ids[3] = 4;
  std::vector<float> out;
  CHECK_ERR(run(*good, 0, b, 2, 2, &out), "expert id 4 at token 1, k 1 is out of range");
  b.ids[3] = 1;
  CHECK_ERR(run(*good, 2, b, 2, 2, &out), "layer 2 is out of range");
  const int32_t bad[] = {9};
  CHECK_ERR(good->prefetch(0, bad, 1), "expert id 9");
  CHECK_OK(good->pin({0, 0}));
  CHECK_ERR(good->pin({0, 1}), "at least one slot must stay free");
  CHECK_ERR(good->evict({0, 0}), "pinned");
  CHECK_OK(good->unpin({0, 0}));
  CHECK_OK(good->evict({0, 0}));
  CHECK_OK(good->close());
  CHECK_ERR(run(*good, 0, b, 2, 2, &out), "closed");
  CHECK_ERR(good->prefetch(0, bad, 0), "closed");
}

TEST(prefetch_then_forward_uses_the_prefetched_experts) {
  const pgref::toy_model m = pgref::make_model(2, 8, 16, 16, ffn_kind::ffn_kind_gated_silu, 4);
  auto rt = make_runtime(m, 4);
  if (!rt) return;
  const int32_t want[] = {1, 5};
  CHECK_OK(rt->prefetch(1, want, 2));
  CHECK_OK(rt->wait_idle());
  batch b;
  b.x.assign(2 * 16, 0.5f);
  b.ids = {1, 5, 5, 1};
  b.w = {0.5f, 0.5f, 0.25f, 0.75f};
  std::vector<float> out;
  CHECK_OK(run(*rt, 1, b, 2, 2, &out));
  const runtime_stats s = rt->stats();
  CHECK(s.total.prefetch_issued == 2);
  CHECK(s.total.prefetch_used == 2);
  CHECK(s.total.expert_hits == 2);
  CHECK(s.total.expert_misses == 0);
  CHECK(s.total.bytes_h2d == 2 * static_cast<int64_t>(m.spec.bytes()));
  CHECK(pgref::max_abs_diff(out, pgref::reference_forward(m, 1, b.x, b.ids, b.w, 2, 2)) < 1e-4f);
  // A wrong guess for layer 0 is dropped or wasted, never used.
  const int32_t guess[] = {3};
  CHECK_OK(rt->prefetch(0, guess, 1));
  b.ids = {0, 2, 2, 0};
  CHECK_OK(run(*rt, 0, b, 2, 2, &out));
  CHECK_OK(rt->wait_idle());  // until then the guess may still wait in the prefetch queue
  // (a copy that had started when the forward dropped unwanted prefetches counts as issued only)
  const runtime_stats s2 = rt->stats();
  CHECK(s2.layers[0].prefetch_used == 0);
  CHECK(s2.layers[0].prefetch_issued + s2.layers[0].prefetch_dropped == 1);
  CHECK_OK(rt->check(nullptr));
}

namespace {

// The CPU backend, except that slabs larger than `limit` bytes are refused (an exhausted device).
class slab_limit_backend final : public backend {
 public:
  explicit slab_limit_backend(std::shared_ptr<size_t> limit) : inner_(make_cpu_backend()), limit_(limit) {}
  const char* name() const override { return "cpu-with-slab-limit"; }
  backend_caps caps() const override { return inner_->caps(); }
  status alloc_device(size_t bytes, void** ptr) override {
    if (bytes > *limit_) return {status_code::status_code_out_of_memory, "test: device memory exhausted"};
    return inner_->alloc_device(bytes, ptr);
  }
  void free_device(void* p) override { inner_->free_device(p); }
  status alloc_host(size_t b, void** p) override { return inner_->alloc_host(b, p); }
  void free_host(void* p) override { inner_->free_host(p); }
  status alloc_workspace(size_t b, void* s, void** p) override { return inner_->alloc_workspace(b, s, p); }
  void free_workspace(void* p, void* s) override { inner_->free_workspace(p, s); }
  status create_event(bool t, std::unique_ptr<backend_event>* out) override { return inner_->create_event(t, out); }
  status copy_wait(backend_event* ev) override { return inner_->copy_wait(ev); }
  status copy_to_device(void* d, const void* s, size_t b, backend_event* done) override {
    return inner_->copy_to_device(d, s, b, done);
  }
  status record_copy(backend_event* ev) override { return inner_->record_copy(ev); }
  status wait_host(backend_event* ev) override { return inner_->wait_host(ev); }
  status record(backend_event* ev, void* s) override { return inner_->record(ev, s); }
  status stream_wait(backend_event* ev, void* s) override { return inner_->stream_wait(ev, s); }
  status elapsed_seconds(backend_event* a, backend_event* b, double* out) override {
    return inner_->elapsed_seconds(a, b, out);
  }
  bool query(backend_event* ev) override { return inner_->query(ev); }
  status upload(void* d, const void* s, size_t b, void* st) override { return inner_->upload(d, s, b, st); }
  status download_sync(void* d, const void* s, size_t b) override { return inner_->download_sync(d, s, b); }
  status synchronize(void* s) override { return inner_->synchronize(s); }
  status gemm_nt(dtype dt, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda, const void* b,
                 int64_t ldb, void* c, int64_t ldc, void* s) override {
    return inner_->gemm_nt(dt, m, n, k, a, lda, b, ldb, c, ldc, s);
  }
  status gather_rows(dtype dt, void* d, const void* s, const int32_t* rows, int64_t n, int64_t w,
                     void* st) override {
    return inner_->gather_rows(dt, d, s, rows, n, w, st);
  }
  status activate(const expert_spec& sp, void* data, int64_t rows, int64_t ld, void* s) override {
    return inner_->activate(sp, data, rows, ld, s);
  }
  status add_bias(dtype dt, void* data, int64_t rows, int64_t w, int64_t ld, const void* bias,
                  void* s) override {
    return inner_->add_bias(dt, data, rows, w, ld, bias, s);
  }
  status combine(dtype dt, void* out, const void* y, const int32_t* row_of, const float* w, int64_t t,
                 int64_t k, int64_t width, void* s) override {
    return inner_->combine(dt, out, y, row_of, w, t, k, width, s);
  }
  status gemm_nt_quantized(dtype dt, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
                           const quantized_matrix& b, void* c, int64_t ldc, void* s) override {
    return inner_->gemm_nt_quantized(dt, m, n, k, a, lda, b, c, ldc, s);
  }
  status expert_ffn_resident(const expert_spec& sp, const expert_places& at, const void* x, const int32_t* ids,
                             const float* w, int64_t t, int64_t k, void* out, void* ws, void* s) override {
    return inner_->expert_ffn_resident(sp, at, x, ids, w, t, k, out, ws, s);
  }
  status download(void* dst, const void* src, size_t bytes, void* s) override {
    return inner_->download(dst, src, bytes, s);
  }
  status device_address(const void* host, const void** out) override { return inner_->device_address(host, out); }

 private:
  std::unique_ptr<backend> inner_;
  std::shared_ptr<size_t> limit_;
};

}  // namespace

TEST(resize_that_cannot_allocate_keeps_a_usable_runtime) {
  const pgref::toy_model m = pgref::make_model(2, 6, 16, 12, ffn_kind::ffn_kind_gated_silu, 9);
  const size_t one = m.spec.bytes();
  auto limit = std::make_shared<size_t>(3 * one);
  runtime_config cfg;
  cfg.num_layers = m.layers;
  cfg.num_experts = m.experts;
  cfg.spec = m.spec;
  cfg.expert_memory = static_cast<int64_t>(2 * one);
  std::unique_ptr<runtime> rt;
  CHECK_OK(runtime::create(std::make_unique<slab_limit_backend>(limit), cfg, &rt));
  if (!rt) return;
  CHECK_OK(pgref::fill_store(*rt, m));
  std::mt19937 rng(3);
  std::vector<float> out;
  batch b = random_batch(rng, 4, 2, 16, 6);
  CHECK_OK(run(*rt, 0, b, 4, 2, &out));

  // Too large for the device: the old budget comes back, empty, and the runtime still computes.
  CHECK_ERR(rt->resize(static_cast<int64_t>(5 * one), eviction_policy::eviction_policy_lru),
            "the previous budget of 2 slots was kept");
  CHECK(rt->num_slots() == 2);
  for (int32_t layer = 0; layer < 2; ++layer) {
    b = random_batch(rng, 4, 2, 16, 6);
    CHECK_OK(run(*rt, layer, b, 4, 2, &out));
    CHECK(pgref::max_abs_diff(out, pgref::reference_forward(m, layer, b.x, b.ids, b.w, 4, 2)) < 1e-4f);
  }
  CHECK_OK(rt->check(nullptr));
  CHECK_OK(rt->resize(static_cast<int64_t>(3 * one), eviction_policy::eviction_policy_lfu));
  CHECK(rt->num_slots() == 3);

  // Not even the old budget fits any more: every later call says so, none touches a slot.
  *limit = 0;
  CHECK_ERR(rt->resize(static_cast<int64_t>(2 * one), eviction_policy::eviction_policy_lru),
            "device memory exhausted");
  CHECK_ERR(run(*rt, 0, b, 4, 2, &out), "create a new runtime");
  CHECK_ERR(rt->pin({0, 1}), "create a new runtime");
  CHECK_ERR(rt->check(nullptr), "create a new runtime");
  CHECK_OK(rt->close());
}
