"""The SAM family as one "preconditioned SAM" template, in pure torch (`docs/algorithm.md` §8).

One step of every method is

    v = probe (g, g − σḡ, or an EMA),  C = perturbation geometry,  ν = ‖Cv‖₂ or √(vᵀCv)
    ε = ρ · C v / √(ν² + eps),  g̃ = ∇L(θ + ε),  θ ← OuterOpt(θ, P g̃)      (θ restored by copy first)

Each mode's v, C, ν and P are fields of its record in `hf_llqrsam/modes.py`; `modes.mode_table()` renders them as the
template table of `docs/reference/modes.md`.

Sources: SAM arXiv 2010.01412; ASAM (Kwon et al., ICML 2021); FSAM (Li et al., CVPR 2024); Fisher-SAM (Kim et al.,
ICML 2022); GSAM (Zhuang et al., ICLR 2022); VaSSO (Li & Giannakis, NeurIPS 2023); infoSAM arXiv 2501.06603 (built
from the authors' prototype, see `docs/infosam.md`); past-FSAM (the LLQR reference's one-pass mode); LookSAM (Liu et
al., CVPR 2022); WSAM (Yue et al., KDD 2023); LLQR+SAM arXiv 2605.16134, where C = P = U is the learned LLQR
preconditioner that enters through [`Preconditioner`]. `sam_norm` may also normalise per layer ([`layer_groups`]).

All math runs in fp32. Weights are restored by copying a backup, never by subtracting ε, because (θ + ε) − ε ≠ θ in
floating point.
"""

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .config import SAMConfig
from .modes import MODES

__all__ = [
    "IdentityPreconditioner",
    "Perturbation",
    "Preconditioner",
    "SAMState",
    "apply_perturbation_",
    "batchnorm_buffers",
    "commit_ascent",
    "compute_perturbation",
    "copy_tensors_",
    "gsam_descent_",
    "is_dtensor",
    "layer_groups",
    "looksam_orthogonal",
    "looksam_reuse_",
    "restore_",
    "total_norm",
    "wsam_descent_",
]


class Preconditioner(Protocol):
    """A linear operator U on parameter-shaped tensors, keyed by canonical parameter name.

    It enters the perturbation as C = U and the descent as P = U (`docs/algorithm.md` §8.2). Tensors are aligned with
    `names`; `apply` returns new fp32 tensors, `apply_` writes U·t into `tensors` in place.
    """

    def apply(self, names: Sequence[str], tensors: Sequence[Tensor]) -> list[Tensor]: ...

    def apply_(self, names: Sequence[str], tensors: Sequence[Tensor]) -> None: ...


class IdentityPreconditioner:
    """U = I: the default geometry, under which every LLQR row reduces to its plain row (`docs/algorithm.md` S2)."""

    def apply(self, names: Sequence[str], tensors: Sequence[Tensor]) -> list[Tensor]:
        return list(tensors)

    def apply_(self, names: Sequence[str], tensors: Sequence[Tensor]) -> None:
        return None


def _at_least_fp32(t: Tensor) -> Tensor:
    # fp16/bf16 grads are promoted; fp32 and fp64 pass through without a copy.
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _materialize(x: Tensor) -> Tensor:
    # FSDP2 params/grads are DTensors: a reduction over local shards is a Partial DTensor until gathered.
    full = getattr(x, "full_tensor", None)
    return full() if full is not None else x


def is_dtensor(t: Tensor) -> bool:
    """Whether `t` is a `torch.distributed.tensor.DTensor` (an FSDP2 parameter, gradient or state shard).

    Checked without importing `torch.distributed.tensor`: no tensor can be a DTensor before that module is loaded.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _one_spec(parts: Sequence[Tensor]) -> bool:
    # All DTensors on one mesh with one placement: their partial reductions stack into one DTensor, gathered once.
    first = parts[0]
    if not is_dtensor(first):
        return False
    mesh, placements = first.device_mesh, first.placements  # type: ignore[attr-defined]
    return all(
        is_dtensor(p) and p.device_mesh == mesh and p.placements == placements  # type: ignore[attr-defined]
        for p in parts
    )


def total_norm(tensors: Sequence[Tensor]) -> Tensor:
    """‖(t₁, …, t_n)‖₂ over all tensors, in fp32.

    DTensor-aware: for FSDP2 shards the per-tensor norms are partial DTensors; when they share one mesh and placement
    (the FSDP2 case), ‖·‖ of their stack is gathered with a single collective instead of one per tensor.
    """
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm([_at_least_fp32(t) for t in tensors])
    if _one_spec(norms):
        return _materialize(torch.linalg.vector_norm(torch.stack(list(norms))))
    out: Tensor = torch.linalg.vector_norm(torch.stack([_materialize(n) for n in norms]))
    return out


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Σᵢ ⟨aᵢ, bᵢ⟩; DTensor shards are reduced globally, with one collective when they share a mesh and placement."""
    if not a:
        return torch.zeros(())
    parts = [(x * y).sum() for x, y in zip(a, b, strict=True)]
    if _one_spec(parts):
        return _materialize(torch.stack(parts).sum())
    return torch.stack([_materialize(p) for p in parts]).sum()


def copy_tensors_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """dst ← src, tensor by tensor (bit-exact).

    One fused `_foreach_copy_` for plain tensors; a per-tensor `copy_` as soon as one tensor is a DTensor, which has
    no sharding rule for `_foreach_copy_` (`docs/integration.md` §7.4). A DTensor is copied shard by shard, without
    communication, when both sides are sharded alike.
    """
    dst, src = list(dst), list(src)
    if len(dst) != len(src):
        raise ValueError(f"copy_tensors_: {len(dst)} destinations for {len(src)} sources.")
    if not dst:
        return
    with torch.no_grad():
        if any(is_dtensor(t) for t in dst) or any(is_dtensor(t) for t in src):
            for d, s in zip(dst, src, strict=True):
                d.copy_(s)
        else:
            torch._foreach_copy_(dst, src)


@dataclass
class Perturbation:
    """Result of [`compute_perturbation`].

    eps (`list[Tensor]`): ε per parameter (fp32), empty when the ascent was skipped.
    finite (`bool`): False when the pass-1 gradient was non-finite; then ε = 0 and no state was updated.
    grad_norm / probe_norm / perturbation_norm (`float`): ‖g‖ (true units), ‖v‖ and ‖ε‖.
    clean_grads (`list[Tensor]`): an fp32 copy of g, kept only for the descents that read it (the spec's
        `keeps_clean`: GSAM, LookSAM, WSAM).
    pending (`dict[str, list[Tensor]]`): the mode-state updates of this ascent (FSAM ḡ, VaSSO d, infoSAM m and v),
        not yet written to the state when `compute_perturbation` ran with `commit=False` ([`commit_ascent`]).
    """

    eps: list[Tensor]
    finite: bool
    grad_norm: float
    probe_norm: float = 0.0
    perturbation_norm: float = 0.0
    clean_grads: list[Tensor] = field(default_factory=list)
    pending: dict[str, list[Tensor]] = field(default_factory=dict)


def commit_ascent(state: "SAMState", names: Sequence[str], pert: Perturbation) -> None:
    """Write a finite ascent's pending mode state into `state` and count the ascent (`compute_perturbation` with
    `commit=False` leaves both to the caller, which commits only once the whole step is known to be finite)."""
    for kind, tensors in pert.pending.items():
        state.set(kind, names, tensors)
    state.ascents += 1


class SAMState:
    """Per-mode state, keyed by canonical parameter name, fp32: FSAM ḡ, VaSSO d, infoSAM m and v.

    `ascents` counts successful ascents (it decides "first step" behaviour); `skipped_ascent` counts non-finite
    pass-1 gradients. `batches` holds past-FSAM's overlap window (`past_fsam_overlap`): the training micro-batches
    of the last K − 1 optimizer steps, each entry `{"inputs": [dict, ...], "num_items": ...}`, oldest first.
    [`state_dict`] holds only tensors and primitives (loads with `weights_only=True`).
    """

    def __init__(self) -> None:
        self.buffers: dict[str, dict[str, Tensor]] = {}
        self.batches: list[dict[str, Any]] = []
        self.ascents = 0
        self.skipped_ascent = 0

    def get(self, kind: str, names: Sequence[str], like: Sequence[Tensor]) -> list[Tensor]:
        """The `kind` buffers for `names`; zeros shaped like `like` where none is stored yet (nothing is stored)."""
        store = self.buffers.get(kind, {})
        out = []
        for name, t in zip(names, like, strict=True):
            buf = store.get(name)
            if buf is None:
                buf = torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32))
            out.append(buf)
        return out

    def set(self, kind: str, names: Sequence[str], tensors: Sequence[Tensor]) -> None:
        """Replace the `kind` buffers of `names` (commits an out-of-place state update)."""
        store = self.buffers.setdefault(kind, {})
        for name, t in zip(names, tensors, strict=True):
            store[name] = t

    def has(self, kind: str) -> bool:
        return bool(self.buffers.get(kind))

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ascents": self.ascents,
            "skipped_ascent": self.skipped_ascent,
            "buffers": {k: {n: t.detach().cpu().clone() for n, t in v.items()} for k, v in self.buffers.items()},
        }
        if self.batches:  # only past-FSAM with an overlap window has any; older files simply lack the key
            out["batches"] = _map_tensors(self.batches, lambda t: t.detach().cpu().clone())
        return out

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        """Restore from [`state_dict`]; raises `ValueError` naming the buffer if any entry is non-finite."""
        for kind, buffers in state["buffers"].items():
            for name, t in buffers.items():
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(
                        f"Invalid SAM state: buffer {kind!r} of {name!r} holds non-finite values, so every later "
                        "ascent would be skipped. Resume from an earlier checkpoint, or delete its llqrsam_state.pt "
                        "to restart the SAM state."
                    )
        self.ascents = int(state["ascents"])
        self.skipped_ascent = int(state["skipped_ascent"])
        self.buffers = {k: {n: t.to(device=device) for n, t in v.items()} for k, v in state["buffers"].items()}
        self.batches = _map_tensors(list(state.get("batches", [])), lambda t: t.to(device=device))


def _map_tensors(x: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """`fn` applied to every tensor in nested dicts / lists / tuples; everything else is kept as it is."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: _map_tensors(v, fn) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_map_tensors(v, fn) for v in x)
    return x


def compute_perturbation(
    cfg: SAMConfig,
    state: SAMState,
    names: Sequence[str],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    rho: float,
    geometry: Preconditioner | None = None,
    grad_scale: float = 1.0,
    commit: bool = True,
) -> Perturbation:
    """ε = ρ · C v / √(ν(v)² + eps) for `cfg.mode`, driven by its [`~hf_llqrsam.modes.ModeSpec`] (`docs/algorithm.md`
    §8).

    The mode's state (FSAM ḡ, VaSSO d, infoSAM m and v) is computed out of place and committed only when g, ν and ε
    are all finite; a non-finite ascent leaves the state bit-identical and returns `finite=False` with ε empty.
    `sam_norm` `layer_euclidean` / `layer_matrix` normalise each layer of [`layer_groups`] on its own and scale it by
    1/√L (the reference's `layer_euclidean` / `layer_matrix_norm`); `fsam_ema="direction"` makes C v unit-norm before
    ν (the reference's `ema_direction`, FSAM and past-FSAM only).

    Args:
        cfg (`SAMConfig`): the run's SAM settings.
        state (`SAMState`): per-mode state.
        names, params, grads (`Sequence`): aligned canonical names, parameters and their pass-1 gradients; for
            past-FSAM (no pass 1) `grads` is the stored g̃ₜ₋₁ (the state's `g_last`, zeros before the first step).
        rho (`float`): the radius at this step (from the ρ schedule).
        geometry (`Preconditioner`, *optional*): C = U, only for modes whose spec has `llqr_geometry`; `None` is I.
        grad_scale (`float`, *optional*, defaults to 1.0): the fp16 loss scale S the gradients carry. Modes with
            `loss_scale="invariant"` build ε from the scaled g (ε does not change); `true_units` modes work on g / S
            (`docs/integration.md` §6). GSAM's clean copy stays in the units of `grads`, the units of pass 2.
        commit (`bool`, *optional*, defaults to `True`): write the mode state and count the ascent when ε is finite.
            `False` leaves both to the caller (`Perturbation.pending`; [`commit_ascent`] commits one ascent alone): the
            step engine commits them with the rest of the step, only when the whole step (ε, g̃, the descent terms
            and the state) is finite (`docs/algorithm.md` §8.7).
    """
    spec = MODES.get(cfg.mode)
    if spec is None:
        raise ValueError(f"Invalid sam_mode={cfg.mode!r} for compute_perturbation. Must be one of {', '.join(MODES)}.")
    if geometry is not None and not spec.llqr_geometry:
        raise ValueError(f"Invalid geometry for sam_mode={cfg.mode!r}: its spec keeps its own C (no llqr_geometry).")
    # raw: fp32 view of the pass-1 gradient as it is (a copy only for a cast); g: in the units the mode works in.
    raw = [_at_least_fp32(t) for t in grads]
    unscale = grad_scale != 1.0 and spec.loss_scale == "true_units"
    g = list(torch._foreach_div(raw, grad_scale)) if unscale else raw
    g_norm = float(total_norm(g))
    grad_norm = g_norm if unscale or grad_scale == 1.0 else g_norm / grad_scale  # ‖g‖ in true units, for the logs
    if not math.isfinite(g_norm):
        state.skipped_ascent += 1
        return Perturbation(eps=[], finite=False, grad_norm=grad_norm)

    first = state.ascents == 0
    pending: dict[str, list[Tensor]] = {}  # state updates, committed only if ε is finite
    v = _probe(spec.probe, cfg, state, names, g, first, pending)
    cv, norm_sq = _geometry(spec.geometry, cfg, state, names, params, v, g, geometry, first, pending)

    # ‖Cv‖ and ν² as Python floats: with C = I and the euclidean norm both are ‖g‖, already known (no extra
    # reduction, no extra device sync); ‖ε‖ = scale·‖Cv‖ exactly, so ε is never reduced again.
    cv_norm = g_norm if cv is g else float(total_norm(cv))
    if spec.probe in _FSAM_PROBES and cfg.fsam_ema == "direction" and math.isfinite(cv_norm):
        # reference `ema_direction` (utils.py:make_perturbation_from_vector): C v ← C v / √(‖C v‖² + eps) first
        unit = math.sqrt(cv_norm**2 + cfg.eps)
        cv = list(torch._foreach_div(cv, unit))
        cv_norm = cv_norm / unit
    if norm_sq is None and cfg.norm in ("layer_euclidean", "layer_matrix"):
        layered = _layer_scales(cfg, names, v, cv, rho)
        if layered is None:
            state.skipped_ascent += 1
            return Perturbation(eps=[], finite=False, grad_norm=grad_norm)
        scales, eps_norm = layered
        eps = list(torch._foreach_mul(cv, scales))
    else:
        if norm_sq is not None:
            nu_sq = float(norm_sq)
        elif cfg.norm == "matrix":
            nu_sq = float(_dot(v, cv))
        else:
            nu_sq = cv_norm**2
        denom = nu_sq + cfg.eps
        scale = rho / math.sqrt(denom) if math.isfinite(denom) and denom > 0 else math.inf
        if not (math.isfinite(cv_norm) and math.isfinite(scale) and math.isfinite(scale * cv_norm)):
            state.skipped_ascent += 1  # g was finite, but C v or ν overflowed (or vᵀCv ≤ 0 for an indefinite U)
            return Perturbation(eps=[], finite=False, grad_norm=grad_norm)
        eps = list(torch._foreach_mul(cv, scale))
        eps_norm = scale * cv_norm
    pert = Perturbation(
        eps=eps,
        finite=True,
        grad_norm=grad_norm,
        probe_norm=g_norm if v is g else float(total_norm(v)),
        perturbation_norm=eps_norm,
        clean_grads=[t.clone() for t in raw] if spec.keeps_clean else [],
        pending=pending,
    )
    if commit:
        commit_ascent(state, names, pert)
    return pert


_FSAM_PROBES = ("ema_difference", "past_difference")  # the probes that read fsam_ema (reference `perturb_mode`)


def layer_groups(names: Sequence[str]) -> list[list[int]]:
    """Indices of `names` grouped by layer, for `sam_norm="layer_euclidean"` / `"layer_matrix"`.

    A layer is the module that owns the tensor: the canonical name up to its last dot (a Linear's weight and bias
    together, a LayerNorm's weight and bias, ViT's `embeddings` with its `cls_token` and position embeddings). The
    reference (`lqr_optimizer/_src/utils/utils.py:tree_dot_per_layer`) takes the top-level entries of its parameter
    tree, i.e. its model's parameterised stages (`EnhancedSequential.layers`), which are the same modules except that
    one reference stage holds a whole attention block (q, k, v, out), four layers here (`docs/algorithm.md` Q11).
    Groups are in first-appearance order.
    """
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name.rpartition(".")[0], []).append(i)
    return list(groups.values())


def _layer_scales(
    cfg: SAMConfig, names: Sequence[str], v: Sequence[Tensor], cv: Sequence[Tensor], rho: float
) -> tuple[list[float], float] | None:
    """Per-tensor scales of the layer normalisers, and ‖ε‖; `None` when a layer's ν² + eps is not finite and > 0.

    ε_l = ρ · (C v)_l / (√(ν_l² + eps) · √L) over the L layers of [`layer_groups`], with ν_l² = ‖(C v)_l‖²
    (`layer_euclidean`) or v_lᵀ(C v)_l (`layer_matrix`): the reference's `layer_euclidean` / `layer_matrix_norm`
    (`lqr_optimizer/_src/utils/utils.py:make_perturbation_from_vector`). One device sync for all layers.
    """
    if not cv:
        return [], 0.0
    sq = torch.stack([_materialize(n) for n in torch._foreach_norm([_at_least_fp32(t) for t in cv])]).pow(2)
    cv_sq: list[float] = sq.tolist()
    if cfg.norm == "layer_matrix":
        nu_sq: list[float] = torch.stack([_materialize((a * b).sum()) for a, b in zip(v, cv, strict=True)]).tolist()
    else:
        nu_sq = cv_sq
    groups = layer_groups(names)
    root_layers = math.sqrt(len(groups))
    scales = [0.0] * len(names)
    eps_sq = 0.0
    for idx in groups:
        denom = sum(nu_sq[i] for i in idx) + cfg.eps
        if not (math.isfinite(denom) and denom > 0):
            return None
        s = rho / (math.sqrt(denom) * root_layers)
        for i in idx:
            scales[i] = s
            eps_sq += s * s * cv_sq[i]
    return (scales, math.sqrt(eps_sq)) if math.isfinite(eps_sq) else None


def _probe(
    probe: str,
    cfg: SAMConfig,
    state: SAMState,
    names: Sequence[str],
    g: list[Tensor],
    first: bool,
    pending: dict[str, list[Tensor]],
) -> list[Tensor]:
    """The probe v of the spec: g; FSAM's g − σḡ (pre-update ḡ; ḡ ← βḡ + (1 − β)g); VaSSO's d ← (1 − θ)d + θg.

    `past_difference` (past-FSAM) is FSAM's formula on the stored g̃ₜ₋₁, passed in as `g`: v = g̃ₜ₋₁ − σḡ, then
    ḡ ← βḡ + (1 − β)g̃ₜ₋₁ (the reference's `make_perturbation_from_noise` and `resolve_sam_state_buffers`). With
    `fsam_ema="direction"` the new ḡ is unit-norm, ḡ ← ḡ/√(‖ḡ‖² + eps) (the reference's `update_gbar`).
    """
    match probe:
        case "gradient":
            return g
        case "ema_difference" | "past_difference":
            if probe == "ema_difference" and first and cfg.fsam_init == "first_grad":  # official F-SAM: ḡ₀ = g₀
                pending["gbar"] = _fsam_ema_commit(cfg, [t.clone() for t in g])
                return g
            gbar = state.get("gbar", names, g)
            pending["gbar"] = _fsam_ema_commit(cfg, list(torch._foreach_lerp(gbar, g, 1.0 - cfg.fsam_beta)))
            return list(torch._foreach_add(g, gbar, alpha=-cfg.fsam_sigma))
        case "ema":
            d = list(torch._foreach_lerp(state.get("d", names, g), g, cfg.vasso_theta))
            pending["d"] = d
            return d
    raise ValueError(f"Unknown probe {probe!r}.")


def _fsam_ema_commit(cfg: SAMConfig, gbar: list[Tensor]) -> list[Tensor]:
    """ḡ as stored: unchanged for `fsam_ema` `grad` / `precond_grad`, unit-norm for `direction` (reference
    `lqr_optimizer/_src/utils/utils.py:update_gbar`, `tree_normalize` with eps = `sam_eps`, the reference `gbar_eps`).
    """
    if cfg.fsam_ema != "direction":
        return gbar
    return list(torch._foreach_div(gbar, math.sqrt(float(total_norm(gbar)) ** 2 + cfg.eps)))


def _geometry(
    geometry_kind: str,
    cfg: SAMConfig,
    state: SAMState,
    names: Sequence[str],
    params: Sequence[Tensor],
    v: list[Tensor],
    g: list[Tensor],
    geometry: Preconditioner | None,
    first: bool,
    pending: dict[str, list[Tensor]],
) -> tuple[list[Tensor], Tensor | None]:
    """(C v, ν² when the mode fixes its own normaliser, else None) for the spec's geometry."""
    match geometry_kind:
        case "preconditioner":
            return (geometry.apply(names, v) if geometry is not None else v), None
        case "identity":
            return v, None
        case "asam":
            # T = |θ| + η, with T = 1 for biases (Kwon et al. 2021, reference `asam_eta`).
            t = [
                torch.ones_like(gi) if n.endswith("bias") else _at_least_fp32(p.detach()).abs() + cfg.asam_eta
                for n, p, gi in zip(names, params, g, strict=True)
            ]
            tg = list(torch._foreach_mul(t, g))
            return list(torch._foreach_mul(tg, t)), total_norm(tg) ** 2
        case "fisher":
            g2 = torch._foreach_mul(g, g)
            if cfg.fisher_sam_form == "reference":  # C = 1/(g² + η), reference `fisher_sam_eta`
                denom = torch._foreach_add(g2, cfg.fisher_sam_eta)
            else:  # paper form C = 1/(1 + η g²)
                denom = torch._foreach_add(torch._foreach_mul(g2, cfg.fisher_sam_eta), 1.0)
            cv = list(torch._foreach_div(g, denom))
            return cv, _dot(g, cv)
        case "infosam":
            return _infosam_direction(cfg, state, names, g, first, pending), None
    raise ValueError(f"Unknown geometry {geometry_kind!r}.")


def _infosam_direction(
    cfg: SAMConfig,
    state: SAMState,
    names: Sequence[str],
    g: list[Tensor],
    first: bool,
    pending: dict[str, list[Tensor]],
) -> list[Tensor]:
    """u = g / (b + δ), b the per-coordinate noise estimate (`docs/infosam.md`, prototype `INFOSAM` with its fixes).

    First step: m = g and b = 1, i.e. plain SAM. Later: m ← α m + (1 − α) g, then b = (m − g)² (`instant`, as
    coded in the prototype) or v ← α v + (1 − α)(g − m_prev)² (`ema`, our extension; v starts at its first sample).
    """
    if first:
        pending["m"] = [t.clone() for t in g]
        return g
    m = state.get("m", names, g)
    new_m = list(torch._foreach_lerp(m, g, 1.0 - cfg.infosam_alpha))
    pending["m"] = new_m
    if cfg.infosam_variance == "instant":
        diff = torch._foreach_sub(new_m, g)
        b = list(torch._foreach_mul(diff, diff))
    else:
        diff = torch._foreach_sub(g, m)
        sample = list(torch._foreach_mul(diff, diff))
        if state.has("v"):
            b = list(torch._foreach_lerp(state.get("v", names, g), sample, 1.0 - cfg.infosam_alpha))
        else:
            b = sample
        pending["v"] = b
    return list(torch._foreach_div(g, torch._foreach_add(b, cfg.infosam_damping)))


def apply_perturbation_(params: Sequence[Tensor], eps: Sequence[Tensor]) -> list[Tensor]:
    """θ ← θ + ε in place; returns the exact backups of θ for [`restore_`]."""
    with torch.no_grad():
        live = [p.detach() for p in params]
        backups = [p.clone() for p in live]
        if all(p.dtype == e.dtype for p, e in zip(live, eps, strict=True)):
            torch._foreach_add_(live, list(eps))  # one fused kernel per dtype/device group
        else:
            for p, e in zip(live, eps, strict=True):
                p.add_(e.to(p.dtype))
    return backups


def restore_(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    """θ ← backup by copy (bit-exact), never θ − ε; per tensor for FSDP2 DTensors ([`copy_tensors_`])."""
    copy_tensors_([p.detach() for p in params], backups)


def gsam_descent_(perturbed: Sequence[Tensor], clean: Sequence[Tensor], alpha: float) -> None:
    """GSAM descent in place: g̃ ← g̃ − α g⊥ with g⊥ = g − (g·ĝ̃) ĝ̃ (Zhuang et al., ICLR 2022, Alg. 1).

    Works on fp16-scaled gradients too, as long as both passes carry the same scale.
    """
    gt = [_at_least_fp32(t) for t in perturbed]
    coef = float(_dot(clean, gt) / (total_norm(gt) ** 2 + 1e-24))
    g_perp = torch._foreach_add(list(clean), gt, alpha=-coef)  # g − (g·g̃/‖g̃‖²) g̃
    for p_grad, gp in zip(perturbed, g_perp, strict=True):
        p_grad.sub_(gp.to(p_grad.dtype), alpha=alpha)


def looksam_orthogonal(clean: Sequence[Tensor], perturbed: Sequence[Tensor]) -> list[Tensor]:
    """LookSAM's g_v = g̃ − ‖g̃‖ cos(g, g̃) ĝ = g̃ − (g·g̃/‖g‖²) g, in fp32 (Liu et al., CVPR 2022, Alg. 1).

    The component of the SAM gradient g̃ = ∇L(θ + ε) orthogonal to the clean gradient g, computed on the full
    (two-pass) steps and reused on the k − 1 one-pass steps after them ([`looksam_reuse_`]). Whole vectors, as in
    the paper; `pytorch_optimizer.LookSAM` (4.1.0, `second_step`) projects each parameter tensor on its own, which
    is the same thing for a model with one parameter tensor. g = 0 gives g_v = g̃. Both inputs in the same units.
    """
    gt = [_at_least_fp32(t) for t in perturbed]
    g_sq = float(total_norm(clean)) ** 2
    coef = float(_dot(clean, gt)) / g_sq if g_sq > 0 else 0.0
    return list(torch._foreach_add(gt, list(clean), alpha=-coef))


def looksam_reuse_(grads: Sequence[Tensor], gv: Sequence[Tensor], alpha: float) -> None:
    """LookSAM between full steps, in place: g ← g + α (‖g‖ / ‖g_v‖) g_v (Liu et al., CVPR 2022, Alg. 1).

    g is this step's one-pass gradient at θ (any units: the correction scales with ‖g‖, and g_v enters only by its
    direction); g_v from the last full step ([`looksam_orthogonal`]). A zero g_v leaves g unchanged.
    """
    gv_norm = float(total_norm(gv))
    if not gv_norm > 0:
        return
    coef = alpha * float(total_norm(grads)) / gv_norm
    for p_grad, v in zip(grads, gv, strict=True):
        p_grad.add_(v.to(p_grad.dtype), alpha=coef)


def wsam_descent_(perturbed: Sequence[Tensor], clean: Sequence[Tensor], gamma: float, decouple: bool) -> list[Tensor]:
    """WSAM's descent from g̃ = ∇L(θ + ε) and g = ∇L(θ), with the sharpness weight a = γ / (1 − γ) (Yue et al.,
    KDD 2023, Alg. 1; `pytorch_optimizer.WSAM` 4.1.0, `_mix_gradients`).

    The loss L(θ) + a·(max_ε L(θ + ε) − L(θ)) has the gradient g + a(g̃ − g). `decouple=False`: `perturbed` becomes
    that gradient in place, and `[]` is returned. `decouple=True` (the paper's algorithm): `perturbed` becomes g, for
    the base optimizer, and the sharpness term a(g̃ − g) (fp32, in the units of the inputs) is returned, to be
    applied after the optimizer step as θ ← θ − lr·a(g̃ − g).
    """
    a = gamma / (1.0 - gamma)
    gt = [_at_least_fp32(t) for t in perturbed]
    sharp = list(torch._foreach_sub(gt, list(clean)))  # g̃ − g
    if decouple:
        torch._foreach_mul_(sharp, a)
        for p_grad, c in zip(perturbed, clean, strict=True):
            p_grad.copy_(c)
        return sharp
    for p_grad, s in zip(perturbed, sharp, strict=True):
        p_grad.add_(s.to(p_grad.dtype), alpha=a - 1.0)  # g̃ + (a − 1)(g̃ − g) = g + a(g̃ − g)
    return []


_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def batchnorm_buffers(module: nn.Module) -> list[Tensor]:
    """The running statistics of every BatchNorm layer (`running_mean`, `running_var`, `num_batches_tracked`)."""
    out: list[Tensor] = []
    for m in module.modules():
        if isinstance(m, _BN_TYPES):
            out.extend(b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None)
    return out
