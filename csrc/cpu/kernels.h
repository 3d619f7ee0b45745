// CPU building blocks of the ops, shared by the single ops and the fused step.
#pragma once

#include <cstdint>
#include <vector>

#include "../checks.h"
#include "../philox.h"

// Hot loops are compiled for x86-64-v4 (AVX-512) and v3 (AVX2, FMA) as well as the baseline; the loader
// picks the best one this CPU runs (GCC function multi-versioning), so one build is fast everywhere.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EDROPOUT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define EDROPOUT_CPU_CLONES
#endif

namespace edropout::cpu {

// trials[K, D] <- one generation of evolution of population[K, D] under `rule`.
void evolve_into(const uint8_t* population, int64_t K, int64_t D, const EvolveKey& key, EvolveRule rule,
                 uint64_t mutation_threshold, uint64_t crossover_threshold, const bool* keep, uint8_t* trials);

// out[K] <- Ising energy of states[K, D] with block-diagonal couplings, each block dense (n x n) or factored (n x r).
void ising_energy_into(const uint8_t* states, int64_t K, int64_t D, const float* field, const float* couplings,
                       const std::vector<Block>& blocks, float* out);

// Greedy one-to-one selection; returns the best index (-1 when every energy is NaN).
int64_t select_into(const uint8_t* population, const float* energies, const uint8_t* trials,
                    const float* trial_energies, int64_t K, int64_t D, uint8_t* new_population, float* new_energies);

}  // namespace edropout::cpu
