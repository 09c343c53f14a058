#include "softmax_topk.h"

#include <cmath>
#include <vector>

namespace pregated::cpu {

void softmax_topk(int64_t rows, int64_t experts, const float* logits, int64_t k, bool normalize, float* weights,
                  int64_t* ids) {
  std::vector<float> probs(static_cast<size_t>(experts));
  for (int64_t r = 0; r < rows; ++r) {
    const float* l = logits + r * experts;
    float top = l[0];
    for (int64_t e = 1; e < experts; ++e) top = std::fmax(top, l[e]);
    float sum = 0;
    for (int64_t e = 0; e < experts; ++e) {
      probs[e] = std::exp(l[e] - top);
      sum += probs[e];
    }
    for (int64_t e = 0; e < experts; ++e) probs[e] /= sum;
    float* w = weights + r * k;
    int64_t* id = ids + r * k;
    float chosen = 0;
    for (int64_t j = 0; j < k; ++j) {  // k is small (<= 8 in the families we run): selection
      int64_t best = -1;
      for (int64_t e = 0; e < experts; ++e) {
        if (probs[e] >= 0 && (best < 0 || probs[e] > probs[best])) best = e;
      }
      id[j] = best;
      w[j] = probs[best];
      chosen += probs[best];
      probs[best] = -1;  // taken
    }
    if (normalize) {
      for (int64_t j = 0; j < k; ++j) w[j] /= chosen;
    }
  }
}

}  // namespace pregated::cpu
