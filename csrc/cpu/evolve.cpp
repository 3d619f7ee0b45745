#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "kernels.h"

namespace edropout::cpu {
namespace {

// Philox4x32-10 of csrc/philox.h for kLanes consecutive counters j at once, in vector registers.
constexpr int64_t kLanes = 16;
typedef uint32_t U32s __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef uint64_t U64s __attribute__((vector_size(kLanes * sizeof(uint64_t))));

// words[w][lane] = word w of evolve_draw(key, j0 + lane, k).
EDROPOUT_CPU_CLONES
void evolve_draws(const EvolveKey& key, uint32_t j0, uint32_t k, uint32_t words[4][kLanes]) {
  U32s c0, c1 = U32s{} + k, c2 = U32s{} + key.step_lo, c3 = U32s{} + key.step_hi;
  for (int64_t lane = 0; lane < kLanes; ++lane) c0[lane] = j0 + static_cast<uint32_t>(lane);
  uint32_t k0 = key.seed_lo, k1 = key.seed_hi;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const U64s p0 = __builtin_convertvector(c0, U64s) * 0xD2511F53ull;
    const U64s p1 = __builtin_convertvector(c2, U64s) * 0xCD9E8D57ull;
    const U32s n0 = __builtin_convertvector(p1 >> 32, U32s) ^ c1 ^ k0;
    const U32s n2 = __builtin_convertvector(p0 >> 32, U32s) ^ c3 ^ k1;
    c0 = n0;
    c1 = __builtin_convertvector(p1, U32s);
    c2 = n2;
    c3 = __builtin_convertvector(p0, U32s);
  }
  std::memcpy(words[0], &c0, sizeof(c0));
  std::memcpy(words[1], &c1, sizeof(c1));
  std::memcpy(words[2], &c2, sizeof(c2));
  std::memcpy(words[3], &c3, sizeof(c3));
}

// Probability thresholds as 32-bit compares: w < threshold, or always when threshold = 2^32 (p = 1).
struct Thresholds {
  uint32_t mutation, crossover;
  bool mutation_always, crossover_always;
};

// trial_bit of csrc/philox.h for `units` consecutive units (at most 2 kLanes), no unit forced, written so
// that the compiler vectorises it; unit 2 lane + half uses words[2 half][lane] and words[2 half + 1][lane].
// Both rules in one branch-free loop: with m the mutation draw and `differ` = x_r2 != x_r3, the mutant is
// x_r1 ^ flip, cleared where `clear`: classic flips where m & differ; edropout flips where m & !differ and
// clears (0) where m & differ.
EDROPOUT_CPU_CLONES
void trial_bits(EvolveRule rule, const uint8_t* x, const uint8_t* x1, const uint8_t* x2, const uint8_t* x3,
                const bool* keep, const uint32_t words[4][kLanes], int64_t units, const Thresholds& t, uint8_t* out) {
  uint32_t w_mutation[2 * kLanes], w_crossover[2 * kLanes];
  for (int64_t lane = 0; lane < kLanes; ++lane) {
    w_mutation[2 * lane] = words[0][lane];
    w_crossover[2 * lane] = words[1][lane];
    w_mutation[2 * lane + 1] = words[2][lane];
    w_crossover[2 * lane + 1] = words[3][lane];
  }
  const uint8_t edropout_rule = rule == EvolveRule::kEDropout;
  for (int64_t u = 0; u < units; ++u) {
    const uint8_t mutate = (w_mutation[u] < t.mutation) | t.mutation_always;
    const uint8_t differ = x2[u] != x3[u];
    const uint8_t flip = mutate & (differ ^ edropout_rule);
    const uint8_t clear = mutate & differ & edropout_rule;
    const uint8_t take = (w_crossover[u] < t.crossover) | t.crossover_always;
    const uint8_t bit = take ? static_cast<uint8_t>((x1[u] ^ flip) & (clear ^ 1)) : x[u];
    out[u] = (keep != nullptr && keep[u]) ? uint8_t{1} : bit;
  }
}

Thresholds as_thresholds(uint64_t mutation, uint64_t crossover) {
  constexpr uint64_t kAlways = uint64_t{1} << 32;
  return {static_cast<uint32_t>(std::min(mutation, kAlways - 1)), static_cast<uint32_t>(std::min(crossover, kAlways - 1)),
          mutation >= kAlways, crossover >= kAlways};
}

}  // namespace

void evolve_into(const uint8_t* population, int64_t K, int64_t D, const EvolveKey& key, EvolveRule rule,
                 uint64_t mutation_threshold, uint64_t crossover_threshold, const bool* keep, uint8_t* trials) {
  const Thresholds thresholds = as_thresholds(mutation_threshold, crossover_threshold);
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
      uint32_t words[4][kLanes];
      for (int64_t p0 = first; p0 < last; p0 += kLanes) {
        evolve_draws(key, static_cast<uint32_t>(p0), static_cast<uint32_t>(k), words);
        const int64_t d0 = 2 * p0, units = std::min<int64_t>(2 * kLanes, D - d0);
        trial_bits(rule, x + d0, x1 + d0, x2 + d0, x3 + d0, keep ? keep + d0 : nullptr, words, units, thresholds,
                   out + d0);
        // classic: the forced unit always takes the mutant's bit (the edropout rule forces none)
        if (rule == EvolveRule::kClassic && dn.forced >= d0 && dn.forced < d0 + units) {
          const int64_t d = dn.forced, lane = (d - d0) / 2, half = (d - d0) % 2;
          out[d] = (keep && keep[d]) ? uint8_t{1}
                                     : trial_bit(rule, x[d], x1[d], x2[d], x3[d], words[2 * half][lane],
                                                 words[2 * half + 1][lane], true, mutation_threshold,
                                                 crossover_threshold);
        }
      }
    }
  });
}

namespace {

at::Tensor evolve_cpu(const at::Tensor& population, int64_t seed, int64_t step, double mutation, double crossover,
                      const c10::optional<at::Tensor>& keep, c10::string_view rule) {
  constexpr const char* op = "edropout.evolve";
  check_evolve_inputs(op, population, mutation, crossover, keep);
  const EvolveRule evolve_rule = check_rule(op, rule);
  const at::Tensor pop = population.contiguous();
  const at::Tensor keep_mask = keep.has_value() ? keep->contiguous() : at::Tensor();
  at::Tensor trials = at::empty_like(pop);
  evolve_into(pop.data_ptr<uint8_t>(), pop.size(0), pop.size(1), make_evolve_key(seed, step), evolve_rule,
              probability_threshold(mutation), probability_threshold(crossover),
              keep_mask.defined() ? keep_mask.data_ptr<bool>() : nullptr, trials.data_ptr<uint8_t>());
  return trials;
}

}  // namespace

TORCH_LIBRARY_IMPL(edropout, CPU, m) { m.impl("evolve", &evolve_cpu); }

}  // namespace edropout::cpu
