#include "thread_pool.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PREGATED_PAUSE() _mm_pause()
#else
#define PREGATED_PAUSE() std::this_thread::yield()
#endif

namespace pregated::cpu {

namespace {

int default_spin_us() {
  if (const char* env = std::getenv("PREGATED_SPIN_US")) {
    const int n = std::atoi(env);
    if (n >= 0) return n;
  }
  return 50;
}

}  // namespace

thread_pool::thread_pool(int threads, int spin_us)
    : spin_ns_(int64_t{1000} * (spin_us >= 0 ? spin_us : default_spin_us())) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

thread_pool::~thread_pool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_.store(true);
  }
  start_cv_.notify_all();
  for (std::thread& t : workers_) t.join();
}

template <class Pred>
bool thread_pool::spin_until(Pred pred) const {
  if (pred()) return true;
  const int64_t spin_ns = spin_ns_.load(std::memory_order_relaxed);
  if (spin_ns <= 0) return false;
  const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(spin_ns);
  for (int i = 1;; ++i) {
    PREGATED_PAUSE();
    if (pred()) return true;
    if (i % 64 == 0 && std::chrono::steady_clock::now() >= until) return false;
  }
}

void thread_pool::take_tasks() {
  for (int64_t i = next_.fetch_add(1); i < n_; i = next_.fetch_add(1)) (*fn_)(i);
}

void thread_pool::worker_loop() {
  uint64_t seen = 0;
  for (;;) {
    const auto started = [&] {
      return stop_.load(std::memory_order_relaxed) || generation_.load(std::memory_order_acquire) != seen;
    };
    if (!spin_until(started)) {
      std::unique_lock<std::mutex> lk(mu_);
      ++sleepers_;
      start_cv_.wait(lk, started);
      --sleepers_;
    }
    if (stop_.load()) return;
    seen = generation_.load(std::memory_order_acquire);
    take_tasks();
    if (busy_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lk(mu_);  // the caller may be between its check and its wait
      done_cv_.notify_one();
    }
  }
}

void thread_pool::run(int64_t n, const std::function<void(int64_t)>& fn) {
  std::unique_lock<std::mutex> job(job_mu_, std::defer_lock);
  if (n <= 1 || workers_.empty() || !job.try_lock()) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  bool wake;
  {
    std::lock_guard<std::mutex> lk(mu_);
    fn_ = &fn;
    n_ = n;
    next_.store(0);
    busy_.store(static_cast<int>(workers_.size()));
    generation_.fetch_add(1, std::memory_order_release);
    wake = sleepers_ > 0;
  }
  if (wake) start_cv_.notify_all();
  take_tasks();
  const auto done = [&] { return busy_.load(std::memory_order_acquire) == 0; };
  if (!spin_until(done)) {
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, done);
  }
  fn_ = nullptr;
}

namespace {

int default_threads() {
  if (const char* env = std::getenv("PREGATED_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  int threads = hw > 0 ? static_cast<int>(hw) : 1;
  // Under torchrun, several ranks share a host's cores: each takes its part, else every rank's
  // pool would be as large as the machine and they would spin against each other.
  if (const char* env = std::getenv("LOCAL_WORLD_SIZE")) {
    const int ranks = std::atoi(env);
    if (ranks > 1) threads = std::max(1, threads / ranks);
  }
  return threads;
}

std::mutex shared_mu;
std::unique_ptr<thread_pool>& shared_slot() {
  static std::unique_ptr<thread_pool> pool = std::make_unique<thread_pool>(default_threads());
  return pool;
}

thread_local thread_pool* current_pool = nullptr;

}  // namespace

thread_pool& thread_pool::current() { return current_pool != nullptr ? *current_pool : shared(); }

scoped_pool::scoped_pool(thread_pool* pool) : previous_(current_pool) { current_pool = pool; }
scoped_pool::~scoped_pool() { current_pool = previous_; }

thread_pool& thread_pool::shared() {
  std::lock_guard<std::mutex> lk(shared_mu);
  return *shared_slot();
}

void thread_pool::set_shared_size(int threads) {
  std::lock_guard<std::mutex> lk(shared_mu);
  std::unique_ptr<thread_pool>& slot = shared_slot();
  std::lock_guard<std::mutex> job(slot->job_mu_);  // no job of the old pool is in flight
  slot = std::make_unique<thread_pool>(threads > 0 ? threads : default_threads(), slot->spin_us());
}

}  // namespace pregated::cpu
