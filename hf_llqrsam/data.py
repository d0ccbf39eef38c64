"""Deterministic curvature-batch indices (`docs/algorithm.md` §5.5, `docs/integration.md` §5.2)."""

import torch

_STEP_STRIDE = 1_000_003  # a prime, so (seed, step) pairs map to distinct generator seeds in practice


def curvature_indices(seed: int, step: int, num_examples: int, batch_size: int) -> list[int]:
    """`min(batch_size, num_examples)` distinct example indices, a pure function of `(seed, step)`.

    Every rank draws the same indices, and a resumed run draws the same ones as the uninterrupted run.
    """
    generator = torch.Generator().manual_seed((seed * _STEP_STRIDE + step) % (2**63))
    return torch.randperm(num_examples, generator=generator)[: min(batch_size, num_examples)].tolist()
