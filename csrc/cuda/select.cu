#include <torch/library.h>

#include <tuple>

#include "../select_rule.h"
#include "kernels.cuh"

namespace edropout::cuda {
namespace {

constexpr int kThreads = 256;

// One CTA: the trials' energies (given, or summed from the energy kernel's partials in CTA order), the
// winners, the new energies, then the best index.
__global__ void select_scalars_kernel(const float* __restrict__ energies, const float* __restrict__ trial_energies,
                                      const double* __restrict__ partial, int64_t ctas, int64_t K,
                                      float* __restrict__ new_energies, uint8_t* __restrict__ wins,
                                      int64_t* __restrict__ best) {
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    float trial;
    if (trial_energies != nullptr) {
      trial = trial_energies[k];
    } else {
      const double* p = partial + (k / kGroup) * ctas * kGroup + k % kGroup;
      double sum = 0.0;
      for (int64_t c = 0; c < ctas; ++c) sum += p[c * kGroup];
      trial = static_cast<float>(sum);
    }
    const bool won = trial_wins(energies[k], trial);
    wins[k] = won;
    new_energies[k] = won ? trial : energies[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) *best = best_index(new_energies, K);
}

__global__ void merge_kernel(const uint8_t* __restrict__ population, const uint8_t* __restrict__ trials,
                             const uint8_t* __restrict__ wins, int64_t K, int64_t D,
                             uint8_t* __restrict__ new_population) {
  const int64_t total = K * D;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x)
    new_population[idx] = wins[idx / D] ? trials[idx] : population[idx];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_cuda(const at::Tensor& population, const at::Tensor& energies,
                                                           const at::Tensor& trials,
                                                           const at::Tensor& trial_energies) {
  constexpr const char* op = "edropout.select";
  check_select_inputs(op, population, energies, trials, trial_energies);
  const c10::cuda::CUDAGuard guard(population.device());
  const at::Tensor pop = population.contiguous(), tri = trials.contiguous();
  const at::Tensor e = energies.contiguous(), te = trial_energies.contiguous();
  const int64_t K = pop.size(0), D = pop.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor new_population = at::empty_like(pop);
  at::Tensor new_energies = at::empty_like(e);
  at::Tensor wins = at::empty({K}, pop.options());
  at::Tensor best = at::empty({}, e.options().dtype(at::kLong));
  launch_select_scalars(e.data_ptr<float>(), te.data_ptr<float>(), at::Tensor(), K, new_energies.data_ptr<float>(),
                        wins.data_ptr<uint8_t>(), best.data_ptr<int64_t>(), stream);
  launch_merge(pop.data_ptr<uint8_t>(), tri.data_ptr<uint8_t>(), wins.data_ptr<uint8_t>(), K, D,
               new_population.data_ptr<uint8_t>(), stream);
  return {new_population, new_energies, best};
}

}  // namespace

void launch_select_scalars(const float* energies, const float* trial_energies, const at::Tensor& partial, int64_t K,
                           float* new_energies, uint8_t* wins, int64_t* best, cudaStream_t stream) {
  const double* p = partial.defined() ? partial.data_ptr<double>() : nullptr;
  const int64_t ctas = partial.defined() ? partial.size(1) : 0;
  select_scalars_kernel<<<1, kThreads, 0, stream>>>(energies, trial_energies, p, ctas, K, new_energies, wins, best);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_merge(const uint8_t* population, const uint8_t* trials, const uint8_t* wins, int64_t K, int64_t D,
                  uint8_t* new_population, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>((K * D + kThreads - 1) / kThreads, 4096);
  merge_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(population, trials, wins, K, D,
                                                                        new_population);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(edropout, CUDA, m) { m.impl("select", &select_cuda); }

}  // namespace edropout::cuda
