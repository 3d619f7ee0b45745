"""The population step as the NumPy proof of concept did it: a Python loop over the K candidates, each
drawing its own donors and masks with NumPy's generator and evaluating its own energy block by block
(one matrix-vector product per block and candidate), then greedy selection. float32 throughout."""

import numpy as np


def numpy_step(population, energies, field, blocks, rng, mutation=0.1, crossover=0.9, keep=None):
    """population uint8 [K, D], energies float32 [K], field float32 [D], blocks: list of square float32
    arrays in unit order. Returns (population, energies, best_index)."""
    K, D = population.shape
    new_population = population.copy()
    new_energies = energies.copy()
    for k in range(K):
        r1, r2, r3 = rng.choice([i for i in range(K) if i != k], 3, replace=False)
        x1, x2, x3 = population[r1], population[r2], population[r3]
        flip = (x2 != x3) & (rng.random(D) < mutation)
        mutant = np.where(flip, 1 - x1, x1)
        cross = rng.random(D) < crossover
        cross[rng.integers(D)] = True
        trial = np.where(cross, mutant, population[k]).astype(np.uint8)
        if keep is not None:
            trial[keep] = 1
        sigma = 2.0 * trial.astype(np.float32) - 1.0
        energy = -float(field @ sigma)
        start = 0
        for J in blocks:
            n = J.shape[0]
            s = sigma[start : start + n]
            energy -= 0.5 * (float(s @ (J @ s)) - float(np.trace(J)))
            start += n
        if energy < new_energies[k]:
            new_energies[k] = energy
            new_population[k] = trial
    return new_population, new_energies, int(np.argmin(new_energies))
