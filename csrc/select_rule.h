// The selection rule, shared by the CPU and CUDA kernels and mirrored by edropout/reference.py.
#pragma once

#include "philox.h"  // EDROPOUT_HD

namespace edropout {

// A trial replaces its parent only with a strictly lower energy; a NaN trial never wins and a NaN
// parent loses to any trial with a number. A tie keeps the parent.
EDROPOUT_HD bool trial_wins(float parent, float trial) {
  return trial < parent || (parent != parent && trial == trial);
}

// Index of the lowest energy, the first on ties, skipping NaN; -1 when every energy is NaN.
EDROPOUT_HD int64_t best_index(const float* energies, int64_t K) {
  int64_t best = -1;
  for (int64_t k = 0; k < K; ++k) {
    const float e = energies[k];
    if (e == e && (best < 0 || e < energies[best])) best = k;
  }
  return best;
}

}  // namespace edropout
