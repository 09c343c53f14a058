// Which lane computes each expert of a MoE block that is not in a slot: the device (after a
// copy over the link) or the host (the host lane reads the expert where it lives, in the expert
// store, and only the block's activations cross the link). A plain function of a cost model,
// so tests can force every decision.
#pragma once

#include <cstdint>
#include <vector>

namespace pregated {

// What the machine measures (runtime::lane_costs) or the caller fixes.
struct lane_costs {
  double link_bytes_per_s = 0;  // host -> device copies of expert bytes
  double host_bytes_per_s = 0;  // host lane: expert bytes streamed per second at one row
  double host_row_s = 0;        // host lane: seconds each further row adds
  // Seconds a copy of `bytes` takes on the link; a host computation of an expert of `bytes`
  // for `rows` rows.
  double copy_seconds(int64_t bytes) const;
  double host_seconds(int64_t bytes, int64_t rows) const;
  bool known() const { return link_bytes_per_s > 0 && host_bytes_per_s > 0; }
};

enum class lane_plan {
  lane_plan_auto = 0,       // minimise the block's finishing time under the cost model
  lane_plan_host = 1,       // every expert not in a slot runs on the host (tests)
  lane_plan_copy = 2,       // every expert not in a slot is copied (tests)
  lane_plan_alternate = 3,  // missing experts alternate copy, host, copy, ... (tests: a mixed plan)
};

enum class lane { lane_copy = 0, lane_host = 1 };

// For the experts of a block that must come over the link or run on the host (rows[i] tokens
// routed to the i-th), given `backlog_s` seconds of copies already on the link: the lane of
// each. `auto` assigns the experts with the most rows first, each to the lane whose finishing
// time grows least (copies are serial on the link; host computations serial on the host
// lane), a tie going to the copy (the expert then stays cached for later blocks).
std::vector<lane> plan_lanes(const lane_costs& costs, lane_plan plan, int64_t expert_bytes,
                             double backlog_s, const std::vector<int64_t>& rows);

}  // namespace pregated
