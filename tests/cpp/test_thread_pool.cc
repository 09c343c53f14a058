// The CPU backend's thread pool: every task of every job runs exactly once, with workers that
// spin between jobs and with workers that sleep, from several calling threads at once.
#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "harness.h"
#include "cpu/thread_pool.h"

using pregated::cpu::thread_pool;

namespace {

// `jobs` jobs of 1..17 tasks each; every task counts itself in its job's slots.
bool run_jobs(thread_pool& pool, int jobs, int salt) {
  bool ok = true;
  for (int j = 0; j < jobs; ++j) {
    const int n = 1 + (j * 7 + salt) % 17;
    std::vector<std::atomic<int>> seen(static_cast<size_t>(n));
    for (auto& s : seen) s.store(0);
    pool.run(n, [&](int64_t t) { seen[static_cast<size_t>(t)].fetch_add(1); });
    for (auto& s : seen) ok = ok && s.load() == 1;
  }
  return ok;
}

}  // namespace

TEST(thread_pool_runs_every_task_once_spinning_or_sleeping) {
  for (int spin_us : {0, 5, 200}) {
    for (int threads : {1, 2, 4}) {
      thread_pool pool(threads, spin_us);
      CHECK(pool.size() == threads);
      CHECK(run_jobs(pool, 500, threads));
      // Gaps longer than the spin: the workers go to sleep and must be woken.
      for (int i = 0; i < 3; ++i) {
        std::this_thread::sleep_for(std::chrono::microseconds(spin_us + 300));
        CHECK(run_jobs(pool, 2, i));
      }
      // The spin changed while workers spin or sleep (a decode loop raising it, then restoring).
      for (int us : {1000, 0, spin_us}) {
        pool.set_spin_us(us);
        CHECK(pool.spin_us() == us);
        CHECK(run_jobs(pool, 3, threads));
        std::this_thread::sleep_for(std::chrono::microseconds(300));
        CHECK(run_jobs(pool, 2, threads));
      }
    }
  }
}

TEST(thread_pool_serves_several_callers_at_once) {
  // A job started while another runs goes inline on its caller: still every task once.
  for (int spin_us : {0, 50}) {
    thread_pool pool(3, spin_us);
    std::atomic<bool> ok{true};
    std::vector<std::thread> callers;
    for (int c = 0; c < 4; ++c) {
      callers.emplace_back([&, c] {
        if (!run_jobs(pool, 400, c)) ok.store(false);
      });
    }
    for (auto& t : callers) t.join();
    CHECK(ok.load());
  }
}

TEST(thread_pool_stops_with_workers_spinning) {
  for (int i = 0; i < 20; ++i) {
    auto pool = std::make_unique<thread_pool>(3, 1000);
    CHECK(run_jobs(*pool, 3, i));
    pool.reset();  // workers are inside their spin: they must see the stop and leave
  }
}
