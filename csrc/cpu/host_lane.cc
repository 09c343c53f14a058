// The host lane's worker: one job at a time, each expert's FFN through the CPU backend's
// kernels on the lane's own pool.
#include "host_lane.h"

#include <algorithm>
#include <chrono>

#include "thread_pool.h"

namespace pregated {

namespace {

int lane_threads(int threads) {
  if (threads > 0) return threads;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

}  // namespace

host_lane::host_lane(const expert_spec& sp, int threads)
    : sp_(sp),
      be_(make_cpu_backend()),
      pool_(std::make_unique<cpu::thread_pool>(lane_threads(threads))),
      thread_([this] { loop(); }) {}

host_lane::~host_lane() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

int host_lane::threads() const { return pool_->size(); }

void host_lane::submit(job* j) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    j->done = false;
    jobs_.push_back(j);
  }
  cv_.notify_all();
}

void host_lane::wait(job* j) {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return j->done; });
}

void host_lane::loop() {
  cpu::scoped_pool own(pool_.get());
  for (;;) {
    job* j = nullptr;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stop_ || !jobs_.empty(); });
      if (jobs_.empty()) return;  // stopping, nothing left
      j = jobs_.front();
      jobs_.pop_front();
    }
    run(j);
    {
      std::lock_guard<std::mutex> lk(mu_);
      j->done = true;
    }
    cv_.notify_all();
  }
}

void host_lane::run(job* j) {
  const auto t0 = std::chrono::steady_clock::now();
  int64_t most = 0;
  for (const item& it : j->items) most = std::max(most, it.rows);
  void* act = nullptr;
  const size_t act_bytes = static_cast<size_t>(most * sp_.up_rows()) * dtype_size(sp_.dt);
  status st = most > 0 ? be_->alloc_workspace(act_bytes, nullptr, &act) : status{};
  for (size_t i = 0; i < j->items.size() && st.is_ok(); ++i) {
    const item& it = j->items[i];
    st = expert_ffn(*be_, sp_, it.w, it.x, it.rows, act, it.y, nullptr);
  }
  if (act != nullptr) be_->free_workspace(act, nullptr);
  j->result = st;
  j->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace pregated
