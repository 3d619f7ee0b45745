// The op schemas, declared once. Kernels: cpu/*.cpp and cuda/*.cu (same file names); Python face and
// documentation: edropout/ops.py; plain-PyTorch references: edropout/reference.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import edropout._C` runs the registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(edropout, m) {
  // Energy of each state: E = -sum_i h_i s_i - 1/2 sum_l sum_{i != j in block l} J_ij s_i s_j, s = 2*states - 1,
  // with block l dense (block_ranks[l] == 0: J, n x n) or factored (rank r: W, n x r, J = -W W^T).
  m.def("ising_energy(Tensor states, Tensor field, Tensor couplings, int[] block_sizes, int[] block_ranks) -> Tensor");
  // One generation of evolution, rule 'classic' (binary differential evolution) or 'edropout': the trials.
  m.def(
      "evolve(Tensor population, int seed, int step, float mutation, float crossover, Tensor? keep, "
      "str rule='classic') -> Tensor");
  // Greedy one-to-one selection: (population, energies, best_index).
  m.def("select(Tensor population, Tensor energies, Tensor trials, Tensor trial_energies) -> (Tensor, Tensor, Tensor)");
  // evolve -> ising_energy of the trials -> select, fused: (population, energies, best_index).
  m.def(
      "evolve_step(Tensor population, Tensor energies, Tensor field, Tensor couplings, int[] block_sizes, "
      "int[] block_ranks, int seed, int step, float mutation, float crossover, Tensor? keep, str rule='classic') "
      "-> (Tensor, Tensor, Tensor)");
}
