// The CPU backend: "device" memory is host memory and compute runs synchronously in the calling
// thread, so every stream argument is ignored and a compute event is complete once recorded.
// Copies are memcpy, done by the copy engine's worker before copy_to_device returns or, with
// cpu_backend_options::copy_delay_us >= 0, asynchronously by the backend's own copy thread after
// that delay: then the runtime's waiting paths (copies in flight, stalls) run on the CPU as they
// do on a GPU, in CI and under ThreadSanitizer.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu_gemm.h"
#include "decode_attention.h"
#include "ffn_elementwise.h"
#include "half.h"
#include "rms_norm.h"
#include "small_rows.h"
#include "softmax_topk.h"
#include "thread_pool.h"
#include "pregated/backend.h"

namespace pregated {

namespace {

using clock_type = std::chrono::steady_clock;

// A CUDA event's semantics on the CPU: each record supersedes the earlier ones, and waiting
// waits for the latest record; an earlier copy that completes late does not complete it.
class cpu_event : public backend_event {
 public:
  // A record whose work completes later (an asynchronous copy): returns its number.
  uint64_t record_pending() {
    std::lock_guard<std::mutex> lk(mu_);
    return ++recorded_;
  }
  // Record `n` completed (0: a record that completes now).
  void complete(uint64_t n = 0) {
    std::lock_guard<std::mutex> lk(mu_);
    if (n == 0) n = ++recorded_;
    if (n > completed_) {
      completed_ = n;
      time_ = clock_type::now();
    }
    cv_.notify_all();
  }
  void wait() {
    std::unique_lock<std::mutex> lk(mu_);
    const uint64_t want = recorded_;
    cv_.wait(lk, [&] { return completed_ >= want; });
  }
  bool done() {
    std::lock_guard<std::mutex> lk(mu_);
    return completed_ >= recorded_;
  }
  clock_type::time_point time() {
    std::lock_guard<std::mutex> lk(mu_);
    return time_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t recorded_ = 0;   // never recorded: nothing to wait for, like a CUDA event
  uint64_t completed_ = 0;
  clock_type::time_point time_ = clock_type::now();
};

cpu_event* as_cpu(backend_event* ev) { return static_cast<cpu_event*>(ev); }

// Allocations of at least this much go on 2 MiB pages where the kernel offers them
// (transparent huge pages in `madvise` mode): a kernel that streams weights from memory stalls at
// every 4 KiB page (the hardware prefetcher stops at the page's end and each page is a TLB miss),
// which cost 4x on the 512 KiB reads of a decode step's projections here (docs/architecture.md).
constexpr size_t huge_page = size_t{2} << 20;

// PREGATED_HUGE_PAGES=0 keeps 4 KiB pages (to measure the difference, or where huge pages cost
// too much memory).
bool huge_pages_wanted() {
  static const bool wanted = [] {
    const char* env = std::getenv("PREGATED_HUGE_PAGES");
    return env == nullptr || std::string(env) != "0";
  }();
  return wanted;
}

status aligned(size_t bytes, void** ptr, const char* what) {
  void* p = nullptr;
  const bool huge = bytes >= huge_page && huge_pages_wanted();
  if (huge) bytes = (bytes + huge_page - 1) / huge_page * huge_page;
  // 64-byte alignment for vector loads; at least one byte so every allocation is distinct.
  if (posix_memalign(&p, huge ? huge_page : 64, bytes == 0 ? 1 : bytes) != 0) {
    return {status_code::status_code_out_of_memory,
            std::string("cannot allocate ") + std::to_string(bytes) + " bytes (" +
                format_bytes(static_cast<int64_t>(bytes)) + ") of " + what + " memory"};
  }
#if defined(MADV_HUGEPAGE)
  if (huge) madvise(p, bytes, MADV_HUGEPAGE);  // advice only: 4 KiB pages where refused
#endif
  *ptr = p;
  return {};
}

// The asynchronous copy engine: one thread running copies (and event records) in order.
class copy_thread {
 public:
  explicit copy_thread(int64_t delay_us) : delay_us_(delay_us), thread_([this] { loop(); }) {}
  ~copy_thread() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void push(std::function<void()> job) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      jobs_.push_back(std::move(job));
    }
    cv_.notify_all();
  }
  int64_t delay_us() const { return delay_us_; }

 private:
  void loop() {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || !jobs_.empty(); });
        if (jobs_.empty()) return;  // stop_, and everything handed over has run
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      job();
    }
  }

  int64_t delay_us_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  bool stop_ = false;
  std::thread thread_;  // last: starts once the rest is built
};

class cpu_backend final : public backend {
 public:
  explicit cpu_backend(const cpu_backend_options& opts) {
    if (opts.copy_delay_us >= 0) copier_ = std::make_unique<copy_thread>(opts.copy_delay_us);
  }
  const char* name() const override { return "cpu"; }
  backend_caps caps() const override { return {/*async_copy=*/copier_ != nullptr, /*device_is_host=*/true}; }

  status alloc_device(size_t bytes, void** ptr) override { return aligned(bytes, ptr, "slab"); }
  void free_device(void* ptr) override { std::free(ptr); }
  status alloc_host(size_t bytes, void** ptr) override { return aligned(bytes, ptr, "host"); }
  void free_host(void* ptr) override { std::free(ptr); }
  status alloc_workspace(size_t bytes, void*, void** ptr) override {
    return aligned(bytes, ptr, "workspace");
  }
  void free_workspace(void* ptr, void*) override { std::free(ptr); }

  status create_event(bool, std::unique_ptr<backend_event>* out) override {
    *out = std::make_unique<cpu_event>();
    return {};
  }

  // Compute is synchronous: a slot's last use is recorded once its GEMMs are done; a copy
  // waits for it all the same, as on a GPU.
  status copy_wait(backend_event* ev) override {
    if (copier_ && ev != nullptr) copier_->push([e = as_cpu(ev)] { e->wait(); });
    return {};
  }
  status copy_to_device(void* dst, const void* src, size_t bytes,
                        backend_event* done) override {
    cpu_event* ev = done != nullptr ? as_cpu(done) : nullptr;
    if (!copier_) {
      std::memcpy(dst, src, bytes);
      if (ev != nullptr) ev->complete();
      return {};
    }
    const uint64_t n = ev != nullptr ? ev->record_pending() : 0;
    copier_->push([dst, src, bytes, ev, n, delay = copier_->delay_us()] {
      if (delay > 0) std::this_thread::sleep_for(std::chrono::microseconds(delay));
      std::memcpy(dst, src, bytes);
      if (ev != nullptr) ev->complete(n);
    });
    return {};
  }
  status record_copy(backend_event* ev) override {
    if (!copier_) {
      as_cpu(ev)->complete();
      return {};
    }
    const uint64_t n = as_cpu(ev)->record_pending();
    copier_->push([e = as_cpu(ev), n] { e->complete(n); });
    return {};
  }
  status wait_host(backend_event* ev) override {
    as_cpu(ev)->wait();
    return {};
  }
  status record(backend_event* ev, void*) override {
    as_cpu(ev)->complete();
    return {};
  }
  status stream_wait(backend_event* ev, void*) override {
    as_cpu(ev)->wait();
    return {};
  }
  status elapsed_seconds(backend_event* start, backend_event* end, double* out) override {
    *out = std::chrono::duration<double>(as_cpu(end)->time() - as_cpu(start)->time()).count();
    return {};
  }
  bool query(backend_event* ev) override { return as_cpu(ev)->done(); }

  status upload(void* dst, const void* src, size_t bytes, void*) override {
    std::memcpy(dst, src, bytes);
    return {};
  }
  status download(void* dst, const void* src, size_t bytes, void*) override {
    std::memcpy(dst, src, bytes);
    return {};
  }
  status download_sync(void* dst, const void* src, size_t bytes) override {
    std::memcpy(dst, src, bytes);
    return {};
  }
  status device_address(const void* host, const void** out) override {
    *out = host;
    return {};
  }
  status expert_ffn_resident(const expert_spec& sp, const expert_places& at, const void* x, const int32_t* ids,
                             const float* weights, int64_t tokens, int64_t top_k, void* out, void* ws,
                             void* stream) override {
    // What a GPU runs as batched GEMMs: the (token, expert) rows grouped by expert, each group
    // on its expert's slot; groups of up to 8 rows (decode) go through the pool together, one
    // pass for every expert's first weight and one for the second.
    const dtype dt = sp.dt;
    const size_t esz = dtype_size(dt);
    const int64_t H = sp.hidden, I = sp.intermediate, U = sp.up_rows(), R = tokens * top_k;
    auto* act = static_cast<uint8_t*>(ws);
    auto* y = act + ((static_cast<size_t>(R * U) * esz + 255) & ~size_t{255});
    std::vector<int32_t> order(static_cast<size_t>(R));  // rows by expert; row_of[r]: r's place
    for (int64_t r = 0; r < R; ++r) order[static_cast<size_t>(r)] = static_cast<int32_t>(r);
    std::stable_sort(order.begin(), order.end(), [ids](int32_t p, int32_t q) { return ids[p] < ids[q]; });
    std::vector<int32_t> row_of(static_cast<size_t>(R));
    std::vector<uint8_t> xg(static_cast<size_t>(R * H) * esz);  // x's rows in that order
    for (int64_t p = 0; p < R; ++p) {
      const int32_t r = order[static_cast<size_t>(p)];
      row_of[static_cast<size_t>(r)] = static_cast<int32_t>(p);
      std::memcpy(xg.data() + static_cast<size_t>(p * H) * esz,
                  static_cast<const uint8_t*>(x) + static_cast<size_t>((r / top_k) * H) * esz, static_cast<size_t>(H) * esz);
    }
    struct group { int64_t start, m; const uint8_t* w; };
    std::vector<group> groups;
    for (int64_t p = 0; p < R;) {
      const int32_t e = ids[order[static_cast<size_t>(p)]];
      int64_t q = p;
      while (q < R && ids[order[static_cast<size_t>(q)]] == e) ++q;
      const uint8_t* w = at.expert(e, at.slot_of[e]);
      if (w == nullptr) return internal_error("resident forward: expert " + std::to_string(e) + " has no ready slot");
      groups.push_back({p, q - p, w});
      p = q;
    }
    // One weight for every group: dense few-row groups in one pass, larger ones (prefill) alone;
    // quantized weights one group at a time (their kernels read the codes once for all its rows).
    auto project = [&](const uint8_t* a, int64_t lda, int weight, uint8_t* c, int64_t n, int64_t k) -> status {
      std::vector<cpu::rows_item> items;
      for (const group& g : groups) {
        const uint8_t* a_g = a + static_cast<size_t>(g.start * lda) * esz;
        uint8_t* c_g = c + static_cast<size_t>(g.start * n) * esz;
        if (sp.quantized()) {
          PREGATED_RETURN_IF_ERROR(cpu::gemm_nt_quantized(dt, g.m, n, k, a_g, lda, quantized_part(sp, g.w, weight), c_g, n));
        } else if (g.m <= cpu::small_rows_max) {
          items.push_back({g.m, a_g, lda, g.w + sp.part_offset(weight), c_g, n});
        } else {
          PREGATED_RETURN_IF_ERROR(cpu::gemm_nt(dt, g.m, n, k, a_g, lda, g.w + sp.part_offset(weight), k, c_g, n));
        }
      }
      return cpu::gemm_nt_items(dt, items.data(), static_cast<int64_t>(items.size()), n, k);
    };
    PREGATED_RETURN_IF_ERROR(project(xg.data(), H, 0, act, U, H));
    for (const group& g : groups) {
      if (sp.has_bias) {
        PREGATED_RETURN_IF_ERROR(add_bias(dt, act + static_cast<size_t>(g.start * U) * esz, g.m, U, U,
                                          g.w + sp.part_offset(sp.first_bias_part()), stream));
      }
    }
    PREGATED_RETURN_IF_ERROR(activate(sp, act, R, U, stream));
    PREGATED_RETURN_IF_ERROR(project(act, U, sp.down_part(), y, H, I));
    for (const group& g : groups) {
      if (sp.has_bias) {
        PREGATED_RETURN_IF_ERROR(add_bias(dt, y + static_cast<size_t>(g.start * H) * esz, g.m, H, H,
                                          g.w + sp.part_offset(sp.num_parts() - 1), stream));
      }
    }
    return combine(dt, out, y, row_of.data(), weights, tokens, top_k, H, stream);
  }

  // Compute is synchronous; what waits is the copy thread's queue.
  status synchronize(void*) override {
    if (copier_) {
      cpu_event drained;
      const uint64_t n = drained.record_pending();
      copier_->push([&drained, n] { drained.complete(n); });
      drained.wait();
    }
    return {};
  }

  status gemm_nt(dtype dt, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
                 const void* b, int64_t ldb, void* c, int64_t ldc, void*) override {
    return cpu::gemm_nt(dt, m, n, k, a, lda, b, ldb, c, ldc);
  }
  status gemm_nt_quantized(dtype dt, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
                           const quantized_matrix& b, void* c, int64_t ldc, void*) override {
    return cpu::gemm_nt_quantized(dt, m, n, k, a, lda, b, c, ldc);
  }

  status gather_rows(dtype dt, void* dst, const void* src, const int32_t* rows, int64_t n_rows,
                     int64_t width, void*) override {
    const size_t row_bytes = static_cast<size_t>(width) * dtype_size(dt);
    for (int64_t r = 0; r < n_rows; ++r) {
      std::memcpy(static_cast<uint8_t*>(dst) + static_cast<size_t>(r) * row_bytes,
                  static_cast<const uint8_t*>(src) + static_cast<size_t>(rows[r]) * row_bytes,
                  row_bytes);
    }
    return {};
  }

  status activate(const expert_spec& sp, void* data, int64_t rows, int64_t ld, void*) override {
    cpu::activate_rows(sp, data, rows, ld);
    return {};
  }

  status add_bias(dtype dt, void* data, int64_t rows, int64_t width, int64_t ld, const void* bias,
                  void*) override {
    cpu::add_bias_rows(dt, data, rows, width, ld, bias);
    return {};
  }

  status combine(dtype dt, void* out, const void* y, const int32_t* row_of, const float* weights,
                 int64_t tokens, int64_t top_k, int64_t width, void*) override {
    cpu::combine_rows(dt, out, y, row_of, weights, tokens, top_k, width);
    return {};
  }

 private:
  std::unique_ptr<copy_thread> copier_;  // null: copies are synchronous
};

}  // namespace

std::unique_ptr<backend> make_cpu_backend(const cpu_backend_options& opts) {
  return std::make_unique<cpu_backend>(opts);
}

const char* cpu_kernel_isa() { return cpu::small_rows_isa(); }
bool cpu_kernel_force(const std::string& isa) {
  if (!cpu::small_rows_force(isa.c_str())) return false;
  cpu::rms_norm_force_portable(isa == "portable");
  cpu::decode_attention_force_portable(isa == "portable");
  return true;
}
void cpu_rms_norm(dtype dt, int64_t rows, int64_t n, const void* x, const void* w, float eps, void* out) {
  cpu::rms_norm(dt, rows, n, x, w, eps, out);
}
void cpu_rope(dtype dt, int64_t rows, int64_t width, int64_t heads, int64_t d, void* x, const void* cos,
              const void* sin) {
  cpu::rope_rows(dt, rows, width, heads, d, x, cos, sin);
}
void cpu_attention(dtype dt, int64_t batch, int64_t new_rows, int64_t q_heads, int64_t kv_heads, int64_t keys,
                   int64_t d, const void* q, int64_t q_width, const void* k, kv_layout k_layout, const void* v,
                   kv_layout v_layout, float scale, void* out) {
  cpu::attention_rows(dt, batch, new_rows, q_heads, kv_heads, keys, d, q, q_width, k, k_layout, v, v_layout, scale,
                      out);
}
status cpu_route(dtype dt, int64_t rows, int64_t experts, int64_t hidden, const void* x, const void* w, int64_t k,
                 bool normalize, void* logits, float* weights, int64_t* ids) {
  if (k < 1 || k > experts) return invalid_argument("top_k must be between 1 and the number of experts");
  PREGATED_RETURN_IF_ERROR(cpu::gemm_nt(dt, rows, experts, hidden, x, hidden, w, hidden, logits, experts));
  const float* l32 = static_cast<const float*>(logits);
  std::vector<float> wide;
  if (dt != dtype::dtype_f32) {
    wide.resize(static_cast<size_t>(rows * experts));
    for (size_t i = 0; i < wide.size(); ++i) wide[i] = cpu::widen_at(dt, logits, static_cast<int64_t>(i));
    l32 = wide.data();
  }
  cpu::softmax_topk(rows, experts, l32, k, normalize, weights, ids);
  return {};
}
// Sums of 64-bit words (the compiler vectorises the loop; built for several widths).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_THREAD__) && !defined(__SANITIZE_ADDRESS__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static uint64_t sum_words(const uint64_t* p, size_t n) {
  uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  size_t i = 0;
  for (; i + 4 <= n; i += 4) s0 += p[i], s1 += p[i + 1], s2 += p[i + 2], s3 += p[i + 3];
  for (; i < n; ++i) s0 += p[i];
  return s0 + s1 + s2 + s3;
}

double cpu_read_gbps(size_t bytes) {
  void* buf = nullptr;
  if (!aligned(bytes, &buf, "bandwidth probe").is_ok()) return 0.0;
  std::memset(buf, 1, bytes);
  cpu::thread_pool& pool = cpu::thread_pool::shared();
  const int64_t tasks = 4 * static_cast<int64_t>(pool.size());
  const size_t words = bytes / 8, per = (words + static_cast<size_t>(tasks) - 1) / static_cast<size_t>(tasks);
  std::vector<uint64_t> sums(static_cast<size_t>(tasks));
  double best = 0.0;
  for (int round = 0; round < 6; ++round) {  // the first round warms the pool and the pages
    const auto t0 = std::chrono::steady_clock::now();
    pool.run(tasks, [&](int64_t t) {
      const size_t w0 = std::min(words, static_cast<size_t>(t) * per), w1 = std::min(words, w0 + per);
      sums[static_cast<size_t>(t)] = sum_words(static_cast<const uint64_t*>(buf) + w0, w1 - w0);
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (round > 0 && s > 0) best = std::max(best, static_cast<double>(words * 8) / s / 1e9);
  }
  std::free(buf);
  return best;
}

int cpu_threads() { return cpu::thread_pool::shared().size(); }
void set_cpu_threads(int threads) { cpu::thread_pool::set_shared_size(threads); }
int cpu_spin_us() { return cpu::thread_pool::shared().spin_us(); }
void set_cpu_spin_us(int us) { cpu::thread_pool::shared().set_spin_us(us); }

}  // namespace pregated
