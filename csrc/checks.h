// Argument checks shared by the CPU and CUDA implementations. Every failure is one line that names
// the op, the argument and what was expected, raised as a Python ValueError.
#pragma once

#include <c10/util/string_view.h>
#include <torch/types.h>

#include <cstdint>
#include <vector>

#include "philox.h"

namespace edropout {

// Largest D: unit indices and the Philox counter use 32-bit words.
constexpr int64_t kMaxUnits = (int64_t{1} << 31) - 1;
// Largest population `evolve` takes (the CUDA kernel keeps every member's donors in shared memory).
constexpr int64_t kMaxMembers = 2048;

inline void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " must be on ", like.device(),
                    " like the states, got ", t.device());
}

// `states` must be uint8 [K, D] holding only 0 and 1.
inline void check_states(const char* op, const char* name, const at::Tensor& s, int64_t min_members) {
  TORCH_CHECK_VALUE(s.scalar_type() == at::kByte, op, ": ", name, " must be a uint8 tensor of 0/1, got ",
                    s.scalar_type());
  TORCH_CHECK_VALUE(s.dim() == 2, op, ": ", name, " must have shape [K, D], got ", s.dim(), " dimensions");
  TORCH_CHECK_VALUE(s.size(0) >= min_members, op, ": ", name, " must have at least ", min_members,
                    " members (rows), got K = ", s.size(0));
  TORCH_CHECK_VALUE(s.size(1) >= 1 && s.size(1) <= kMaxUnits, op, ": ", name,
                    " must have between 1 and 2^31 - 1 units (columns), got D = ", s.size(1));
  TORCH_CHECK_VALUE(!s.gt(1).any().item<bool>(), op, ": ", name, " must hold only 0 and 1");
}

inline void check_vector(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                         int64_t size, const char* size_name) {
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == size, op, ": ", name, " must have shape [", size_name,
                    "] = [", size, "], got ", t.sizes());
}

inline void check_probability(const char* op, const char* name, double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, op, ": ", name, " must be a probability in [0, 1], got ", p);
}

// One coupling block per layer, in unit order: block l covers units [start_l, start_l + n_l), and its
// couplings start at `offset_l` of the packed buffer, row-major: a dense block (rank 0) is J, n_l x n_l;
// a factored block of rank r_l is W, n_l x r_l, standing for J = -W W^T.
struct Block {
  int64_t start, size, offset, rank;
  bool dense() const { return rank == 0; }
  int64_t numel() const { return size * (dense() ? size : rank); }
};

inline std::vector<Block> check_blocks(const char* op, at::IntArrayRef block_sizes, at::IntArrayRef block_ranks,
                                       const at::Tensor& couplings, const at::Tensor& states) {
  const int64_t D = states.size(1);
  TORCH_CHECK_VALUE(couplings.scalar_type() == at::kFloat, op, ": couplings must be float32, got ",
                    couplings.scalar_type());
  TORCH_CHECK_VALUE(couplings.dim() == 1, op, ": couplings must be the packed 1-D buffer of all blocks, got ",
                    couplings.dim(), " dimensions");
  check_device(op, "couplings", couplings, states);
  TORCH_CHECK_VALUE(block_ranks.size() == block_sizes.size(), op, ": block_ranks must have one entry per block (",
                    block_sizes.size(), "), got ", block_ranks.size());
  std::vector<Block> blocks;
  blocks.reserve(block_sizes.size());
  int64_t start = 0, offset = 0;
  for (size_t l = 0; l < block_sizes.size(); ++l) {
    const int64_t n = block_sizes[l], r = block_ranks[l];
    TORCH_CHECK_VALUE(n >= 1 && n <= D - start, op, ": block_sizes[", l, "] = ", n,
                      " must be at least 1 and fit the ", D, " units (blocks so far cover ", start, ")");
    TORCH_CHECK_VALUE(r >= 0 && r <= kMaxUnits, op, ": block_ranks[", l, "] = ", r,
                      " must be 0 (dense block) or a factor's number of columns");
    blocks.push_back({start, n, offset, r});
    start += n;
    offset += blocks.back().numel();
  }
  TORCH_CHECK_VALUE(start == D, op, ": block_sizes must sum to D = ", D, ", got ", start);
  TORCH_CHECK_VALUE(couplings.numel() == offset, op, ": couplings must hold ", offset,
                    " values for these blocks (n^2 per dense block, n * rank per factored block), got ",
                    couplings.numel());
  return blocks;
}

// The field and couplings of already checked states; returns the blocks.
inline std::vector<Block> check_energy_terms(const char* op, const at::Tensor& states, const at::Tensor& field,
                                             const at::Tensor& couplings, at::IntArrayRef block_sizes,
                                             at::IntArrayRef block_ranks) {
  check_vector(op, "field", field, at::kFloat, states.size(1), "D");
  check_device(op, "field", field, states);
  return check_blocks(op, block_sizes, block_ranks, couplings, states);
}

// The `rule` argument of evolve and evolve_step.
inline EvolveRule check_rule(const char* op, c10::string_view rule) {
  const bool classic = rule == "classic";
  TORCH_CHECK_VALUE(classic || rule == "edropout", op, ": rule must be 'classic' or 'edropout', got '", rule, "'");
  return classic ? EvolveRule::kClassic : EvolveRule::kEDropout;
}

inline void check_evolve_inputs(const char* op, const at::Tensor& population, double mutation, double crossover,
                                const c10::optional<at::Tensor>& keep) {
  check_states(op, "population", population, 4);
  TORCH_CHECK_VALUE(population.size(0) <= kMaxMembers, op, ": population must have at most ", kMaxMembers,
                    " members (rows), got K = ", population.size(0));
  check_probability(op, "mutation", mutation);
  check_probability(op, "crossover", crossover);
  if (keep.has_value()) {
    check_vector(op, "keep", *keep, at::kBool, population.size(1), "D");
    check_device(op, "keep", *keep, population);
  }
}

inline void check_select_inputs(const char* op, const at::Tensor& population, const at::Tensor& energies,
                                const at::Tensor& trials, const at::Tensor& trial_energies) {
  check_states(op, "population", population, 1);
  const int64_t K = population.size(0);
  check_states(op, "trials", trials, 1);
  TORCH_CHECK_VALUE(trials.sizes() == population.sizes(), op, ": trials must have the population's shape ",
                    population.sizes(), ", got ", trials.sizes());
  check_vector(op, "energies", energies, at::kFloat, K, "K");
  check_vector(op, "trial_energies", trial_energies, at::kFloat, K, "K");
  check_device(op, "trials", trials, population);
  check_device(op, "energies", energies, population);
  check_device(op, "trial_energies", trial_energies, population);
}

// Every check of ising_energy's arguments; returns the blocks.
inline std::vector<Block> check_ising_energy_inputs(const char* op, const at::Tensor& states, const at::Tensor& field,
                                                    const at::Tensor& couplings, at::IntArrayRef block_sizes,
                                                    at::IntArrayRef block_ranks) {
  check_states(op, "states", states, 1);
  return check_energy_terms(op, states, field, couplings, block_sizes, block_ranks);
}

// Every check of evolve_step's arguments; returns the blocks.
inline std::vector<Block> check_evolve_step_inputs(const char* op, const at::Tensor& population,
                                                   const at::Tensor& energies, const at::Tensor& field,
                                                   const at::Tensor& couplings, at::IntArrayRef block_sizes,
                                                   at::IntArrayRef block_ranks, double mutation, double crossover,
                                                   const c10::optional<at::Tensor>& keep) {
  check_evolve_inputs(op, population, mutation, crossover, keep);
  check_vector(op, "energies", energies, at::kFloat, population.size(0), "K");
  check_device(op, "energies", energies, population);
  return check_energy_terms(op, population, field, couplings, block_sizes, block_ranks);
}

}  // namespace edropout
