#include "thread_pool.h"

#include <cstdlib>
#include <memory>
#include <string>

namespace pregated::cpu {

thread_pool::thread_pool(int threads) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

thread_pool::~thread_pool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  start_cv_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void thread_pool::take_tasks() {
  for (int64_t i = next_.fetch_add(1); i < n_; i = next_.fetch_add(1)) (*fn_)(i);
}

void thread_pool::worker_loop() {
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lk(mu_);
      start_cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
    }
    take_tasks();
    std::lock_guard<std::mutex> lk(mu_);
    if (--busy_ == 0) done_cv_.notify_one();
  }
}

void thread_pool::run(int64_t n, const std::function<void(int64_t)>& fn) {
  std::unique_lock<std::mutex> job(job_mu_, std::defer_lock);
  if (n <= 1 || workers_.empty() || !job.try_lock()) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    fn_ = &fn;
    n_ = n;
    next_.store(0);
    busy_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  start_cv_.notify_all();
  take_tasks();
  std::unique_lock<std::mutex> lk(mu_);
  done_cv_.wait(lk, [&] { return busy_ == 0; });
  fn_ = nullptr;
}

namespace {

int default_threads() {
  if (const char* env = std::getenv("PREGATED_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
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
  slot = std::make_unique<thread_pool>(threads > 0 ? threads : default_threads());
}

}  // namespace pregated::cpu
