#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"

namespace edropout::cpu {

void evolve_into(const uint8_t* population, int64_t K, int64_t D, const EvolveKey& key, uint64_t mutation_threshold,
                 uint64_t crossover_threshold, const bool* keep, uint8_t* trials) {
  std::vector<Donors> donors(K);
  for (int64_t k = 0; k < K; ++k) donors[k] = draw_donors(key, k, K, D);
  // One Philox block draws the (mutation, crossover) words of two units.
  const int64_t pairs = (D + 1) / 2;
  constexpr int64_t kPairsPerTask = 4096;
  const int64_t tasks_per_member = (pairs + kPairsPerTask - 1) / kPairsPerTask;
  at::parallel_for(0, K * tasks_per_member, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / tasks_per_member;
      const int64_t first = (task % tasks_per_member) * kPairsPerTask;
      const int64_t last = std::min(pairs, first + kPairsPerTask);
      const Donors dn = donors[k];
      const uint8_t* x = population + k * D;
      const uint8_t* x1 = population + dn.r1 * D;
      const uint8_t* x2 = population + dn.r2 * D;
      const uint8_t* x3 = population + dn.r3 * D;
      uint8_t* out = trials + k * D;
      for (int64_t p = first; p < last; ++p) {
        const Philox4 r = evolve_draw(key, static_cast<uint32_t>(p), static_cast<uint32_t>(k));
        for (int64_t half = 0; half < 2; ++half) {
          const int64_t d = 2 * p + half;
          if (d >= D) break;
          out[d] = (keep && keep[d]) ? uint8_t{1}
                                     : trial_bit(x[d], x1[d], x2[d], x3[d], r.w[2 * half], r.w[2 * half + 1],
                                                 d == dn.forced, mutation_threshold, crossover_threshold);
        }
      }
    }
  });
}

namespace {

at::Tensor evolve_cpu(const at::Tensor& population, int64_t seed, int64_t step, double mutation, double crossover,
                      const c10::optional<at::Tensor>& keep) {
  constexpr const char* op = "edropout.evolve";
  check_states(op, "population", population, 4);
  check_evolve_inputs(op, population, mutation, crossover, keep);
  const at::Tensor pop = population.contiguous();
  const at::Tensor keep_mask = keep.has_value() ? keep->contiguous() : at::Tensor();
  at::Tensor trials = at::empty_like(pop);
  evolve_into(pop.data_ptr<uint8_t>(), pop.size(0), pop.size(1), make_evolve_key(seed, step),
              probability_threshold(mutation), probability_threshold(crossover),
              keep_mask.defined() ? keep_mask.data_ptr<bool>() : nullptr, trials.data_ptr<uint8_t>());
  return trials;
}

}  // namespace

TORCH_LIBRARY_IMPL(edropout, CPU, m) { m.impl("evolve", &evolve_cpu); }

}  // namespace edropout::cpu
