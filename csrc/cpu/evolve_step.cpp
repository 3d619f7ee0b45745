#include <torch/library.h>

#include <tuple>

#include "kernels.h"

namespace edropout::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> evolve_step_cpu(
    const at::Tensor& population, const at::Tensor& energies, const at::Tensor& field, const at::Tensor& couplings,
    at::IntArrayRef block_sizes, at::IntArrayRef block_ranks, int64_t seed, int64_t step, double mutation, double crossover,
    const c10::optional<at::Tensor>& keep, c10::string_view rule) {
  constexpr const char* op = "edropout.evolve_step";
  const std::vector<Block> blocks = check_evolve_step_inputs(op, population, energies, field, couplings, block_sizes,
                                                             block_ranks, mutation, crossover, keep);
  const EvolveRule evolve_rule = check_rule(op, rule);

  const at::Tensor pop = population.contiguous(), e = energies.contiguous();
  const at::Tensor h = field.contiguous(), J = couplings.contiguous();
  const at::Tensor keep_mask = keep.has_value() ? keep->contiguous() : at::Tensor();
  const int64_t K = pop.size(0), D = pop.size(1);

  at::Tensor trials = at::empty_like(pop);
  evolve_into(pop.data_ptr<uint8_t>(), K, D, make_evolve_key(seed, step), evolve_rule,
              probability_threshold(mutation), probability_threshold(crossover),
              keep_mask.defined() ? keep_mask.data_ptr<bool>() : nullptr, trials.data_ptr<uint8_t>());
  at::Tensor trial_energies = at::empty_like(e);
  ising_energy_into(trials.data_ptr<uint8_t>(), K, D, h.data_ptr<float>(), J.data_ptr<float>(), blocks,
                    trial_energies.data_ptr<float>());
  at::Tensor new_population = at::empty_like(pop);
  at::Tensor new_energies = at::empty_like(e);
  const int64_t best = select_into(pop.data_ptr<uint8_t>(), e.data_ptr<float>(), trials.data_ptr<uint8_t>(),
                                   trial_energies.data_ptr<float>(), K, D, new_population.data_ptr<uint8_t>(),
                                   new_energies.data_ptr<float>());
  return {new_population, new_energies, at::scalar_tensor(best, at::kLong)};
}

}  // namespace

TORCH_LIBRARY_IMPL(edropout, CPU, m) { m.impl("evolve_step", &evolve_step_cpu); }

}  // namespace edropout::cpu
