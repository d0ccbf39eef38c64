"""The LLQR preconditioner (arXiv 2605.04230): a thin composition of U's four homes.

| concept                                   | module                                      |
|-------------------------------------------|---------------------------------------------|
| cadence and schedules (pure in the step)  | [`~hf_llqrsam.llqr.schedules`]              |
| U's state, FSDP2 placement, fingerprint   | [`~hf_llqrsam.llqr.state`]                  |
| the operator U·t                          | [`~hf_llqrsam.llqr.apply`]                  |
| the fit (one refresh)                     | [`~hf_llqrsam.llqr.refresh`]                |

[`LLQRPreconditioner`] keeps the public interface the trainer, the plain API, the recipes and the tests use.
"""

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .apply import apply_u, apply_u_
from .config import LLQRConfig
from .curvature import Extractor
from .refresh import Fit, ProblemFn, refresh_problem
from .schedules import check_schedules, refresh_due
from .state import UState
from .structures import LLQRStateError, Structure

__all__ = ["LLQRPreconditioner", "LLQRStateError"]


class LLQRPreconditioner:
    """The learned, block-structured inverse preconditioner U; the descent direction is U·g.

    Blocks are keyed by the canonical names of `model`'s trainable tensors (`requires_grad`, tied tensors once under
    their first `named_parameters()` name). Names it does not hold (frozen tensors, say) are passed through as
    the identity. It implements the [`~hf_llqrsam.sam.Preconditioner`] protocol. U is fp32 (fp64 for an fp64 model).

    Args:
        model (`nn.Module`): the unwrapped eager model.
        config (`LLQRConfig`): the LLQR settings.
        device (`torch.device` or `str`, *optional*): places U (the trainer passes `accelerator.device`); defaults to
            the parameters' device. Under FSDP2 (DTensor parameters) every tensor of U with its parameter's shape is
            a DTensor sharded like that parameter, created shard by shard (U is never materialised whole), and the
            `scalar` structure's c stays a replicated 0-dim tensor. Kronecker structures raise there
            ([`~hf_llqrsam.llqr.state.materialise_sharded`]).

    Example:

    ```python
    >>> import torch
    >>> from torch import nn
    >>> from hf_llqrsam.llqr import LLQRConfig, LLQRPreconditioner
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> pre = LLQRPreconditioner(model, LLQRConfig(inner_steps=5))
    >>> metrics = pre.update(model, {"input": torch.randn(16, 4), "labels": torch.randint(0, 3, (16,))}, step=0)
    >>> grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    >>> pre.apply_(pre.names, grads)  # grads ← U·grads
    ```
    """

    def __init__(self, model: nn.Module, config: LLQRConfig, device: torch.device | str | None = None) -> None:
        """Build U = I over `model`'s trainable tensors."""
        self.config = config
        self._milestones = check_schedules(config)
        self._u = UState(model, config, device)
        self._fit = Fit(self._u)

    # ---- U's state (read through to `UState`) -------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The canonical names of U's tensors, in order."""
        return self._u.names

    @property
    def fallback_names(self) -> list[str]:
        """Matrix-like tensors that a Kronecker structure holds with a diagonal block."""
        return self._u.fallback_names

    @property
    def structure(self) -> Structure:
        """U's tensors ([`~hf_llqrsam.llqr.structures.Structure`])."""
        return self._u.structure

    @property
    def dtype(self) -> torch.dtype:
        """U's dtype: fp32, or fp64 for an fp64 model."""
        return self._u.dtype

    @property
    def num_updates(self) -> int:
        """Refreshes that ran (skipped ones excluded)."""
        return self._u.num_updates

    @num_updates.setter
    def num_updates(self, value: int) -> None:
        self._u.num_updates = value

    @property
    def last_update_step(self) -> int | None:
        """The optimizer step of the last refresh, run or skipped."""
        return self._u.last_update_step

    @last_update_step.setter
    def last_update_step(self, value: int | None) -> None:
        self._u.last_update_step = value

    def memory_bytes(self) -> int:
        """Bytes held by the structure tensors of U."""
        return self._u.memory_bytes()

    def u_summary(self) -> dict[str, Any]:
        """Per tensor of U its summary ([`~hf_llqrsam.llqr.state.UState.u_summary`]); a collective under FSDP2."""
        return self._u.u_summary()

    def fingerprint(self) -> dict[str, Any]:
        """What gives U's stored tensors their meaning ([`~hf_llqrsam.llqr.state.UState.fingerprint`])."""
        return self._u.fingerprint()

    def state_dict(self) -> dict[str, Any]:
        """U, the counters and the [`fingerprint`]; tensors and primitives only (loads with `weights_only=True`)."""
        return self._u.state_dict()

    def load_state_dict(self, state: Mapping[str, Any], source: str = "llqrsam_state.pt") -> None:
        """Restore U and the counters after checking the fingerprint; nothing changes on an error.

        See [`~hf_llqrsam.llqr.state.UState.load_state_dict`].

        Raises:
            [`LLQRStateError`] (a `ValueError`): naming the key or `LLQRConfig` field, both values and what to do.
        """
        self._u.load_state_dict(state, source=source)

    def broadcast_(self, src: int = 0, broadcast: Callable[[Tensor, int], Tensor] | None = None) -> None:
        """Make every rank hold rank `src`'s U ([`~hf_llqrsam.llqr.state.UState.broadcast_`])."""
        self._u.broadcast_(src, broadcast)

    # ---- cadence ----------------------------------------------------------------------------------------
    def is_due(self, step: int, lr_at: Callable[[int], float] | None = None) -> bool:
        """Whether a refresh runs before optimizer step `step` ([`~hf_llqrsam.llqr.schedules.refresh_due`]).

        k % E(k) == 0, k < `update_until`, once per k (§5.4); with `apply="update"` and `lr_at` a grid step whose
        learning rate is 0 is deferred to the first later step with LR > 0.
        """
        return refresh_due(self.config, self._milestones, step, self.last_update_step, lr_at)

    # ---- the operator U·t ---------------------------------------------------------------------------------
    def apply(self, names: Sequence[str], tensors: Sequence[Tensor]) -> list[Tensor]:
        """U·t for each tensor as a new fp32 tensor (fp64 stays fp64); identity for names not in U."""
        return apply_u(self._u, names, tensors)

    def apply_(self, names: Sequence[str], tensors: Sequence[Tensor]) -> None:
        """t ← U·t in place, cast back to each tensor's dtype; names not in U are left untouched."""
        apply_u_(self._u, names, tensors)

    # ---- the fit ------------------------------------------------------------------------------------------
    def update(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        step: int | None = None,
        *,
        shift_labels: bool = False,
        extractor: Extractor | None = None,
        update_probe: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]] | None = None,
        pad_token_id: int | None = None,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, float]:
        """One LLQR refresh of U on the curvature batch (`docs/algorithm.md` §5.2–5.3); leaves every `p.grad`
        untouched.

        A curvature problem that is not finite (g, Δ_opt(g), or J at the first inner step) skips the refresh and
        keeps U bit for bit (see [`fit_problem`]).

        Args:
            model (`nn.Module`): the unwrapped eager model (the one U was built for).
            batch (`Mapping[str, Any]`): model inputs plus `labels`.
            step (`int`, *optional*): the optimizer step, recorded as `last_update_step`.
            shift_labels (`bool`, *optional*, defaults to `False`): causal-LM shift of the default extractor.
            extractor (`Callable`, *optional*): `(model, batch) -> (logits, targets, row_mask)`.
            update_probe (`Callable`, *optional*): g ↦ Δ_opt(g), the base optimizer's dry-run update
                ([`~hf_llqrsam.llqr.update_probe.make_update_probe`]); required with `apply="update"`, where
                J is evaluated at δ = U·Δ_opt(g) (`docs/algorithm.md` §7.3).
            pad_token_id (`int`, *optional*): with `include_pad_rows`, the target of `labels == -100` rows (the
                reference's "predict pad" rows, `docs/algorithm.md` §4.1); without it those rows count in N but add
                nothing to the loss numerator. Ignored when `include_pad_rows` is off.
            all_reduce (`Callable`, *optional*): the sum over ranks used by `curvature_sharding="sharded"`,
                `t ↦ Σ_ranks t` (the trainer passes Accelerate's `reduce`); defaults to `torch.distributed`.
            progress (`Callable[[int, int], None]`, *optional*): called after each curvature product (G + λI)·v,
                the bulk of a refresh's time, as `progress(done, inner_steps)` (one product per inner step for the
                momentum, SGD and Adam solvers). The Trainer logs it, so a long refresh is not a silent pause.

        Under FSDP2 pass an unsharded view of the model (`hf_llqrsam.distributed.unsharded_view`): the inner loop
        then runs on whole tensors of U, identical on every rank, and each rank keeps its shards of the result.

        Returns:
            `dict[str, float]`: the `llqr/*` metrics of `docs/integration.md` §11 (see [`fit_problem`]) and
            `llqr/update_seconds`.
        """
        start = time.perf_counter()
        g_dict, gv_dict, probe, diagnostics = refresh_problem(
            self.config,
            model,
            batch,
            shift_labels=shift_labels,
            extractor=extractor,
            update_probe=update_probe,
            pad_token_id=pad_token_id,
            all_reduce=all_reduce,
        )
        if progress is not None:
            gv_dict = _counted(gv_dict, lambda done: progress(done, self.config.inner_steps))
        metrics = self.fit_problem(
            g_dict,
            gv_dict,
            step=step,
            update=probe,
            rows=diagnostics["rows"],
            nonfinite_rows=diagnostics["nonfinite_rows"],
        )
        metrics["llqr/update_seconds"] = time.perf_counter() - start
        return metrics

    def fit_problem(
        self,
        g_dict: Mapping[str, Tensor],
        gv_dict: ProblemFn,
        step: int | None = None,
        update: Mapping[str, Tensor] | None = None,
        *,
        rows: Tensor | int | None = None,
        nonfinite_rows: Tensor | int | None = None,
    ) -> dict[str, float]:
        """The refresh of U on a given curvature problem ([`~hf_llqrsam.llqr.refresh.Fit.fit_problem`]).

        [`update`] builds (g, G·v) from a model and a batch and calls this. Call it directly when the curvature
        problem comes from elsewhere (an analytic quadratic, as in the pothole toy).
        """
        return self._fit.fit_problem(g_dict, gv_dict, step, update, rows=rows, nonfinite_rows=nonfinite_rows)


def _counted(fn: ProblemFn, report: Callable[[int], None]) -> ProblemFn:
    """`fn`, reporting how many times it has returned after each call."""
    calls = 0

    def wrapped(v: dict[str, Tensor]) -> Mapping[str, Tensor]:
        nonlocal calls
        out = fn(v)
        calls += 1
        report(calls)
        return out

    return wrapped
