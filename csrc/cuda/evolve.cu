#include <torch/library.h>

#include "kernels.cuh"

namespace edropout::cuda {
namespace {

constexpr int kThreads = 256;

// One thread per pair of units (one Philox block per member gives both units' words), looping over the
// members, so that it can also assemble each unit's 64-member bit word for the energy kernel.
__global__ void evolve_kernel(const uint8_t* __restrict__ population, int32_t K, int32_t D, EvolveKey key,
                              EvolveRule rule, uint64_t mutation_threshold, uint64_t crossover_threshold,
                              const bool* __restrict__ keep, uint8_t* __restrict__ trials,
                              uint64_t* __restrict__ bits) {
  extern __shared__ Donors donors[];
  for (int32_t k = threadIdx.x; k < K; k += blockDim.x) donors[k] = draw_donors(key, k, K, D);
  __syncthreads();

  const int64_t pair = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t d0 = 2 * pair;
  if (d0 >= D) return;
  const bool has_second = d0 + 1 < D;
  const bool keep0 = keep != nullptr && keep[d0];
  const bool keep1 = keep != nullptr && has_second && keep[d0 + 1];
  uint64_t word0 = 0, word1 = 0;
  for (int32_t k = 0; k < K; ++k) {
    const Donors dn = donors[k];
    const Philox4 r = evolve_draw(key, static_cast<uint32_t>(pair), static_cast<uint32_t>(k));
    const uint8_t* x = population + static_cast<int64_t>(k) * D;
    const uint8_t* x1 = population + static_cast<int64_t>(dn.r1) * D;
    const uint8_t* x2 = population + static_cast<int64_t>(dn.r2) * D;
    const uint8_t* x3 = population + static_cast<int64_t>(dn.r3) * D;
    uint8_t* out = trials + static_cast<int64_t>(k) * D;
    const uint8_t t0 = keep0 ? uint8_t{1}
                             : trial_bit(rule, x[d0], x1[d0], x2[d0], x3[d0], r.w[0], r.w[1], d0 == dn.forced,
                                         mutation_threshold, crossover_threshold);
    out[d0] = t0;
    word0 |= static_cast<uint64_t>(t0) << (k % kGroup);
    if (has_second) {
      const int64_t d1 = d0 + 1;
      const uint8_t t1 = keep1 ? uint8_t{1}
                               : trial_bit(rule, x[d1], x1[d1], x2[d1], x3[d1], r.w[2], r.w[3], d1 == dn.forced,
                                           mutation_threshold, crossover_threshold);
      out[d1] = t1;
      word1 |= static_cast<uint64_t>(t1) << (k % kGroup);
    }
    if (bits != nullptr && (k % kGroup == kGroup - 1 || k == K - 1)) {
      uint64_t* group_bits = bits + static_cast<int64_t>(k / kGroup) * D;
      group_bits[d0] = word0;
      if (has_second) group_bits[d0 + 1] = word1;
      word0 = word1 = 0;
    }
  }
}

at::Tensor evolve_cuda(const at::Tensor& population, int64_t seed, int64_t step, double mutation, double crossover,
                       const c10::optional<at::Tensor>& keep, c10::string_view rule) {
  constexpr const char* op = "edropout.evolve";
  check_evolve_inputs(op, population, mutation, crossover, keep);
  const EvolveRule evolve_rule = check_rule(op, rule);
  const c10::cuda::CUDAGuard guard(population.device());
  const at::Tensor pop = population.contiguous();
  const at::Tensor keep_mask = keep.has_value() ? keep->contiguous() : at::Tensor();
  at::Tensor trials = at::empty_like(pop);
  launch_evolve(pop.data_ptr<uint8_t>(), pop.size(0), pop.size(1), make_evolve_key(seed, step), evolve_rule,
                probability_threshold(mutation), probability_threshold(crossover),
                keep_mask.defined() ? keep_mask.data_ptr<bool>() : nullptr, trials.data_ptr<uint8_t>(), nullptr,
                c10::cuda::getCurrentCUDAStream());
  return trials;
}

}  // namespace

void launch_evolve(const uint8_t* population, int64_t K, int64_t D, const EvolveKey& key, EvolveRule rule,
                   uint64_t mutation_threshold, uint64_t crossover_threshold, const bool* keep, uint8_t* trials,
                   uint64_t* bits, cudaStream_t stream) {
  const int64_t pairs = (D + 1) / 2;
  const unsigned blocks = static_cast<unsigned>((pairs + kThreads - 1) / kThreads);
  const size_t shared = static_cast<size_t>(K) * sizeof(Donors);
  evolve_kernel<<<blocks, kThreads, shared, stream>>>(population, static_cast<int32_t>(K), static_cast<int32_t>(D),
                                                      key, rule, mutation_threshold, crossover_threshold, keep, trials,
                                                      bits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(edropout, CUDA, m) { m.impl("evolve", &evolve_cuda); }

}  // namespace edropout::cuda
