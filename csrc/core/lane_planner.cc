// The per-block choice between copying an expert and computing it on the host lane.
#include "pregated/lane_planner.h"

#include <algorithm>
#include <numeric>

namespace pregated {

double lane_costs::copy_seconds(int64_t bytes) const {
  return link_bytes_per_s > 0 ? static_cast<double>(bytes) / link_bytes_per_s : 0.0;
}

double lane_costs::host_seconds(int64_t bytes, int64_t rows) const {
  const double stream = host_bytes_per_s > 0 ? static_cast<double>(bytes) / host_bytes_per_s : 0.0;
  return stream + host_row_s * static_cast<double>(std::max<int64_t>(rows - 1, 0));
}

std::vector<lane> plan_lanes(const lane_costs& costs, lane_plan plan, int64_t expert_bytes,
                             double backlog_s, const std::vector<int64_t>& rows) {
  std::vector<lane> out(rows.size(), lane::lane_copy);
  switch (plan) {
    case lane_plan::lane_plan_copy:
      return out;
    case lane_plan::lane_plan_host:
      std::fill(out.begin(), out.end(), lane::lane_host);
      return out;
    case lane_plan::lane_plan_alternate:
      for (size_t i = 1; i < out.size(); i += 2) out[i] = lane::lane_host;
      return out;
    case lane_plan::lane_plan_auto:
      break;
  }
  if (!costs.known()) return out;  // nothing measured: copying is always correct
  std::vector<size_t> order(rows.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return rows[a] > rows[b]; });
  double link = backlog_s, host = 0;
  const double copy = costs.copy_seconds(expert_bytes);
  for (size_t i : order) {
    const double on_host = costs.host_seconds(expert_bytes, rows[i]);
    if (std::max(link, host + on_host) < std::max(link + copy, host)) {
      out[i] = lane::lane_host;
      host += on_host;
    } else {
      link += copy;
    }
  }
  return out;
}

}  // namespace pregated
