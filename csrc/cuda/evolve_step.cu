#include <torch/library.h>

#include <tuple>

#include "kernels.cuh"

namespace edropout::cuda {
namespace {

// Four launches, no host synchronisation after the checks: evolve (trials and their bit words), the
// energy partials, the selection scalars (which sum the partials), the population merge.
std::tuple<at::Tensor, at::Tensor, at::Tensor> evolve_step_cuda(
    const at::Tensor& population, const at::Tensor& energies, const at::Tensor& field, const at::Tensor& couplings,
    at::IntArrayRef block_sizes, at::IntArrayRef block_ranks, int64_t seed, int64_t step, double mutation, double crossover,
    const c10::optional<at::Tensor>& keep, c10::string_view rule) {
  constexpr const char* op = "edropout.evolve_step";
  const std::vector<Block> blocks = check_evolve_step_inputs(op, population, energies, field, couplings, block_sizes,
                                                             block_ranks, mutation, crossover, keep);
  const EvolveRule evolve_rule = check_rule(op, rule);

  const c10::cuda::CUDAGuard guard(population.device());
  const at::Tensor pop = population.contiguous(), e = energies.contiguous();
  const at::Tensor h = field.contiguous(), J = couplings.contiguous();
  const at::Tensor keep_mask = keep.has_value() ? keep->contiguous() : at::Tensor();
  const int64_t K = pop.size(0), D = pop.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor trials = at::empty_like(pop);
  at::Tensor bits = at::empty({num_groups(K), D}, pop.options().dtype(at::kLong));
  auto* bit_words = reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>());
  launch_evolve(pop.data_ptr<uint8_t>(), K, D, make_evolve_key(seed, step), evolve_rule,
                probability_threshold(mutation), probability_threshold(crossover),
                keep_mask.defined() ? keep_mask.data_ptr<bool>() : nullptr, trials.data_ptr<uint8_t>(), bit_words,
                stream);
  const at::Tensor partial =
      launch_ising_partials(bit_words, K, D, h.data_ptr<float>(), J.data_ptr<float>(), blocks, pop.options(), stream);

  at::Tensor new_population = at::empty_like(pop);
  at::Tensor new_energies = at::empty_like(e);
  at::Tensor wins = at::empty({K}, pop.options());
  at::Tensor best = at::empty({}, e.options().dtype(at::kLong));
  launch_select_scalars(e.data_ptr<float>(), nullptr, partial, K, new_energies.data_ptr<float>(),
                        wins.data_ptr<uint8_t>(), best.data_ptr<int64_t>(), stream);
  launch_merge(pop.data_ptr<uint8_t>(), trials.data_ptr<uint8_t>(), wins.data_ptr<uint8_t>(), K, D,
               new_population.data_ptr<uint8_t>(), stream);
  return {new_population, new_energies, best};
}

}  // namespace

TORCH_LIBRARY_IMPL(edropout, CUDA, m) { m.impl("evolve_step", &evolve_step_cuda); }

}  // namespace edropout::cuda
