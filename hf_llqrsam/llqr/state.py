"""U's state: its tensors over a model's trainable tensors, the refresh counters, the FSDP2 placement, the
fingerprint that gives the saved tensors their meaning, and the state dict (`docs/integration.md` §7.5, §8).

[`UState`] is what a checkpoint holds of LLQR. The operator that applies it is [`~hf_llqrsam.llqr.apply`], the fit
that refreshes it [`~hf_llqrsam.llqr.refresh`]; [`~hf_llqrsam.llqr.LLQRPreconditioner`] composes the three.
"""

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import LLQRConfig
from .diagnostics import block_summary, u_diagnostics
from .layout import clip_groups, fallback_names, tensor_layouts, trainable_parameters
from .registry import make_structure
from .sharding import full_tensor, is_dtensor, shard_like
from .structures import LLQRStateError, Structure

__all__ = ["UState", "materialise_sharded"]


@torch.no_grad()
def materialise_sharded(
    structure: Structure, model: nn.Module, config: LLQRConfig, device: torch.device | str | None
) -> bool:
    """FSDP2: replace the meta identity of `structure` by real tensors, each DTensor sharded like its parameter.

    The identity of `diagonal` and `scalar` U is the constant s (`LLQRConfig.identity_scaling`), so each shard is
    made in place with `full_like(parameter)`: no rank ever holds a whole tensor of U. The `scalar` structure's c
    stays a replicated 0-dim tensor.

    Returns:
        `bool`: whether any tensor of U is sharded (`False`, and nothing done, when no parameter is a DTensor).

    Raises:
        `ValueError`: naming `LLQRConfig.structure`, for a Kronecker structure under FSDP2.
    """
    params = dict(trainable_parameters(model))
    if not any(is_dtensor(p) for p in params.values()):
        return False
    if config.structure not in ("diagonal", "scalar"):
        raise ValueError(
            f"Invalid LLQRConfig.structure={config.structure!r} under FSDP2: Kronecker factors act on both sides of "
            "each kernel (U(X) = A X Bᵀ), while FSDP2 shards every kernel by rows (Shard(0), the output side that Bᵀ "
            "mixes). Applying U to a gradient shard would need the kernel's whole gradient on every rank (an extra "
            "all-gather per kernel and step), and the n×n factor cannot be sharded like its parameter. Use "
            "LLQRConfig.structure='diagonal' or 'scalar' under FSDP2, or DDP for Kronecker structures."
        )
    first = next(iter(params.values()))
    plain_device = torch.device(device) if device is not None else first.device
    scale, real = structure.scale, {}
    for layout, block in zip(structure.layouts, structure.blocks, strict=True):
        p = params[layout.name]
        for key, meta in block.items():
            if id(meta) not in real:
                if is_dtensor(p) and tuple(meta.shape) == tuple(p.shape):
                    real[id(meta)] = torch.full_like(p, scale, dtype=structure.dtype)
                else:  # scalar c (one per clip group, replicated), or a parameter FSDP2 does not manage
                    real[id(meta)] = torch.full(meta.shape, scale, dtype=structure.dtype, device=plain_device)
            block[key] = real[id(meta)]
    structure.device = plain_device
    return True


class UState:
    """U = I over `model`'s trainable tensors, with its refresh counters, fingerprint and state dict.

    Blocks are keyed by the canonical names of `model`'s trainable tensors (`requires_grad`, tied tensors once under
    their first `named_parameters()` name). U is fp32 (fp64 for an fp64 model). Under FSDP2 (DTensor parameters)
    every tensor of U with its parameter's shape is a DTensor sharded like that parameter, created shard by shard
    ([`materialise_sharded`]; U is never materialised whole).

    Args:
        model (`nn.Module`): the unwrapped eager model.
        config (`LLQRConfig`): the LLQR settings.
        device (`torch.device` or `str`, *optional*): where U lives; defaults to the parameters' device.
    """

    def __init__(self, model: nn.Module, config: LLQRConfig, device: torch.device | str | None = None) -> None:
        self.config = config
        params = [p for _, p in trainable_parameters(model)]
        if not params:
            raise ValueError("LLQR needs at least one trainable parameter.")
        layouts = tensor_layouts(model)
        self.names: list[str] = [lay.name for lay in layouts]
        self.fallback_names: list[str] = fallback_names(layouts)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.dtype = torch.promote_types(params[0].dtype, torch.float32)
        self.structure: Structure = make_structure(
            config.structure,
            layouts,
            clip_groups(layouts, config.clip_groups),
            identity_scaling=config.identity_scaling,
            dtype=self.dtype,
            device="meta" if any(is_dtensor(p) for p in params) else (device or params[0].device),
        )
        self.sharded = materialise_sharded(self.structure, model, config, device)
        self.num_updates: int = 0
        self.last_update_step: int | None = None

    @property
    def min_diag(self) -> float | None:
        """The positivity floor of U's stored entries, `None` when the clamp is off (`allow_inversion`)."""
        return None if self.config.allow_inversion else self.config.min_diag

    # ---- whole tensors for a refresh (FSDP2) -------------------------------------------------------------
    def gathered(self) -> Structure:
        """U with whole tensors: U itself, or under FSDP2 a copy whose DTensor shards are all-gathered (collective)."""
        return self.structure.map_tensors(full_tensor) if self.sharded else self.structure

    @torch.no_grad()
    def scatter_(self, whole: Structure) -> None:
        """U ← `whole` (from [`gathered`]): each rank keeps its own shards (a local slice, no communication)."""
        for t, w in zip(self.structure.parameters(), whole.parameters(), strict=True):
            if t is not w:
                t.copy_(shard_like(w, t))

    @torch.no_grad()
    def broadcast_(self, src: int = 0, broadcast: Callable[[Tensor, int], Tensor] | None = None) -> None:
        """Make every rank hold rank `src`'s U (removes floating-point drift between replicated updates).

        All tensors go in one collective (their concatenation). DTensor shards of U (FSDP2) are skipped: every entry
        has exactly one owner, so there is nothing to agree on. A no-op without an initialised process group.

        Args:
            src (`int`, *optional*, defaults to 0): the rank whose U is kept.
            broadcast (`Callable`, *optional*): `(tensor, src) ↦ tensor` holding rank `src`'s values, in place or
                returned (the trainer passes Accelerate's `broadcast`); defaults to `torch.distributed.broadcast`.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        plain = [t for t in self.structure.parameters() if not is_dtensor(t)]
        if not plain:
            return
        flat = torch.cat([t.reshape(-1) for t in plain])
        if broadcast is None:
            dist.broadcast(flat, src)
        else:
            flat = broadcast(flat, src)
        offset = 0
        for t in plain:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    # ---- summaries ---------------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes held by the structure tensors of U."""
        return self.structure.memory_bytes()

    def metrics(self, skipped: bool, whole: Structure | None = None) -> dict[str, float]:
        """The `llqr/*` metrics of U after a refresh (run or `skipped`), `docs/integration.md` §11.

        Args:
            skipped (`bool`): logged as `llqr/skipped_refresh`.
            whole (`Structure`, *optional*): U with whole tensors, when the caller has it; else [`gathered`].
        """
        whole = whole or self.gathered()
        diag = torch.cat(whole.diagonal_parts())
        u_min, u_max, u_mean = (float(x) for x in (diag.min(), diag.max(), diag.mean()))
        return {
            "llqr/updates": float(self.num_updates),
            "llqr/skipped_refresh": 1.0 if skipped else 0.0,
            "llqr/u_min": u_min,
            "llqr/u_max": u_max,
            "llqr/u_mean": u_mean,
            **u_diagnostics(whole, self.min_diag),
            "llqr/memory_bytes": float(self.memory_bytes()),
        }

    def u_summary(self) -> dict[str, Any]:
        """Per tensor of U: structure, entries, min, max, mean, RMS displacement and fraction at the floor
        ([`~hf_llqrsam.llqr.diagnostics.block_summary`]), with the last refresh's step; a collective under FSDP2."""
        blocks = block_summary(self.gathered(), self.min_diag)
        for row in blocks.values():
            row["last_update_step"] = self.last_update_step
        return {
            "structure": self.config.structure,
            "num_updates": self.num_updates,
            "last_update_step": self.last_update_step,
            "min_diag": None if self.min_diag is None else float(self.min_diag),
            "modules": blocks,
        }

    # ---- checkpoints -------------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """Everything that gives the stored tensors of U their meaning, in `weights_only`-safe primitives.

        `structure`, `identity_scaling` (U is stored as s·U), `clip_groups` (the `scalar` structure holds one c per
        group), `blocks` (the ordered `[canonical name, shape]` of U's tensors) and `fallback_names` (matrix-like
        tensors with a diagonal block). `min_diag` and `allow_inversion` are recorded to explain range errors; they
        do not change U's meaning and are not compared.
        """
        cfg = self.config
        return {
            "structure": cfg.structure,
            "identity_scaling": float(cfg.identity_scaling),
            "clip_groups": cfg.clip_groups,
            "blocks": [[lay.name, list(lay.shape)] for lay in self.structure.layouts],
            "fallback_names": list(self.fallback_names),
            "min_diag": float(cfg.min_diag),
            "allow_inversion": bool(cfg.allow_inversion),
        }

    def state_dict(self) -> dict[str, Any]:
        """U, the counters and the [`fingerprint`]; tensors and primitives only (loads with `weights_only=True`)."""
        return {
            "structure": self.config.structure,
            "num_updates": self.num_updates,
            "last_update_step": self.last_update_step,
            "fingerprint": self.fingerprint(),
            "blocks": self.structure.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any], source: str = "llqrsam_state.pt") -> None:
        """Restore U and the counters after checking that they mean the same U in this run (nothing changes if not).

        Checks, in order: the keys of `state`; the [`fingerprint`] against this run (`structure`,
        `identity_scaling`, for `scalar` U `clip_groups`, the names and shapes of U's tensors and, for Kronecker
        structures, the diagonal fallbacks); then every tensor (finite, float, shape, and ≥ `min_diag` for
        `diagonal`/`scalar` U unless `allow_inversion`, see [`~Structure.load_state_dict`]).

        Args:
            state (`Mapping[str, Any]`): from [`state_dict`].
            source (`str`, *optional*, defaults to `"llqrsam_state.pt"`): what to call the saved state in messages;
                pass the file's path.

        Raises:
            [`LLQRStateError`] (a `ValueError`): naming the key or `LLQRConfig` field, both values and what to do.
        """
        remedy = f"delete {source} to restart with U = I, or resume from an earlier checkpoint"
        if not isinstance(state, Mapping):
            raise LLQRStateError(f"Invalid LLQR state in {source}: a {type(state).__name__}, not a dict; {remedy}.")
        if "fingerprint" not in state:
            raise LLQRStateError(
                f"Invalid resume: {source} holds LLQR state in an older format, without the fingerprint of the "
                "settings that give U its meaning (LLQRConfig.structure, identity_scaling, clip_groups, the tensors "
                f"of U), so it cannot be checked against this run. Resume with the hf_llqrsam version that wrote it, "
                f"or {remedy}."
            )
        missing = [k for k in ("structure", "num_updates", "last_update_step", "blocks") if k not in state]
        if missing:
            raise LLQRStateError(f"Invalid LLQR state in {source}: missing keys {missing}; {remedy}.")
        self._check_fingerprint(state["fingerprint"], source, f"delete {source} to restart with U = I")
        num_updates, last = state["num_updates"], state["last_update_step"]
        if isinstance(num_updates, bool) or not isinstance(num_updates, int) or num_updates < 0:
            raise LLQRStateError(f"Invalid LLQR state in {source}: num_updates={num_updates!r}; {remedy}.")
        if last is not None and (isinstance(last, bool) or not isinstance(last, int)):
            raise LLQRStateError(f"Invalid LLQR state in {source}: last_update_step={last!r}; {remedy}.")
        self.structure.load_state_dict(state["blocks"], min_value=self.min_diag, source=source)
        self.num_updates = num_updates
        self.last_update_step = last

    def _check_fingerprint(self, saved: Any, source: str, remedy: str) -> None:
        """Raise [`LLQRStateError`] if the saved fingerprint gives U another meaning than this run's.

        `clip_groups` is compared for `scalar` U only, where each group holds one c; for the other structures it
        shapes only future inner loops. The diagonal fallbacks are compared for Kronecker structures only.
        """
        live = self.fingerprint()
        if not isinstance(saved, Mapping):
            raise LLQRStateError(f"Invalid LLQR state in {source}: the fingerprint is not a dict; {remedy}.")
        settings = ["structure", "identity_scaling"] + (["clip_groups"] if live["structure"] == "scalar" else [])
        for key in settings:
            if key not in saved:
                raise LLQRStateError(f"Invalid LLQR state in {source}: the fingerprint has no {key!r}; {remedy}.")
            if saved[key] != live[key]:
                raise LLQRStateError(
                    f"Invalid resume: {source} was written with LLQRConfig.{key}={saved[key]!r} but this run has "
                    f"LLQRConfig.{key}={live[key]!r}; U would silently change meaning. Resume with "
                    f"LLQRConfig.{key}={saved[key]!r}, or {remedy}."
                )
        saved_blocks = saved.get("blocks")
        if not isinstance(saved_blocks, list) or not all(
            isinstance(b, (list, tuple))
            and len(b) == 2
            and isinstance(b[0], str)
            and isinstance(b[1], (list, tuple))
            and all(isinstance(d, int) for d in b[1])
            for b in saved_blocks
        ):
            raise LLQRStateError(f"Invalid LLQR state in {source}: the fingerprint's 'blocks' is malformed; {remedy}.")
        old = {name: tuple(shape) for name, shape in saved_blocks}
        new = {name: tuple(shape) for name, shape in live["blocks"]}
        differ = [n for n in dict.fromkeys([*new, *old]) if old.get(n) != new.get(n)]
        if differ:
            shown = ", ".join(
                f"{n!r} (saved: {old.get(n, 'absent')}, this run: {new.get(n, 'absent')})" for n in differ[:5]
            )
            raise LLQRStateError(
                f"Invalid resume: {source} holds U for other trainable tensors than this run's: {len(differ)} "
                f"differ, e.g. {shown}; the state does not match the model (another model, or other frozen/trainable "
                f"parameters). Resume with the model that wrote it, or {remedy}."
            )
        if live["structure"] not in ("diagonal", "scalar"):
            old_fb, new_fb = set(saved.get("fallback_names", [])), set(live["fallback_names"])
            if old_fb != new_fb:
                changed = sorted(old_fb ^ new_fb)
                raise LLQRStateError(
                    f"Invalid resume: in {source} the tensors with a diagonal fallback block differ from this run's "
                    f"({changed[:5]}); their {live['structure']} blocks would change meaning. Resume with the "
                    f"hf_llqrsam version that wrote it, or {remedy}."
                )
