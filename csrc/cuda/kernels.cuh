// CUDA building blocks of the ops, shared by the single ops and the fused step.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <vector>

#include "../checks.h"
#include "../philox.h"

namespace edropout::cuda {

// Candidates are handled in groups of 64: bits[g][d] holds bit k' = state of member 64 g + k' at unit d,
// so the energy kernel reads one word per coupling column instead of K bytes.
constexpr int64_t kGroup = 64;

inline int64_t num_groups(int64_t K) { return (K + kGroup - 1) / kGroup; }

// trials[K, D] <- one generation of evolution under `rule`; also writes the trials' bits[G][D] when
// bits != nullptr.
void launch_evolve(const uint8_t* population, int64_t K, int64_t D, const EvolveKey& key, EvolveRule rule,
                   uint64_t mutation_threshold, uint64_t crossover_threshold, const bool* keep, uint8_t* trials,
                   uint64_t* bits, cudaStream_t stream);

// bits[G][D] <- the states packed by member.
void launch_pack_bits(const uint8_t* states, int64_t K, int64_t D, uint64_t* bits, cudaStream_t stream);

// The Ising energy of the packed states, as per-CTA float64 partial sums: returns partial[G][ctas][64]
// (a tensor on the states' device) to be reduced in order by the caller's kernel.
at::Tensor launch_ising_partials(const uint64_t* bits, int64_t K, int64_t D, const float* field,
                                 const float* couplings, const std::vector<Block>& blocks,
                                 const at::TensorOptions& device, cudaStream_t stream);

// energies[k] <- sum over CTAs of partial[g][cta][k'] in CTA order.
void launch_reduce_partials(const at::Tensor& partial, int64_t K, float* energies, cudaStream_t stream);

// Selection: new_energies, wins[K] and best (int64) from the parents' and trials' energies; the trials'
// energies come from `trial_energies` or, when null, from `partial` (the fused step).
void launch_select_scalars(const float* energies, const float* trial_energies, const at::Tensor& partial, int64_t K,
                           float* new_energies, uint8_t* wins, int64_t* best, cudaStream_t stream);

// new_population[k] <- wins[k] ? trials[k] : population[k].
void launch_merge(const uint8_t* population, const uint8_t* trials, const uint8_t* wins, int64_t K, int64_t D,
                  uint8_t* new_population, cudaStream_t stream);

}  // namespace edropout::cuda
