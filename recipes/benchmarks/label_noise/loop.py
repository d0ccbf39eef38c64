"""The label-noise benchmark's training loop, on the package's public plain-PyTorch API (`hf_llqrsam.SAM`).

`tests/recipes/test_label_noise.py` checks it against `LLQRSAMTrainer` on a tiny MLP (parameters equal to 1e-6).
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hf_llqrsam import SAM, LLQRConfig, LLQRPreconditioner

from .protocol import Method


def train(
    model: nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    rho: float,
    batches: Sequence[Tensor],
    x: Tensor,
    y: Tensor,
    llqr: LLQRConfig | None = None,
    curvature_indices: Callable[[int], Sequence[int]] | None = None,
    on_refresh: Callable[[int, LLQRPreconditioner, dict], None] | None = None,
    looksam_interval: int | None = None,
    sam_kwargs: dict[str, Any] | None = None,
) -> dict:
    """One optimizer step per entry of `batches` (index tensors into x, y), through `hf_llqrsam.SAM.step`.

    The library's step does everything per mode (refresh U when due, the passes, the descent, the skip rule); this
    loop only supplies the closure and the curvature batch (`curvature_indices(step)`, or the step's own batch).
    `on_refresh(step, U, metrics)` is called after each step that refreshed U.
    """
    options = dict(sam_kwargs or {})
    if looksam_interval is not None:
        options["looksam_interval"] = looksam_interval

    def curvature(step: int) -> dict[str, Tensor]:
        idx = curvature_indices(step) if curvature_indices is not None else batches[step]
        return {"x": x[idx], "labels": y[idx]}

    sam = SAM(model, optimizer, method.sam_mode, rho, llqr=llqr, curvature_batch=curvature, **options)
    for step, idx in enumerate(batches):
        refreshes = sam.preconditioner.num_updates if llqr is not None else 0

        def closure(idx: Tensor = idx) -> Tensor:
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            return loss

        sam.step(closure)
        metrics = sam.metrics()
        if llqr is not None and on_refresh is not None and sam.preconditioner.num_updates > refreshes:
            on_refresh(step, sam.preconditioner, metrics)
    pre = sam.preconditioner if llqr is not None else None
    return {"skipped": sam.skipped, "refreshes": pre.num_updates if pre is not None else 0, "preconditioner": pre}
