// Counter-based random numbers for `evolve`, shared by the CPU and CUDA kernels so that both draw
// exactly the same bits. Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC'11), the generator cuRAND and PyTorch use; edropout/reference.py implements the same function.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define EDROPOUT_HD __host__ __device__ __forceinline__
#else
#define EDROPOUT_HD inline
#endif

namespace edropout {

struct Philox4 {
  uint32_t w[4];
};

EDROPOUT_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                  uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c0 = n0;
    c1 = static_cast<uint32_t>(p1);
    c2 = n2;
    c3 = static_cast<uint32_t>(p0);
  }
  return {{c0, c1, c2, c3}};
}

// The draws of one `evolve` call are keyed by (seed, step):
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (j, k, step & 0xffffffff, step >> 32)
// where k is the member and j = d / 2 for the draws of units d (words 2*(d%2) and 2*(d%2)+1 of the
// block: mutation, crossover) or j = kMemberCounter for the member's donors and forced index. Both rules
// draw the same words; the edropout rule leaves the forced index unused.
constexpr uint32_t kMemberCounter = 0xFFFFFFFFu;

struct EvolveKey {
  uint32_t seed_lo, seed_hi, step_lo, step_hi;
};

inline EvolveKey make_evolve_key(int64_t seed, int64_t step) {
  const uint64_t s = static_cast<uint64_t>(seed), t = static_cast<uint64_t>(step);
  return {static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32), static_cast<uint32_t>(t),
          static_cast<uint32_t>(t >> 32)};
}

EDROPOUT_HD Philox4 evolve_draw(const EvolveKey& key, uint32_t j, uint32_t k) {
  return philox4x32_10(j, k, key.step_lo, key.step_hi, key.seed_lo, key.seed_hi);
}

// floor(w * n / 2^32): an integer in [0, n) from a 32-bit word (bias below n / 2^32).
EDROPOUT_HD uint32_t draw_below(uint32_t w, uint32_t n) {
  return static_cast<uint32_t>((static_cast<uint64_t>(w) * n) >> 32);
}

// A probability p becomes the threshold floor(p * 2^32): a word w is a success when w < threshold.
inline uint64_t probability_threshold(double p) {
  return static_cast<uint64_t>(p * 4294967296.0);
}

struct Donors {
  int32_t r1, r2, r3;
  int32_t forced;  // the unit that always takes the mutant's bit
};

// Three distinct members, all different from k, and the forced unit, for member k of K >= 4.
EDROPOUT_HD Donors draw_donors(const EvolveKey& key, int32_t k, int32_t K, int32_t D) {
  const Philox4 r = evolve_draw(key, kMemberCounter, static_cast<uint32_t>(k));
  // Each draw is uniform over the members not yet excluded: skip the exclusions in ascending order.
  int32_t r1 = static_cast<int32_t>(draw_below(r.w[0], K - 1));
  if (r1 >= k) ++r1;
  int32_t lo = k < r1 ? k : r1, hi = k < r1 ? r1 : k;
  int32_t r2 = static_cast<int32_t>(draw_below(r.w[1], K - 2));
  if (r2 >= lo) ++r2;
  if (r2 >= hi) ++r2;
  int32_t a = lo, b = hi, c = r2;  // sort {k, r1, r2}
  if (c < b) { int32_t t = b; b = c; c = t; }
  if (b < a) { int32_t t = a; a = b; b = t; }
  int32_t r3 = static_cast<int32_t>(draw_below(r.w[2], K - 3));
  if (r3 >= a) ++r3;
  if (r3 >= b) ++r3;
  if (r3 >= c) ++r3;
  const int32_t forced = static_cast<int32_t>(draw_below(r.w[3], static_cast<uint32_t>(D)));
  return {r1, r2, r3, forced};
}

// The mutation rule of `evolve` (the op's `rule` argument).
enum class EvolveRule : int32_t {
  kClassic,   // binary differential evolution
  kEDropout,  // the rule of the EDropout paper's reference code
};

// The trial bit of one unit. m = w_mutation < mutation_threshold.
//   classic:  mutant v = x_r1, flipped where m and x_r2 != x_r3; trial = v with probability `crossover`
//             (always at the member's forced unit), else x_k.
//   edropout: v = x_r1 where not m; where m, v = 1 - x_r1 if x_r2 == x_r3 and 0 if they differ;
//             trial = v with probability `crossover`, else x_k; no unit is forced (`forced` is ignored).
EDROPOUT_HD uint8_t trial_bit(EvolveRule rule, uint8_t x_k, uint8_t x_r1, uint8_t x_r2, uint8_t x_r3,
                              uint32_t w_mutation, uint32_t w_crossover, bool forced, uint64_t mutation_threshold,
                              uint64_t crossover_threshold) {
  const bool mutate = w_mutation < mutation_threshold;
  const bool take = w_crossover < crossover_threshold;
  if (rule == EvolveRule::kEDropout) {
    const uint8_t mutant = !mutate ? x_r1 : (x_r2 == x_r3 ? static_cast<uint8_t>(1 - x_r1) : uint8_t{0});
    return take ? mutant : x_k;
  }
  const uint8_t flip = mutate && x_r2 != x_r3;
  const uint8_t mutant = x_r1 ^ flip;
  return (forced || take) ? mutant : x_k;
}

}  // namespace edropout
