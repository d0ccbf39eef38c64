"""The per-optimizer-step state of the step engine, the BatchNorm and RNG policies, and the running metrics.

A [`StepState`] is made by [`~hf_llqrsam.engine.SAMEngine.begin`] (in the Trainer, at the first micro-batch call of an
optimizer step) and dropped by `end`, or by `abort` when a call raises (an out-of-memory retry under
`auto_find_batch_size` must not replay a stale window). Nothing of one step is left behind for the next. Pure torch.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from .sam import Perturbation, copy_tensors_

__all__ = [
    "RNGState",
    "RunningMetrics",
    "StepKind",
    "StepState",
    "batchnorm_policy",
    "replayed_rng",
    "rng_state",
    "set_rng_state",
]

RNGState = tuple[Tensor, Tensor | None]


def rng_state() -> RNGState:
    """The CPU and (if present) CUDA RNG states."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: RNGState) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


StepKind = Literal["plain", "two", "one", "reuse"]
"""What one optimizer step runs ([`~hf_llqrsam.engine.step_kind`]): `plain` (one pass at θ, the descent is g),
`two` (pass 1 at θ, pass 2 at θ + ε), `one` (one pass at θ + ε, ε from the state: past-FSAM) or `reuse` (one pass at
θ, the descent reuses stored state: LookSAM between its full steps)."""


@dataclass
class StepState:
    """Everything one optimizer step carries between its passes (and, in the Trainer, its micro-batch calls).

    Args:
        step (`int`): the optimizer step (`state.global_step` when the step began).
        kind (`str`): the [`StepKind`] of the step.
        bn_at_begin (`list[Tensor]`): the BatchNorm buffers before the step's first forward; restored when the step
            is skipped, and the pass-1 snapshot of the `second` policy in window mode.
        calls (`int`): micro-batch calls so far in this step.
        inputs (`list[dict]`): the window's micro-batches, replayed in pass 2 (window mode).
        rng (`list[RNGState]`): the RNG state before each pass 1 (`sam_same_dropout`).
        perturbation (`Perturbation`, *optional*): the step's ε, once built and finite.
        names / params (`list`): the canonical names and parameters ε was built for (aligned with its tensors).
        clean (`dict[str, Tensor]`): the clean pass-1 gradient by name, for descents that read it.
        ascents (`int`): finite ascents of the step (one per micro-batch with `sam_accumulation="micro"`).
        extra_passes (`int`): stored batches the one pass also ran on (past-FSAM's overlap window).
        num_items (`Any`): the first call's `num_items_in_batch` (kept with past-FSAM's overlap window).
        drop (`bool`): the step is skipped (a non-finite ascent).
        clean_loss / perturbed_loss (`float`): sums of the pass-1 and pass-2 losses, when the driver records them.
    """

    step: int
    kind: StepKind
    bn_at_begin: list[Tensor]
    calls: int = 0
    inputs: list[Any] = field(default_factory=list)
    rng: list[RNGState] = field(default_factory=list)
    perturbation: Perturbation | None = None
    names: list[str] = field(default_factory=list)
    params: list[Tensor] = field(default_factory=list)
    clean: dict[str, Tensor] = field(default_factory=dict)
    ascents: int = 0
    extra_passes: int = 0
    num_items: Any = None
    drop: bool = False
    clean_loss: Tensor | float = 0.0
    perturbed_loss: Tensor | float = 0.0

    @property
    def is_sam(self) -> bool:
        """The step perturbs θ (two passes, or past-FSAM's one pass at θ + ε)."""
        return self.kind in ("two", "one")


@contextmanager
def batchnorm_policy(buffers: Sequence[Tensor], policy: str, before_pass1: Sequence[Tensor] | None) -> Iterator[None]:
    """Around pass 2: keep exactly one pass's BatchNorm running-statistics update (`docs/integration.md` §3.5).

    `second` (the reference): restore the pre-pass-1 snapshot before pass 2, so pass 2's update is the one kept.
    `first`: snapshot after pass 1 and restore it after pass 2, so pass 1's update is the one kept.
    """
    if policy == "second" and before_pass1 is not None and buffers:
        copy_tensors_(buffers, before_pass1)
    after_pass1 = [b.clone() for b in buffers] if policy == "first" else None
    try:
        yield
    finally:
        if after_pass1 is not None:
            copy_tensors_(buffers, after_pass1)


@contextmanager
def replayed_rng(enabled: bool) -> Iterator[None]:
    """With `sam_same_dropout`: pass 2 replays pass 1's RNG states (set per replay by the caller); on exit the
    post-pass-1 state is back, so the training RNG stream is as if pass 2 had drawn nothing."""
    state = rng_state() if enabled else None
    try:
        yield
    finally:
        if state is not None:
            set_rng_state(state)


class RunningMetrics:
    """`sam/*` and `llqr/*` values between two logging steps, as running sums (no growing lists).

    Counters (`counters`) are reported as sums, everything else as means over the values recorded.
    """

    def __init__(self, counters: Sequence[str]) -> None:
        self.counters = frozenset(counters)
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def record(self, key: str, value: float) -> None:
        self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._counts[key] = self._counts.get(key, 0) + 1

    def __bool__(self) -> bool:
        return bool(self._sums)

    def drain(self) -> dict[str, float]:
        """The reported values, and a reset."""
        out = {k: s if k in self.counters else s / self._counts[k] for k, s in self._sums.items()}
        self._sums.clear()
        self._counts.clear()
        return out
