// CPU building blocks of the ops, shared by the single ops and the fused step.
#pragma once

#include <cstdint>
#include <vector>

#include "../checks.h"
#include "../philox.h"

namespace edropout::cpu {

// trials[K, D] <- one generation of binary differential evolution of population[K, D].
void evolve_into(const uint8_t* population, int64_t K, int64_t D, const EvolveKey& key, uint64_t mutation_threshold,
                 uint64_t crossover_threshold, const bool* keep, uint8_t* trials);

// out[K] <- Ising energy of states[K, D] with dense square coupling blocks.
void ising_energy_into(const uint8_t* states, int64_t K, int64_t D, const float* field, const float* couplings,
                       const std::vector<Block>& blocks, float* out);

// Greedy one-to-one selection; returns the best index (-1 when every energy is NaN).
int64_t select_into(const uint8_t* population, const float* energies, const uint8_t* trials,
                    const float* trial_energies, int64_t K, int64_t D, uint8_t* new_population, float* new_energies);

}  // namespace edropout::cpu
