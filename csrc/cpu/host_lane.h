// The host lane: experts computed on the CPU where they live, in the expert store, by one worker
// thread on a thread pool of its own, while the device lane computes and copies. Only the rows
// routed to those experts cross the link (device -> host, and their outputs back).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "pregated/backend.h"
#include "pregated/status.h"
#include "pregated/types.h"

namespace pregated {

namespace cpu {
class thread_pool;
}

class host_lane {
 public:
  struct item {
    const uint8_t* w = nullptr;  // the expert's block in the expert store
    const void* x = nullptr;     // [rows, H] host memory
    void* y = nullptr;           // [rows, H] host memory
    int64_t rows = 0;
  };
  // The caller keeps a job alive until wait() returned for it.
  struct job {
    std::vector<item> items;
    status result;
    double seconds = 0;  // the lane's busy time on this job
    bool done = false;
  };

  // `threads`: the lane's pool (counting its worker); <= 0: one per core.
  host_lane(const expert_spec& sp, int threads);
  ~host_lane();
  host_lane(const host_lane&) = delete;
  host_lane& operator=(const host_lane&) = delete;

  void submit(job* j);
  void wait(job* j);
  int threads() const;

 private:
  void loop();
  void run(job* j);

  const expert_spec sp_;
  std::unique_ptr<backend> be_;
  std::unique_ptr<cpu::thread_pool> pool_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<job*> jobs_;
  bool stop_ = false;
  std::thread thread_;  // last: starts once the rest is built
};

}  // namespace pregated
