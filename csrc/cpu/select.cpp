#include <torch/library.h>

#include <cstring>
#include <tuple>

#include "../select_rule.h"
#include "kernels.h"

namespace edropout::cpu {

int64_t select_into(const uint8_t* population, const float* energies, const uint8_t* trials,
                    const float* trial_energies, int64_t K, int64_t D, uint8_t* new_population, float* new_energies) {
  for (int64_t k = 0; k < K; ++k) {
    const bool wins = trial_wins(energies[k], trial_energies[k]);
    new_energies[k] = wins ? trial_energies[k] : energies[k];
    std::memcpy(new_population + k * D, (wins ? trials : population) + k * D, D);
  }
  return best_index(new_energies, K);
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_cpu(const at::Tensor& population, const at::Tensor& energies,
                                                          const at::Tensor& trials,
                                                          const at::Tensor& trial_energies) {
  constexpr const char* op = "edropout.select";
  check_select_inputs(op, population, energies, trials, trial_energies);
  const at::Tensor pop = population.contiguous(), tri = trials.contiguous();
  const at::Tensor e = energies.contiguous(), te = trial_energies.contiguous();
  at::Tensor new_population = at::empty_like(pop);
  at::Tensor new_energies = at::empty_like(e);
  const int64_t best = select_into(pop.data_ptr<uint8_t>(), e.data_ptr<float>(), tri.data_ptr<uint8_t>(),
                                   te.data_ptr<float>(), pop.size(0), pop.size(1),
                                   new_population.data_ptr<uint8_t>(), new_energies.data_ptr<float>());
  return {new_population, new_energies, at::scalar_tensor(best, at::kLong)};
}

}  // namespace

TORCH_LIBRARY_IMPL(edropout, CPU, m) { m.impl("select", &select_cpu); }

}  // namespace edropout::cpu
