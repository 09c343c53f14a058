// One persistent pool of CPU workers for the CPU backend's kernels: no thread is created per
// GEMM, and OpenBLAS runs single-threaded inside the pool's tasks, so the backend never has more
// busy threads than cores (OpenBLAS's own workers spin after each call and slow PyTorch's ops).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace pregated::cpu {

class thread_pool {
 public:
  // `threads` counts the calling thread: threads - 1 workers are started.
  explicit thread_pool(int threads);
  ~thread_pool();
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }
  // fn(task) for every task in [0, n), on the workers and the calling thread; returns when all
  // are done. A call made while another is running (another thread's MoE block) runs inline.
  void run(int64_t n, const std::function<void(int64_t)>& fn);

  // The backend's pool: one thread per core, PREGATED_NUM_THREADS, or set_shared_size().
  static thread_pool& shared();
  // The pool the kernels run on in this thread: the one a scoped_pool set, else shared().
  static thread_pool& current();
  // Replaces the shared pool by one of `threads` threads (waits for a job in progress).
  static void set_shared_size(int threads);

 private:
  void worker_loop();
  void take_tasks();

  std::vector<std::thread> workers_;
  std::mutex job_mu_;  // one job at a time
  std::mutex mu_;
  std::condition_variable start_cv_, done_cv_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  uint64_t generation_ = 0;
  int busy_ = 0;
  bool stop_ = false;
};

// Makes `pool` the calling thread's current pool for the guard's lifetime (the host lane's
// worker: its kernels run on the lane's own pool, beside the backend's).
class scoped_pool {
 public:
  explicit scoped_pool(thread_pool* pool);
  ~scoped_pool();
  scoped_pool(const scoped_pool&) = delete;
  scoped_pool& operator=(const scoped_pool&) = delete;

 private:
  thread_pool* previous_;
};

}  // namespace pregated::cpu
