// Host-side plan of one MoE block: which packed rows go to which expert.
// T = tokens, K = experts per token, R = T * K packed rows (rows of one expert are adjacent).
#pragma once

#include <cstdint>
#include <vector>

#include "pregated/status.h"

namespace pregated {

struct moe_plan {
  std::vector<int32_t> experts;    // distinct experts used, ascending
  std::vector<int64_t> offsets;    // [experts.size() + 1]: rows of experts[i] are offsets[i]..[i+1]
  std::vector<int32_t> row_token;  // [R] token each packed row reads
  std::vector<int32_t> row_of;     // [T * K] packed row holding (t, k)
};

// Fails, naming the (token, k) entry, when an id is outside [0, num_experts).
status make_moe_plan(const int32_t* ids, int64_t tokens, int64_t top_k, int32_t num_experts,
                     moe_plan* plan);

}  // namespace pregated
