#include "pregated/moe_plan.h"

#include <string>

namespace pregated {

status make_moe_plan(const int32_t* ids, int64_t tokens, int64_t top_k, int32_t num_experts,
                     moe_plan* plan) {
  const int64_t rows = tokens * top_k;
  // Counting sort by expert: rows of one expert end up adjacent, in token order.
  std::vector<int64_t> count(static_cast<size_t>(num_experts) + 1, 0);
  for (int64_t i = 0; i < rows; ++i) {
    const int32_t e = ids[i];
    if (e < 0 || e >= num_experts) {
      return invalid_argument("expert id " + std::to_string(e) + " at token " +
                              std::to_string(i / top_k) + ", k " + std::to_string(i % top_k) +
                              " is out of range: the layer has " + std::to_string(num_experts) +
                              " experts (ids 0.." + std::to_string(num_experts - 1) + ")");
    }
    ++count[static_cast<size_t>(e) + 1];
  }
  plan->experts.clear();
  plan->offsets.clear();
  for (int32_t e = 0; e < num_experts; ++e) {
    if (count[static_cast<size_t>(e) + 1] > 0) {
      plan->experts.push_back(e);
      plan->offsets.push_back(count[static_cast<size_t>(e)]);
    }
    count[static_cast<size_t>(e) + 1] += count[static_cast<size_t>(e)];
  }
  plan->offsets.push_back(rows);
  plan->row_token.assign(static_cast<size_t>(rows), 0);
  plan->row_of.assign(static_cast<size_t>(rows), 0);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t r = count[static_cast<size_t>(ids[i])]++;
    plan->row_token[static_cast<size_t>(r)] = static_cast<int32_t>(i / top_k);
    plan->row_of[static_cast<size_t>(i)] = static_cast<int32_t>(r);
  }
  return status::ok();
}

}  // namespace pregated
