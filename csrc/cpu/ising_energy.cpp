#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "kernels.h"

// The row loop is compiled for AVX-512 and AVX2+FMA as well as the baseline ISA; the loader picks the
// best one this CPU runs (GCC function multi-versioning), so one wheel is fast everywhere.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EDROPOUT_CPU_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define EDROPOUT_CPU_CLONES
#endif

namespace edropout::cpu {
namespace {

// Candidates are processed in groups of kGroup: the signs of a group are stored [D][kGroup], so that one
// coupling J_ij meets the kGroup signs s_kj in one vector multiply-add.
constexpr int64_t kGroup = 8;

// dot[k] += sum_{j in [0, n)} J_j * signs[j][k], with four independent accumulators.
EDROPOUT_CPU_CLONES
void accumulate_row(const float* J, const float* signs, int64_t n, float* dot) {
  float a0[kGroup] = {}, a1[kGroup] = {}, a2[kGroup] = {}, a3[kGroup] = {};
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* s = signs + j * kGroup;
    for (int64_t k = 0; k < kGroup; ++k) {
      a0[k] += J[j] * s[k];
      a1[k] += J[j + 1] * s[kGroup + k];
      a2[k] += J[j + 2] * s[2 * kGroup + k];
      a3[k] += J[j + 3] * s[3 * kGroup + k];
    }
  }
  for (; j < n; ++j)
    for (int64_t k = 0; k < kGroup; ++k) a0[k] += J[j] * signs[j * kGroup + k];
  for (int64_t k = 0; k < kGroup; ++k) dot[k] += (a0[k] + a1[k]) + (a2[k] + a3[k]);
}

// A task is a run of rows inside one block, sized to about kTaskWork couplings. Tasks depend only on the
// layout, and their partial sums are added in task order, so the result does not depend on the thread count.
struct Task {
  int64_t block, row_begin, row_end;
};
constexpr int64_t kTaskWork = 1 << 15;

std::vector<Task> make_tasks(const std::vector<Block>& blocks) {
  std::vector<Task> tasks;
  for (int64_t l = 0; l < static_cast<int64_t>(blocks.size()); ++l) {
    const Block& b = blocks[l];
    const int64_t rows = std::max<int64_t>(1, kTaskWork / b.size);
    for (int64_t r = 0; r < b.size; r += rows) tasks.push_back({l, b.start + r, b.start + std::min(b.size, r + rows)});
  }
  return tasks;
}

}  // namespace

void ising_energy_into(const uint8_t* states, int64_t K, int64_t D, const float* field, const float* couplings,
                       const std::vector<Block>& blocks, float* out) {
  const int64_t groups = (K + kGroup - 1) / kGroup;
  // signs[g][d][k'] = 2 * states[g * kGroup + k'][d] - 1, and 0 for the padding members of the last group.
  std::vector<float> signs(groups * D * kGroup);
  at::parallel_for(0, D, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t d = begin; d < end; ++d)
        for (int64_t k = 0; k < kGroup; ++k) {
          const int64_t member = g * kGroup + k;
          signs[(g * D + d) * kGroup + k] = member < K ? 2.0f * states[member * D + d] - 1.0f : 0.0f;
        }
  });

  const std::vector<Task> tasks = make_tasks(blocks);
  std::vector<double> partial(tasks.size() * groups * kGroup, 0.0);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Task& task = tasks[t];
      const Block& b = blocks[task.block];
      for (int64_t g = 0; g < groups; ++g) {
        const float* sg = signs.data() + g * D * kGroup;
        double* acc = partial.data() + (t * groups + g) * kGroup;
        for (int64_t i = task.row_begin; i < task.row_end; ++i) {
          const int64_t local = i - b.start;
          const float* row = couplings + b.offset + local * b.size;
          const float* sb = sg + b.start * kGroup;
          // sum_{j != i} J_ij s_kj: the diagonal is skipped, not subtracted, so it cannot cost precision.
          float dot[kGroup] = {};
          accumulate_row(row, sb, local, dot);
          accumulate_row(row + local + 1, sb + (local + 1) * kGroup, b.size - local - 1, dot);
          const float* si = sg + i * kGroup;
          for (int64_t k = 0; k < kGroup; ++k)
            acc[k] -= static_cast<double>(si[k]) * (static_cast<double>(field[i]) + 0.5 * dot[k]);
        }
      }
    }
  });
  for (int64_t k = 0; k < K; ++k) {
    const int64_t g = k / kGroup, lane = k % kGroup;
    double e = 0.0;
    for (size_t t = 0; t < tasks.size(); ++t) e += partial[(t * groups + g) * kGroup + lane];
    out[k] = static_cast<float>(e);
  }
}

namespace {

at::Tensor ising_energy_cpu(const at::Tensor& states, const at::Tensor& field, const at::Tensor& couplings,
                            at::IntArrayRef block_sizes) {
  constexpr const char* op = "edropout.ising_energy";
  check_states(op, "states", states, 1);
  check_ising_inputs(op, states, field);
  const std::vector<Block> blocks = check_blocks(op, block_sizes, couplings, states);
  const at::Tensor s = states.contiguous(), h = field.contiguous(), J = couplings.contiguous();
  at::Tensor out = at::empty({s.size(0)}, field.options());
  ising_energy_into(s.data_ptr<uint8_t>(), s.size(0), s.size(1), h.data_ptr<float>(), J.data_ptr<float>(), blocks,
                    out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(edropout, CPU, m) { m.impl("ising_energy", &ising_energy_cpu); }

}  // namespace edropout::cpu
