#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "kernels.h"

namespace edropout::cpu {
namespace {

// Candidates are processed in groups of kGroup = 8: the signs of a group are stored [D][8], so that one
// coupling J_ij meets the 8 signs s_kj in one vector multiply-add. Rows go 8 at a time (kTile), so that
// each vector of signs loaded serves 8 rows: the couplings stream from memory once, the signs from cache.
constexpr int64_t kGroup = 8;
constexpr int64_t kTile = 8;
typedef float Vec8 __attribute__((vector_size(kGroup * sizeof(float))));

inline Vec8 load8(const float* p) {
  Vec8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Products are summed in float over chunks of kChunk columns, then the chunk sums in float64: float
// speed, and rounding errors that do not grow with the length of the row.
constexpr int64_t kChunk = 256;

inline void add_to(double* dot, const Vec8& a) {
  for (int64_t k = 0; k < kGroup; ++k) dot[k] += a[k];
}

// dots[r] += sum_{j in [begin, end)} J[r * stride + j] * signs[j] for the kTile rows r of a tile.
EDROPOUT_CPU_CLONES
void accumulate_tile(const float* J, int64_t stride, const float* signs, int64_t begin, int64_t end,
                     double (*dots)[kGroup]) {
  const float *J0 = J, *J1 = J + stride, *J2 = J + 2 * stride, *J3 = J + 3 * stride;
  const float *J4 = J + 4 * stride, *J5 = J + 5 * stride, *J6 = J + 6 * stride, *J7 = J + 7 * stride;
  for (int64_t chunk = begin; chunk < end; chunk += kChunk) {
    Vec8 a0 = {}, a1 = {}, a2 = {}, a3 = {}, a4 = {}, a5 = {}, a6 = {}, a7 = {};
    const int64_t chunk_end = std::min(end, chunk + kChunk);
    for (int64_t j = chunk; j < chunk_end; ++j) {
      const Vec8 s = load8(signs + j * kGroup);
      a0 += J0[j] * s;
      a1 += J1[j] * s;
      a2 += J2[j] * s;
      a3 += J3[j] * s;
      a4 += J4[j] * s;
      a5 += J5[j] * s;
      a6 += J6[j] * s;
      a7 += J7[j] * s;
    }
    add_to(dots[0], a0), add_to(dots[1], a1), add_to(dots[2], a2), add_to(dots[3], a3);
    add_to(dots[4], a4), add_to(dots[5], a5), add_to(dots[6], a6), add_to(dots[7], a7);
  }
}

// dot += sum_{j in [begin, end)} J[j] * signs[j] for one row, with four independent accumulators.
EDROPOUT_CPU_CLONES
void accumulate_row(const float* J, const float* signs, int64_t begin, int64_t end, double* dot) {
  for (int64_t chunk = begin; chunk < end; chunk += kChunk) {
    Vec8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    const int64_t chunk_end = std::min(end, chunk + kChunk);
    int64_t j = chunk;
    for (; j + 4 <= chunk_end; j += 4) {
      a0 += J[j] * load8(signs + j * kGroup);
      a1 += J[j + 1] * load8(signs + (j + 1) * kGroup);
      a2 += J[j + 2] * load8(signs + (j + 2) * kGroup);
      a3 += J[j + 3] * load8(signs + (j + 3) * kGroup);
    }
    for (; j < chunk_end; ++j) a0 += J[j] * load8(signs + j * kGroup);
    add_to(dot, (a0 + a1) + (a2 + a3));
  }
}

// For the columns [c0, c0 + width) (width <= kColumns) of a factored block W (n x rank, row-major):
// acc[k] += sum_c P_kc^2 with P_kc = sum_i s_ki W_ic, and wsq += sum W_ic^2. The pair sum of a factored
// block is the difference of these two large sums, so both are kept in float64 (the products s_ki W_ic and
// W_ic^2 are exact there). P is one vector of the 8 members per column; rows go 8 at a time, so each P_c
// is loaded and stored once per 8 rows, and columns 8 at a time, for 8 independent chains of additions.
constexpr int64_t kColumns = 256;
typedef double Vec8d __attribute__((vector_size(kGroup * sizeof(double))));

inline Vec8d widen(const Vec8& v) { return __builtin_convertvector(v, Vec8d); }

EDROPOUT_CPU_CLONES
void accumulate_columns(const float* W, int64_t rank, int64_t n, int64_t c0, int64_t width, const float* signs,
                        double* acc, double& wsq) {
  Vec8d P[kColumns], w2 = {};
  double Wd[kTile][kColumns];  // the current rows' segments, widened once
  for (int64_t c = 0; c < width; ++c) P[c] = Vec8d{};
  for (int64_t i = 0; i < n; i += kTile) {
    const int64_t rows = std::min(kTile, n - i);
    const float* Wi = W + i * rank + c0;
    // The next rows' segments are short strided runs the hardware prefetcher does not catch in time.
    for (int64_t r = kTile; r < 2 * kTile && i + r < n; ++r)
      for (int64_t c = 0; c < width; c += 64 / sizeof(float)) __builtin_prefetch(Wi + r * rank + c);
    Vec8d s[kTile];
    for (int64_t r = 0; r < kTile; ++r) {
      s[r] = r < rows ? widen(load8(signs + (i + r) * kGroup)) : Vec8d{};
      for (int64_t c = 0; c < width; ++c) Wd[r][c] = r < rows ? Wi[r * rank + c] : 0.0;
    }
    int64_t c = 0;
    for (; c + 8 <= width; c += 8) {
      Vec8d p[8];
      for (int64_t u = 0; u < 8; ++u) p[u] = P[c + u];
      for (int64_t r = 0; r < kTile; ++r)
        for (int64_t u = 0; u < 8; ++u) p[u] += Wd[r][c + u] * s[r];
      for (int64_t u = 0; u < 8; ++u) P[c + u] = p[u];
      for (int64_t r = 0; r < kTile; ++r) {
        Vec8d w;
        std::memcpy(&w, &Wd[r][c], sizeof(w));
        w2 += w * w;
      }
    }
    for (; c < width; ++c)
      for (int64_t r = 0; r < kTile; ++r) {
        P[c] += Wd[r][c] * s[r];
        w2[0] += Wd[r][c] * Wd[r][c];
      }
  }
  for (int64_t c = 0; c < width; ++c)
    for (int64_t k = 0; k < kGroup; ++k) acc[k] += P[c][k] * P[c][k];
  for (int64_t k = 0; k < kGroup; ++k) wsq += w2[k];
}

// Tasks depend only on the layout, and their partial sums are added in task order, so the result does not
// depend on the thread count. A task is about kTaskWork couplings of a dense block's rows (a multiple of kTile
// rows unless the block ends), or kColumns columns of a factored block (all its rows), or field units.
enum class TaskKind { kField, kDenseRows, kFactoredColumns };
struct Task {
  TaskKind kind;
  int64_t block, begin, end;
};
constexpr int64_t kTaskWork = 1 << 16;

std::vector<Task> make_tasks(const std::vector<Block>& blocks, int64_t D) {
  std::vector<Task> tasks;
  for (int64_t d = 0; d < D; d += kTaskWork) tasks.push_back({TaskKind::kField, -1, d, std::min(D, d + kTaskWork)});
  for (int64_t l = 0; l < static_cast<int64_t>(blocks.size()); ++l) {
    const Block& b = blocks[l];
    if (b.dense()) {
      const int64_t step = std::max<int64_t>(kTile, kTaskWork / b.size / kTile * kTile);
      for (int64_t r = 0; r < b.size; r += step)
        tasks.push_back({TaskKind::kDenseRows, l, b.start + r, b.start + std::min(b.size, r + step)});
    } else {
      for (int64_t c = 0; c < b.rank; c += kColumns)
        tasks.push_back({TaskKind::kFactoredColumns, l, c, std::min(b.rank, c + kColumns)});
    }
  }
  return tasks;
}

// sum_{j != i} J_ij s_kj for the rows [i, i + count) of block b (count == kTile or 1), into dots[count].
// The diagonal is skipped, not subtracted, so a large J_ii cannot cost precision.
void row_dots(const Block& b, const float* couplings, const float* block_signs, int64_t i, int64_t count,
              double (*dots)[kGroup]) {
  const int64_t local = i - b.start, n = b.size;
  const float* J = couplings + b.offset + local * n;
  for (int64_t r = 0; r < count; ++r)
    for (int64_t k = 0; k < kGroup; ++k) dots[r][k] = 0.0;
  if (count == kTile) {
    accumulate_tile(J, n, block_signs, 0, local, dots);
    for (int64_t r = 0; r < kTile; ++r)
      for (int64_t c = 0; c < kTile; ++c)
        if (r != c) add_to(dots[r], J[r * n + local + c] * load8(block_signs + (local + c) * kGroup));
    accumulate_tile(J, n, block_signs, local + kTile, n, dots);
  } else {
    accumulate_row(J, block_signs, 0, local, dots[0]);
    accumulate_row(J, block_signs, local + 1, n, dots[0]);
  }
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

  const std::vector<Task> tasks = make_tasks(blocks, D);
  std::vector<double> partial(tasks.size() * groups * kGroup, 0.0);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Task& task = tasks[t];
      for (int64_t g = 0; g < groups; ++g) {
        const float* sg = signs.data() + g * D * kGroup;
        double* acc = partial.data() + (t * groups + g) * kGroup;
        if (task.kind == TaskKind::kField) {  // -sum_i h_i s_ki
          for (int64_t i = task.begin; i < task.end; ++i)
            for (int64_t k = 0; k < kGroup; ++k) acc[k] -= static_cast<double>(field[i]) * sg[i * kGroup + k];
          continue;
        }
        const Block& b = blocks[task.block];
        const float* block_signs = sg + b.start * kGroup;
        if (task.kind == TaskKind::kFactoredColumns) {  // 1/2 (|W^T s_k|^2 - sum_i |w_i|^2)
          double sq[kGroup] = {}, wsq = 0.0;
          accumulate_columns(couplings + b.offset, b.rank, b.size, task.begin, task.end - task.begin, block_signs,
                             sq, wsq);
          for (int64_t k = 0; k < kGroup; ++k) acc[k] += 0.5 * (sq[k] - wsq);
          continue;
        }
        for (int64_t i = task.begin; i < task.end;) {  // -1/2 s_ki sum_{j != i} J_ij s_kj
          const int64_t count = i + kTile <= task.end ? kTile : 1;
          double dots[kTile][kGroup];
          row_dots(b, couplings, block_signs, i, count, dots);
          for (int64_t r = 0; r < count; ++r, ++i) {
            const float* si = sg + i * kGroup;
            for (int64_t k = 0; k < kGroup; ++k) acc[k] -= 0.5 * si[k] * dots[r][k];
          }
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
                            at::IntArrayRef block_sizes, at::IntArrayRef block_ranks) {
  constexpr const char* op = "edropout.ising_energy";
  const std::vector<Block> blocks = check_ising_energy_inputs(op, states, field, couplings, block_sizes, block_ranks);
  const at::Tensor s = states.contiguous(), h = field.contiguous(), J = couplings.contiguous();
  at::Tensor out = at::empty({s.size(0)}, field.options());
  ising_energy_into(s.data_ptr<uint8_t>(), s.size(0), s.size(1), h.data_ptr<float>(), J.data_ptr<float>(), blocks,
                    out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(edropout, CPU, m) { m.impl("ising_energy", &ising_energy_cpu); }

}  // namespace edropout::cpu
