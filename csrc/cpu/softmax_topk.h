// A router's choice from its logits, as transformers' softmax-top-k routers make it: softmax over
// the experts in float32, the k largest probabilities in descending order (the lower expert id
// first among equals), optionally divided by their sum.
#pragma once

#include <cstdint>

namespace pregated::cpu {

// logits [rows, experts] -> weights [rows, k], ids [rows, k]; k <= experts.
void softmax_topk(int64_t rows, int64_t experts, const float* logits, int64_t k, bool normalize, float* weights,
                  int64_t* ids);

}  // namespace pregated::cpu
