// One persistent pool of CPU workers for the CPU backend's kernels: no thread is created per
// GEMM, and OpenBLAS runs single-threaded inside the pool's tasks, so the backend never has more
// busy threads than cores (OpenBLAS's own workers spin after each call and slow PyTorch's ops).
//
// A decode step hands the pool dozens of small jobs a few microseconds apart (one per dense
// layer and MoE block). Waking a sleeping worker through the kernel costs tens of microseconds on
// a virtual machine, as much as a job itself, so workers and the caller spin for a short while
// (`spin_us`, default 50, PREGATED_SPIN_US) before they sleep, far shorter than OpenMP's 200 ms,
// so little spins while PyTorch's threads work between jobs (prefill). A CPU decode loop, where
// PyTorch runs on one thread and the gaps between the pool's jobs (norms, attention) last
// 50-300 us, raises it for its duration (set_spin_us): a worker that fell asleep in such a gap
// doubled the time of the next small GEMM (a 512x512 fp32 projection: 93 us against 40).
#pragma once

#include <algorithm>
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
  explicit thread_pool(int threads, int spin_us = -1);
  ~thread_pool();
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }
  // How long workers and the caller spin before they sleep (microseconds; 0: never spin).
  int spin_us() const { return static_cast<int>(spin_ns_.load(std::memory_order_relaxed) / 1000); }
  void set_spin_us(int us) { spin_ns_.store(int64_t{1000} * std::max(us, 0), std::memory_order_relaxed); }
  // fn(task) for every task in [0, n), on the workers and the calling thread; returns when all
  // are done. A call made while another is running (another thread's MoE block) runs inline.
  void run(int64_t n, const std::function<void(int64_t)>& fn);

  // fn(i0, i1) over pieces of [0, n), up to four a thread, on this pool; with `parallel` false
  // (too little work to hand out) one call fn(0, n) on the calling thread.
  template <class Fn>
  void run_split(int64_t n, bool parallel, Fn&& fn) {
    if (!parallel || n <= 1) {
      fn(int64_t{0}, n);
      return;
    }
    const int64_t tasks = std::min<int64_t>(n, 4 * static_cast<int64_t>(size()));
    const int64_t per = (n + tasks - 1) / tasks;
    run(tasks, [&](int64_t t) { fn(t * per, std::min(n, (t + 1) * per)); });
  }

  // The backend's pool: PREGATED_NUM_THREADS, else one thread per core (divided by torchrun's
  // LOCAL_WORLD_SIZE: the ranks on a host share its cores), or set_shared_size().
  static thread_pool& shared();
  // The pool the kernels run on in this thread: the one a scoped_pool set, else shared().
  static thread_pool& current();
  // Replaces the shared pool by one of `threads` threads (waits for a job in progress); the
  // spin time carries over.
  static void set_shared_size(int threads);

 private:
  void worker_loop();
  void take_tasks();
  // Spins until pred() holds or the spin time is over; true when it holds.
  template <class Pred>
  bool spin_until(Pred pred) const;

  std::vector<std::thread> workers_;
  std::mutex job_mu_;  // one job at a time
  std::mutex mu_;
  std::condition_variable start_cv_, done_cv_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<uint64_t> generation_{0};  // a new job: stored after fn_ and n_ (release)
  std::atomic<int> busy_{0};             // workers still in the job
  int sleepers_ = 0;                     // workers waiting on start_cv_ (under mu_)
  std::atomic<bool> stop_{false};
  std::atomic<int64_t> spin_ns_;
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
