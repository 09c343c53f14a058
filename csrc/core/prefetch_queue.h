// The prefetch queue: copies waiting for the copy engine. Demand loads (a forward is waiting)
// are served before prefetches; within each class, first come first served. Entries name a
// slot and the generation it had when queued, so an entry whose slot was since evicted or
// cancelled is recognised as stale and skipped instead of being searched for and removed.
#pragma once

#include <cstdint>
#include <deque>

namespace pregated {

struct copy_request {
  int32_t slot = -1;
  uint64_t generation = 0;
};

class prefetch_queue {
 public:
  void push(copy_request r, bool demand) { (demand ? demand_ : prefetch_).push_back(r); }
  bool pop(copy_request* out) {
    std::deque<copy_request>& q = demand_.empty() ? prefetch_ : demand_;
    if (q.empty()) return false;
    *out = q.front();
    q.pop_front();
    return true;
  }
  bool empty() const { return demand_.empty() && prefetch_.empty(); }
  void clear() {
    demand_.clear();
    prefetch_.clear();
  }

 private:
  std::deque<copy_request> demand_;
  std::deque<copy_request> prefetch_;
};

}  // namespace pregated
