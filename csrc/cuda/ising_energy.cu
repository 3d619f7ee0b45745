#include <torch/library.h>

#include <algorithm>

#include "kernels.cuh"

namespace edropout::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Each dense CTA gets a contiguous run of rows holding about kCtaWork couplings; the split depends only
// on the layout, and partial sums are added in CTA order, so results are the same on every run and device.
constexpr int64_t kCtaWork = int64_t{1} << 16;
constexpr int64_t kMaxCtas = 4096;

__global__ void pack_bits_kernel(const uint8_t* __restrict__ states, int64_t K, int64_t D,
                                 uint64_t* __restrict__ bits) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t g = blockIdx.y;
  if (d >= D) return;
  const int64_t first = g * kGroup, last = std::min(K, first + kGroup);
  uint64_t word = 0;
  for (int64_t k = first; k < last; ++k) word |= static_cast<uint64_t>(states[k * D + d] & 1) << (k - first);
  bits[g * D + d] = word;
}

// Dense blocks and the field. One warp per row i: each lane sums J_ij σ_kj over its columns for every
// member k of the group (σ from bit k of the column's word), the warp reduces, and lane k (and k + 32)
// keeps −σ_ki (h_i + ½ Σ_{j≠i} J_ij σ_kj) in float64. Rows of factored blocks add their field term only.
// Table: blocks' (start, size, offset, rank), then the CTAs' row bounds.
template <int KMAX>
__global__ void __launch_bounds__(kThreads) dense_partials_kernel(
    const uint64_t* __restrict__ bits, int64_t D, const float* __restrict__ field,
    const float* __restrict__ couplings, const int64_t* __restrict__ table, int32_t num_blocks,
    int64_t partial_ctas, double* __restrict__ partial) {
  const int64_t* block_table = table;
  const int64_t* cta_rows = table + 4 * num_blocks;
  const uint64_t* group_bits = bits + static_cast<int64_t>(blockIdx.y) * D;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  double mine_lo = 0.0, mine_hi = 0.0;  // members lane and lane + 32 of the group

  for (int64_t i = cta_rows[blockIdx.x] + warp; i < cta_rows[blockIdx.x + 1]; i += kWarps) {
    int lo = 0, hi = num_blocks - 1;  // the last block starting at or before row i
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (block_table[4 * mid] <= i) lo = mid; else hi = mid - 1;
    }
    const int64_t* blk = block_table + 4 * lo;
    const int64_t start = blk[0], offset = blk[2];
    const int64_t n = blk[3] == 0 ? blk[1] : 0;  // columns to sum: none in a factored block
    const int64_t local = i - start;
    const float* row = couplings + offset + local * n;
    const uint64_t* columns = group_bits + start;

    float acc[KMAX];
#pragma unroll
    for (int k = 0; k < KMAX; ++k) acc[k] = 0.0f;
#pragma unroll 4
    for (int64_t j = lane; j < n; j += 32) {
      const float w = j == local ? 0.0f : __ldg(row + j);  // the diagonal is ignored
      const uint64_t m = __ldg(columns + j);
#pragma unroll
      for (int k = 0; k < KMAX; ++k) acc[k] += ((m >> k) & 1) ? w : -w;
    }
#pragma unroll
    for (int k = 0; k < KMAX; ++k)
#pragma unroll
      for (int delta = 16; delta > 0; delta /= 2) acc[k] += __shfl_xor_sync(0xffffffffu, acc[k], delta);

    const uint64_t own = group_bits[i];
    const double h = field[i];
#pragma unroll
    for (int k = 0; k < KMAX; ++k) {
      const double sigma = ((own >> k) & 1) ? 1.0 : -1.0;
      const double contribution = -sigma * (h + 0.5 * static_cast<double>(acc[k]));
      if (k == lane) mine_lo += contribution;
      if (k == lane + 32) mine_hi += contribution;
    }
  }

  __shared__ double per_warp[kWarps][kGroup];
  per_warp[warp][lane] = mine_lo;
  per_warp[warp][lane + 32] = mine_hi;
  __syncthreads();
  if (threadIdx.x < kGroup) {
    double sum = 0.0;
    for (int w = 0; w < kWarps; ++w) sum += per_warp[w][threadIdx.x];
    partial[(static_cast<int64_t>(blockIdx.y) * partial_ctas + blockIdx.x) * kGroup + threadIdx.x] = sum;
  }
}

// Factored blocks, J = −W Wᵀ: their pair sum is −(|Wᵀσ_k|² − Σ_i |w_i|²). One CTA per 32 columns of W: lane
// c of each warp sums P_kc = Σ_i σ_ki W_ic over rows i = warp (mod kWarps); the CTA adds the warps' P_kc,
// squares and sums over columns. Tiles: (block, first column).
template <int KMAX>
__global__ void __launch_bounds__(kThreads) factored_partials_kernel(
    const uint64_t* __restrict__ bits, int64_t D, const float* __restrict__ couplings,
    const int64_t* __restrict__ block_table, const int64_t* __restrict__ tiles, int64_t first_cta,
    int64_t partial_ctas, double* __restrict__ partial) {
  const int64_t* blk = block_table + 4 * tiles[2 * blockIdx.x];
  const int64_t start = blk[0], n = blk[1], offset = blk[2], rank = blk[3];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t column = tiles[2 * blockIdx.x + 1] + lane;
  const bool active = column < rank;
  const uint64_t* group_bits = bits + static_cast<int64_t>(blockIdx.y) * D + start;
  const float* W = couplings + offset + column;

  // The pair sum is the difference of two large sums, so both are kept in float64, where the products
  // σ_ki W_ic and W_ic² are exact.
  double sums[KMAX], w2_sum = 0.0;
#pragma unroll
  for (int k = 0; k < KMAX; ++k) sums[k] = 0.0;
#pragma unroll 4
  for (int64_t i = warp; i < n; i += kWarps) {
    const double w = active ? __ldg(W + i * rank) : 0.0;
    const uint64_t m = __ldg(group_bits + i);
#pragma unroll
    for (int k = 0; k < KMAX; ++k) sums[k] += ((m >> k) & 1) ? w : -w;
    w2_sum += w * w;
  }

  __shared__ double per_warp[kWarps][32];
  __shared__ double w2_total;
  double square_lo = 0.0, square_hi = 0.0;  // Σ_c P_kc² for members lane and lane + 32 (warp 0)
  per_warp[warp][lane] = w2_sum;
  __syncthreads();
  if (warp == 0) {
    double v = 0.0;
    for (int w = 0; w < kWarps; ++w) v += per_warp[w][lane];
    for (int delta = 16; delta > 0; delta /= 2) v += __shfl_xor_sync(0xffffffffu, v, delta);
    if (lane == 0) w2_total = v;
  }
#pragma unroll
  for (int k = 0; k < KMAX; ++k) {
    __syncthreads();
    per_warp[warp][lane] = sums[k];
    __syncthreads();
    if (warp == 0) {
      double p = 0.0;
      for (int w = 0; w < kWarps; ++w) p += per_warp[w][lane];
      double square = p * p;
      for (int delta = 16; delta > 0; delta /= 2) square += __shfl_xor_sync(0xffffffffu, square, delta);
      if (k == lane) square_lo = square;
      if (k == lane + 32) square_hi = square;
    }
  }
  __syncthreads();
  if (warp == 0) {
    double* out = partial + (static_cast<int64_t>(blockIdx.y) * partial_ctas + first_cta + blockIdx.x) * kGroup;
    out[lane] = 0.5 * (square_lo - w2_total);
    out[lane + 32] = 0.5 * (square_hi - w2_total);
  }
}

__global__ void reduce_partials_kernel(const double* __restrict__ partial, int64_t K, int64_t ctas,
                                       float* __restrict__ energies) {
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const double* p = partial + (k / kGroup) * ctas * kGroup + k % kGroup;
    double sum = 0.0;
    for (int64_t c = 0; c < ctas; ++c) sum += p[c * kGroup];
    energies[k] = static_cast<float>(sum);
  }
}

template <int KMAX>
void launch_partial_kernels(dim3 dense_grid, dim3 factored_grid, cudaStream_t stream, const uint64_t* bits,
                            int64_t D, const float* field, const float* couplings, const int64_t* table,
                            int32_t num_blocks, int64_t partial_ctas, double* partial) {
  dense_partials_kernel<KMAX><<<dense_grid, kThreads, 0, stream>>>(bits, D, field, couplings, table, num_blocks,
                                                                    partial_ctas, partial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (factored_grid.x == 0) return;
  const int64_t* tiles = table + 4 * num_blocks + dense_grid.x + 1;
  factored_partials_kernel<KMAX><<<factored_grid, kThreads, 0, stream>>>(
      bits, D, couplings, table, tiles, dense_grid.x, partial_ctas, partial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor ising_energy_cuda(const at::Tensor& states, const at::Tensor& field, const at::Tensor& couplings,
                             at::IntArrayRef block_sizes, at::IntArrayRef block_ranks) {
  constexpr const char* op = "edropout.ising_energy";
  const std::vector<Block> blocks = check_ising_energy_inputs(op, states, field, couplings, block_sizes, block_ranks);
  const c10::cuda::CUDAGuard guard(states.device());
  const at::Tensor s = states.contiguous(), h = field.contiguous(), J = couplings.contiguous();
  const int64_t K = s.size(0), D = s.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor bits = at::empty({num_groups(K), D}, s.options().dtype(at::kLong));
  auto* bit_words = reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>());
  launch_pack_bits(s.data_ptr<uint8_t>(), K, D, bit_words, stream);
  const at::Tensor partial =
      launch_ising_partials(bit_words, K, D, h.data_ptr<float>(), J.data_ptr<float>(), blocks, s.options(), stream);
  at::Tensor out = at::empty({K}, h.options());
  launch_reduce_partials(partial, K, out.data_ptr<float>(), stream);
  return out;
}

}  // namespace

void launch_pack_bits(const uint8_t* states, int64_t K, int64_t D, uint64_t* bits, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((D + kThreads - 1) / kThreads), static_cast<unsigned>(num_groups(K)));
  pack_bits_kernel<<<grid, kThreads, 0, stream>>>(states, K, D, bits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor launch_ising_partials(const uint64_t* bits, int64_t K, int64_t D, const float* field,
                                 const float* couplings, const std::vector<Block>& blocks,
                                 const at::TensorOptions& device, cudaStream_t stream) {
  // Dense CTAs: rows split into runs of about equal work by the layout alone (a dense row costs its
  // length, a row of a factored block only its field term). Factored CTAs: 32 columns of one block each.
  const int64_t L = static_cast<int64_t>(blocks.size());
  auto row_cost = [](const Block& b) { return b.dense() ? b.size : int64_t{1}; };
  int64_t work = 0, tiles = 0;
  for (const Block& b : blocks) {
    work += b.size * row_cost(b);
    if (!b.dense()) tiles += (b.rank + 31) / 32;
  }
  const int64_t ctas = std::max<int64_t>(1, std::min({(work + kCtaWork - 1) / kCtaWork, kMaxCtas, D}));
  at::Tensor table =
      at::empty({4 * L + ctas + 1 + 2 * tiles}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* t = table.data_ptr<int64_t>();
  for (int64_t l = 0; l < L; ++l) {
    t[4 * l] = blocks[l].start;
    t[4 * l + 1] = blocks[l].size;
    t[4 * l + 2] = blocks[l].offset;
    t[4 * l + 3] = blocks[l].rank;
  }
  // Row bound c is the first row whose preceding work reaches c * work / ctas.
  int64_t* bounds = t + 4 * L;
  int64_t l = 0, work_before = 0;
  for (int64_t c = 0; c <= ctas; ++c) {
    const int64_t target = static_cast<int64_t>((static_cast<__int128>(c) * work) / ctas);
    while (c < ctas && l < L && work_before + blocks[l].size * row_cost(blocks[l]) <= target) {
      work_before += blocks[l].size * row_cost(blocks[l]);
      ++l;
    }
    const int64_t cost = l < L ? row_cost(blocks[l]) : 1;
    bounds[c] = (c == ctas || l == L) ? D : blocks[l].start + (target - work_before + cost - 1) / cost;
  }
  int64_t* tile = bounds + ctas + 1;
  for (int64_t b = 0; b < L; ++b)
    for (int64_t c = 0; !blocks[b].dense() && c < blocks[b].rank; c += 32, tile += 2) tile[0] = b, tile[1] = c;

  const at::Tensor device_table = table.to(device.dtype(at::kLong), /*non_blocking=*/true);
  at::Tensor partial = at::empty({num_groups(K), ctas + tiles, kGroup}, device.dtype(at::kDouble));
  const dim3 dense_grid(static_cast<unsigned>(ctas), static_cast<unsigned>(num_groups(K)));
  const dim3 factored_grid(static_cast<unsigned>(tiles), static_cast<unsigned>(num_groups(K)));
  const int64_t members = std::min(K, kGroup);
  const int64_t* dt = device_table.data_ptr<int64_t>();
  double* p = partial.data_ptr<double>();
  const auto num_blocks = static_cast<int32_t>(L);
  const int64_t partial_ctas = ctas + tiles;
  if (members <= 8)
    launch_partial_kernels<8>(dense_grid, factored_grid, stream, bits, D, field, couplings, dt, num_blocks, partial_ctas, p);
  else if (members <= 16)
    launch_partial_kernels<16>(dense_grid, factored_grid, stream, bits, D, field, couplings, dt, num_blocks, partial_ctas, p);
  else if (members <= 32)
    launch_partial_kernels<32>(dense_grid, factored_grid, stream, bits, D, field, couplings, dt, num_blocks, partial_ctas, p);
  else
    launch_partial_kernels<64>(dense_grid, factored_grid, stream, bits, D, field, couplings, dt, num_blocks, partial_ctas, p);
  return partial;
}

void launch_reduce_partials(const at::Tensor& partial, int64_t K, float* energies, cudaStream_t stream) {
  reduce_partials_kernel<<<1, kThreads, 0, stream>>>(partial.data_ptr<double>(), K, partial.size(1), energies);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(edropout, CUDA, m) { m.impl("ising_energy", &ising_energy_cuda); }

}  // namespace edropout::cuda
