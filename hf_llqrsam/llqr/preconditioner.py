"""The LLQR preconditioner: owns U, refreshes it from a curvature batch and applies it (arXiv 2605.04230).

One refresh (`algorithm.md` §5.2–5.3):

    g, G ← curvature problem on the batch (eval mode, fp32)
    V ← copy(U) (warm start) or I;  T clipped SGD-momentum steps on J(V) = −gᵀVg + ½ (Vg)ᵀ(G + λI)(Vg)
    U ← β·U + (1 − β)·V;  diagonal/scalar: U ← max(U, min_diag) unless inversion is allowed
"""

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import LLQRConfig
from .curvature import Extractor, curvature_problem
from .fit import fit_structure
from .layout import clip_groups, fallback_names, tensor_layouts, trainable_parameters
from .structures import DiagonalStructure, Structure, make_structure

__all__ = ["LLQRPreconditioner"]


class LLQRPreconditioner:
    """The learned, block-structured inverse preconditioner U; the descent direction is U·g.

    Blocks are keyed by the canonical names of `model`'s trainable tensors (`requires_grad`, tied tensors once under
    their first `named_parameters()` name). Names it does not hold (frozen tensors, say) are passed through as
    the identity. It implements the [`~hf_llqrsam.sam.Preconditioner`] protocol. U is fp32 (fp64 for an fp64 model).

    Args:
        model (`nn.Module`): the unwrapped eager model.
        config (`LLQRConfig`): the LLQR settings.

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

    def __init__(self, model: nn.Module, config: LLQRConfig) -> None:
        self.config = config
        params = [p for _, p in trainable_parameters(model)]
        if not params:
            raise ValueError("LLQR needs at least one trainable parameter.")
        layouts = tensor_layouts(model)
        self.names: list[str] = [lay.name for lay in layouts]
        self.fallback_names: list[str] = fallback_names(layouts)
        self._index = {n: i for i, n in enumerate(self.names)}
        self.dtype = torch.promote_types(params[0].dtype, torch.float32)
        self.structure: Structure = make_structure(
            config.structure,
            layouts,
            clip_groups(layouts, config.clip_groups),
            identity_scaling=config.identity_scaling,
            dtype=self.dtype,
            device=params[0].device,
        )
        self.num_updates: int = 0
        self.last_update_step: int | None = None

    # ---- cadence ------------------------------------------------------------------------------------------
    def is_due(self, step: int) -> bool:
        """Whether a refresh runs before optimizer step `step`: k % E == 0, k < until, once per k (§5.4)."""
        until = self.config.update_until
        return (
            step % self.config.update_interval == 0
            and (until is None or step < until)
            and step != self.last_update_step
        )

    # ---- applying U ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, names: Sequence[str], tensors: Sequence[Tensor]) -> list[Tensor]:
        """U·t for each tensor as a new fp32 tensor (fp64 stays fp64); identity for names not in U."""
        if list(names) == self.names and isinstance(self.structure, DiagonalStructure):
            return self.structure.apply(tensors)  # the default: fused, no per-tensor loop (falls back on dtype)
        out = []
        for name, t in zip(names, tensors, strict=True):
            x = t.detach().to(torch.promote_types(t.dtype, torch.float32), copy=True)
            i = self._index.get(name)
            out.append(x if i is None else self.structure.apply_block(i, x.to(self.dtype)).to(x.dtype))
        return out

    @torch.no_grad()
    def apply_(self, names: Sequence[str], tensors: Sequence[Tensor]) -> None:
        """t ← U·t in place, cast back to each tensor's dtype; names not in U are left untouched."""
        fast_t, fast_d = [], []
        for name, t in zip(names, tensors, strict=True):
            i = self._index.get(name)
            if i is None:
                continue
            if isinstance(self.structure, DiagonalStructure) and t.dtype == self.dtype:
                fast_t.append(t)
                fast_d.append(self.structure.blocks[i]["d"])
            else:
                t.copy_(self.structure.apply_block(i, t.to(self.dtype)))
        if fast_t:
            torch._foreach_mul_(fast_t, fast_d)
            if self.structure.scale != 1.0:
                torch._foreach_div_(fast_t, self.structure.scale)

    # ---- refreshing U -------------------------------------------------------------------------------------
    def update(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        step: int | None = None,
        *,
        shift_labels: bool = False,
        extractor: Extractor | None = None,
        update_probe: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]] | None = None,
    ) -> dict[str, float]:
        """One LLQR refresh of U on the curvature batch (`algorithm.md` §5.2–5.3); leaves every `p.grad` untouched.

        Args:
            model (`nn.Module`): the unwrapped eager model (the one U was built for).
            batch (`Mapping[str, Any]`): model inputs plus `labels`.
            step (`int`, *optional*): the optimizer step, recorded as `last_update_step`.
            shift_labels (`bool`, *optional*, defaults to `False`): causal-LM shift of the default extractor.
            extractor (`Callable`, *optional*): `(model, batch) -> (logits, targets, row_mask)`.
            update_probe (`Callable`, *optional*): g ↦ Δ_opt(g), the base optimizer's dry-run update
                ([`~hf_llqrsam.llqr.update_probe.make_update_probe`]); required with `llqr_apply="update"`, where
                J is evaluated at δ = U·Δ_opt(g) (`algorithm.md` §7.3).

        Returns:
            `dict[str, float]`: the `llqr/*` metrics of `integration.md` §11.
        """
        cfg = self.config
        if cfg.apply == "update" and update_probe is None:
            raise ValueError(
                "llqr_apply='update' needs the optimizer's dry-run update: pass "
                "update_probe=make_update_probe(optimizer, model) to LLQRPreconditioner.update."
            )
        start = time.perf_counter()
        g_dict, gv_dict = curvature_problem(
            model,
            batch,
            divergence=cfg.divergence,
            damping=cfg.damping,
            ngd_scaling=cfg.ngd_scaling,
            label_smoothing=cfg.label_smoothing,
            renyi_alpha=cfg.renyi_alpha,
            include_pad_rows=cfg.include_pad_rows,
            shift_labels=shift_labels,
            chunk_size=cfg.chunk_size,
            extractor=extractor,
            sharded=cfg.curvature_sharding == "sharded" and dist.is_available() and dist.is_initialized(),
        )
        probe_dict = update_probe(g_dict) if cfg.apply == "update" and update_probe is not None else None
        metrics = self.fit_problem(g_dict, gv_dict, step=step, update=probe_dict)
        metrics["llqr/update_seconds"] = time.perf_counter() - start
        return metrics

    def fit_problem(
        self,
        g_dict: Mapping[str, Tensor],
        gv_dict: Callable[[dict[str, Tensor]], Mapping[str, Tensor]],
        step: int | None = None,
        update: Mapping[str, Tensor] | None = None,
    ) -> dict[str, float]:
        """The refresh of U on a given curvature problem: inner loop, EMA merge, clamp (`algorithm.md` §5.2–5.3).

        [`update`] builds (g, G·v) from a model and a batch and calls this. Call it directly when the curvature
        problem comes from elsewhere (an analytic quadratic, as in the pothole toy).

        Args:
            g_dict (`Mapping[str, Tensor]`): name → g, for every name of U.
            gv_dict (`Callable`): maps such a dict v to (G + λI)v.
            step (`int`, *optional*): recorded as `last_update_step`.
            update (`Mapping[str, Tensor]`, *optional*): Δ_opt(g) for `llqr_apply="update"`; J is then evaluated
                at δ = U·Δ_opt(g) (`algorithm.md` §7.3).
        """
        cfg = self.config
        if set(g_dict) != set(self.names):
            raise ValueError("The model's trainable parameters changed since the LLQR preconditioner was built.")
        names = self.names
        g = [g_dict[n].to(self.dtype) for n in names]

        def gv(v: list[Tensor]) -> list[Tensor]:
            out = gv_dict(dict(zip(names, v, strict=True)))
            return [out[n].to(self.dtype) for n in names]

        probe = None if update is None else [-update[n].to(self.dtype) for n in names]  # δ = −U·probe = U·Δ_opt(g)
        v_struct = self.structure.clone() if cfg.warm_start else self.structure.identity()
        stats = fit_structure(
            v_struct,
            g,
            gv,
            steps=cfg.inner_steps,
            lr=cfg.inner_lr,
            momentum=cfg.inner_momentum,
            clip_norm=cfg.clip_norm,
            probe=probe,
        )
        self.structure.ema_(v_struct, cfg.ema_decay)
        if not cfg.allow_inversion:
            self.structure.clamp_(cfg.min_diag)
        self.num_updates += 1
        self.last_update_step = step
        diag = torch.cat(self.structure.diagonal_parts())
        u_min, u_max, u_mean = (float(x) for x in (diag.min(), diag.max(), diag.mean()))
        return {
            "llqr/updates": float(self.num_updates),
            "llqr/objective_start": stats.objective_start,
            "llqr/objective_end": stats.objective_end,
            "llqr/ugrad_norm": stats.ugrad_norm,
            "llqr/clip_fraction": stats.clip_fraction,
            "llqr/nonfinite_ugrad": float(stats.nonfinite_ugrad),
            "llqr/u_min": u_min,
            "llqr/u_max": u_max,
            "llqr/u_mean": u_mean,
            "llqr/memory_bytes": float(self.memory_bytes()),
        }

    # ---- multi-process, memory, checkpoints ---------------------------------------------------------------
    @torch.no_grad()
    def broadcast_(self, src: int = 0) -> None:
        """Make every rank hold rank `src`'s U (removes floating-point drift between replicated updates)."""
        if dist.is_available() and dist.is_initialized():
            for t in self.structure.parameters():
                dist.broadcast(t, src)

    def memory_bytes(self) -> int:
        """Bytes held by the structure tensors of U."""
        return self.structure.memory_bytes()

    def state_dict(self) -> dict[str, Any]:
        """Tensors and primitives only (loads with `torch.load(weights_only=True)`)."""
        return {
            "structure": self.config.structure,
            "num_updates": self.num_updates,
            "last_update_step": self.last_update_step,
            "blocks": self.structure.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore U and the counters; raises `ValueError` if the structure or the set of names differs."""
        if state["structure"] != self.config.structure:
            raise ValueError(
                f"LLQR state has llqr_structure={state['structure']!r}, but this run uses {self.config.structure!r}."
            )
        self.structure.load_state_dict(state["blocks"])
        self.num_updates = int(state["num_updates"])
        last = state["last_update_step"]
        self.last_update_step = None if last is None else int(last)
