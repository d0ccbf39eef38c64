"""The curvature problem of one LLQR update: the gradient g and the product v ↦ (G_D + λI)·v (`docs/algorithm.md`
§3–4).

With rows r = 1…N that count (valid targets; all rows with `include_pad_rows`), p_r = softmax(z_r),
F_r = diag(p_r) − p_r p_rᵀ and J_r = ∂z_r/∂θ:

| divergence            | G_D                                 | product                          |
|-----------------------|-------------------------------------|----------------------------------|
| `newton`              | ∇²ℓ (Hessian of the mean loss)      | double backward (HVP)            |
| `ngd`, scaling `sum`  | Σ_r J_rᵀ F_r J_r                    | double-VJP GGN product, s = 1    |
| `ngd`, scaling `mean` | (1/N) Σ_r J_rᵀ F_r J_r              | s = 1/N                          |
| `renyi` (order α)     | (α/N) Σ_r J_rᵀ F_r J_r              | s = α/N                          |
| `reverse_kl`          | Σ_r J_rᵀ F_r J_r                    | s = 1 (alias of ngd/sum)         |

ℓ is the training loss: label-smoothed cross-entropy, **mean** over the valid targets (`labels == -100` ignored).

Execution context (`docs/algorithm.md` §4.2, `docs/integration.md` §5.4): every module in eval mode (restored
afterwards),
`torch.autocast(enabled=False)`, `type(model).forward(model, **batch)` (bypasses instance-level autocast wrappers),
the MATH SDPA kernel (the fused kernels have no double backward), the global RNG forked, and
`torch.autograd.grad` only, so no `p.grad` is touched.

Everything is computed as sums over rows and scaled by the global N at the end, which makes chunking
(`chunk_size`, `docs/algorithm.md` §4.5) and sharding over processes (§5.6) exact.
"""

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import LLQRConfig
from .layout import trainable_parameters

__all__ = ["Extractor", "curvature_context", "curvature_problem", "logits_and_targets"]

TensorDict = dict[str, Tensor]
Extractor = Callable[[nn.Module, Mapping[str, Any]], tuple[Tensor, Tensor, Tensor]]


def logits_and_targets(
    model: nn.Module, batch: Mapping[str, Any], shift_labels: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the model without its own loss and flatten its output to rows (`docs/integration.md` §5.3).

    `labels` is popped before the forward, so the model computes no loss. Logits `(B, C)` with labels `(B,)`, or
    `(B, T, V)` with labels `(B, T)`; `shift_labels=True` pairs position t with label t + 1 (causal LMs).

    Args:
        model (`nn.Module`): called as `type(model).forward(model, **batch)`; returns a tensor of logits, or a dict
            or `ModelOutput` with `logits`. Anything else (a tuple, a regression output) raises a `ValueError`.
        batch (`Mapping[str, Any]`): model inputs plus `labels`.
        shift_labels (`bool`, *optional*, defaults to `False`): shift by one for causal LMs.

    Returns:
        `tuple[Tensor, Tensor, Tensor]`: logits `(rows, C)`, targets `(rows,)`, row mask `(rows,)` (targets ≠ −100).
    """
    inputs = dict(batch)
    labels = inputs.pop("labels")
    out = type(model).forward(model, **inputs)
    logits = out if isinstance(out, Tensor) else out.get("logits") if isinstance(out, Mapping) else None
    if logits is None and not isinstance(out, (Mapping, tuple, list)):
        logits = getattr(out, "logits", None)
    integer_labels = isinstance(labels, Tensor) and not labels.is_floating_point()
    if not isinstance(logits, Tensor) or logits.dim() < 2 or not integer_labels:
        kind = type(out).__name__ if not isinstance(logits, Tensor) else f"logits of shape {tuple(logits.shape)}"
        kind += "" if integer_labels else " with non-integer labels"
        raise ValueError(
            f"Invalid model output for the LLQR curvature: {type(model).__name__} returned {kind}, but LLQR needs "
            "class logits (a tensor, a dict or a ModelOutput with 'logits', shaped (batch, classes) or (batch, time, "
            "vocab)) and integer labels: its Fisher/GGN is that of a softmax cross-entropy. Return logits, or "
            "override `llqr_logits_and_targets` (the Trainer) / pass extractor= (hf_llqrsam.SAM) to map the output."
        )
    if shift_labels:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    targets = labels.reshape(-1)
    return logits.reshape(-1, logits.shape[-1]), targets, targets != -100


@contextlib.contextmanager
def curvature_context(model: nn.Module) -> Iterator[None]:
    """Eval mode, fp32, MATH SDPA kernel, grad enabled and a forked RNG; restores every module's mode on exit."""
    modes = [(m, m.training) for m in model.modules()]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    accel = [device] if device.type not in ("cpu", "meta") else []
    try:
        with (
            torch.random.fork_rng(devices=accel, device_type=device.type if accel else "cuda"),
            torch.enable_grad(),
            torch.autocast(device.type, enabled=False),
            sdpa_kernel(SDPBackend.MATH),
        ):
            model.eval()
            yield
    finally:
        for m, training in modes:
            m.training = training


def _grads(outputs: Any, params: Sequence[Tensor], **kwargs: Any) -> list[Tensor]:
    """`torch.autograd.grad` with zeros for parameters the outputs do not depend on."""
    got = torch.autograd.grad(outputs, params, allow_unused=True, **kwargs)
    return [torch.zeros_like(p) if t is None else t for p, t in zip(params, got, strict=True)]


class _Piece:
    """One forward pass over (a chunk of) the curvature batch, with the graph its products need.

    Every quantity here is an unnormalised sum over rows: the loss numerator Σ_r CE_r, its gradient, the row
    count, and the product Σ_r J_rᵀF_rJ_r v (GGN) or ∇²(Σ_r CE_r) v (Newton).
    """

    def __init__(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        params: Sequence[Tensor],
        extractor: Extractor,
        newton: bool,
        label_smoothing: float,
        include_pad_rows: bool,
        pad_token_id: int | None,
        products: bool,
    ) -> None:
        self.params = list(params)
        logits, targets, valid = extractor(model, batch)
        # logits: (rows, C); targets, valid: (rows,)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if include_pad_rows:
            counted = torch.ones_like(valid)
            if pad_token_id is not None:  # the reference's "predict pad" targets (`docs/algorithm.md` §4.1)
                targets = torch.where(valid, targets, torch.full_like(targets, pad_token_id))
                valid = counted
        else:
            counted = valid
        self.count = counted.sum()
        self.rows = int(targets.numel())
        logp = torch.log_softmax(logits, dim=-1)
        nll = -logp.gather(1, targets.clamp_min(0)[:, None]).squeeze(1)
        if label_smoothing > 0:  # target (1 − ε)·onehot + ε/C
            nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(dim=-1)
        loss_sum = torch.where(valid, nll, torch.zeros_like(nll)).sum()
        # rows whose loss term is NaN/±Inf, counted or not: masking them cannot help, 0·NaN = NaN in the backward
        self.nonfinite_rows = (~torch.isfinite(nll.detach())).sum()
        self.newton = newton
        if newton:
            g_graph = torch.autograd.grad(loss_sum, self.params, create_graph=products, allow_unused=True)
            self.g_sum = [
                torch.zeros_like(p) if t is None else t.detach() for p, t in zip(params, g_graph, strict=True)
            ]
            self._hess = [(i, t) for i, t in enumerate(g_graph) if t is not None and t.requires_grad]
            return
        self.g_sum = _grads(loss_sum, self.params, retain_graph=products)
        if not products:
            return
        self.logits = logits
        self.p = torch.softmax(logits.detach(), dim=-1)
        self.p_counted = counted.to(logits.dtype)[:, None] * self.p  # m_r·p_r, built once
        # Jv by the double-VJP trick: Jᵀw0 is linear in the dummy w0, so differentiating it w.r.t. w0 gives J.
        self.w0 = torch.zeros_like(logits, requires_grad=True)
        jt = torch.autograd.grad(logits, self.params, grad_outputs=self.w0, create_graph=True, allow_unused=True)
        self._jt = [(i, t) for i, t in enumerate(jt) if t is not None and t.requires_grad]

    def product(self, v: Sequence[Tensor]) -> list[Tensor]:
        if self.newton:
            if not self._hess:
                return [torch.zeros_like(p) for p in self.params]
            return _grads(
                [t for _, t in self._hess], self.params, grad_outputs=[v[i] for i, _ in self._hess], retain_graph=True
            )
        if not self._jt:
            return [torch.zeros_like(p) for p in self.params]
        (jv,) = torch.autograd.grad(
            [t for _, t in self._jt], self.w0, grad_outputs=[v[i] for i, _ in self._jt], retain_graph=True
        )
        # F_r (J v)_r = p ⊙ Jv − p (pᵀ Jv) = p ⊙ (Jv − pᵀJv), rows that count only: four passes over (rows, C),
        # two of them in place on the fresh Jv (the same values as out of place, one (rows, C) buffer fewer each)
        u = jv.sub_((self.p * jv).sum(dim=-1, keepdim=True)).mul_(self.p_counted)
        return _grads(self.logits, self.params, grad_outputs=u, retain_graph=True)


def _split(batch: Mapping[str, Any], chunk_size: int) -> list[dict[str, Any]]:
    """Split every tensor whose leading dim is the batch size into chunks of `chunk_size` examples."""
    size = batch["labels"].shape[0]
    chunks = []
    for start in range(0, size, chunk_size):
        chunks.append(
            {
                k: v[start : start + chunk_size] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == size else v
                for k, v in batch.items()
            }
        )
    return chunks


def _all_reduce_(tensors: list[Tensor], all_reduce: Callable[[Tensor], Tensor] | None = None) -> None:
    """Σ over ranks of every tensor in place, as one collective on their concatenation (`all_reduce`, or
    `torch.distributed.all_reduce` when it is not given)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if all_reduce is None:
        dist.all_reduce(flat)
    else:
        flat = all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def curvature_problem(
    model: nn.Module,
    batch: Mapping[str, Any],
    config: LLQRConfig | None = None,
    *,
    shift_labels: bool = False,
    extractor: Extractor | None = None,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
    pad_token_id: int | None = None,
    diagnostics: dict[str, Tensor] | None = None,
) -> tuple[TensorDict, Callable[[Mapping[str, Tensor]], TensorDict]]:
    """Build g = ∇ℓ and v ↦ (G_D + λI)·v on the curvature batch, once per LLQR update (`docs/algorithm.md` §4).

    The graph of the forward pass is retained, so each product costs two or three backward passes and no
    forward (unless `config.chunk_size` is set).

    Args:
        model (`nn.Module`): the unwrapped eager model; only its `requires_grad` parameters are θ.
        batch (`Mapping[str, Any]`): model inputs plus `labels` (−100 = ignored).
        config (`LLQRConfig`, *optional*, defaults to `LLQRConfig()`): reads `divergence` (`ngd`, `newton`, `renyi`
            or `reverse_kl`), `damping` (λ), `ngd_scaling` (`sum`, the reference, or `mean`; `ngd` only),
            `renyi_alpha` (α of `renyi`), `label_smoothing` (ε_ls of the training loss, not in the Fisher),
            `include_pad_rows` (count `-100` rows in N and in the Fisher, as the reference; their targets are
            `pad_token_id` when given, else they add nothing to the loss numerator), `chunk_size` (recompute the
            forward per chunk of this many examples on every product instead of retaining the whole graph; exact,
            `docs/algorithm.md` §4.5) and `curvature_sharding` (`sharded`: the batch is this process's shard, and N,
            g and every product are all-reduced when a process group is initialised, `docs/algorithm.md` §5.6).
        shift_labels (`bool`, *optional*, defaults to `False`): causal-LM shift in the default extractor (the resolved
            value of `config.shift_labels`, which the caller decides from the model).
        extractor (`Callable`, *optional*): `(model, batch) -> (logits, targets, row_mask)`; defaults to
            [`logits_and_targets`]. It runs inside the fp32/eval/MATH context.
        all_reduce (`Callable`, *optional*): with `curvature_sharding="sharded"`, the sum over ranks `t ↦ Σ_ranks t`
            (returning the result, in place or not); the trainer passes Accelerate's `reduce`, this module never
            imports it. Defaults to `torch.distributed.all_reduce`.
        pad_token_id (`int`, *optional*): target of pad rows with `include_pad_rows` (ignored without it).
        diagnostics (`dict`, *optional*): filled with 0-dim long tensors (no host sync), summed over chunks and
            processes: `"rows"`, every row of the batch, and `"nonfinite_rows"`, rows whose loss term is NaN/±Inf
            (a non-finite logit, or a NaN input). One such row makes g non-finite even when it is masked: the
            backward multiplies its zero weight by its NaN activations.

    Returns:
        `tuple[dict, Callable]`: g as {canonical name: tensor} and the function v ↦ (G_D + λI)·v on such dicts.

    Raises:
        `ValueError`: naming `LLQRConfig.divergence` or `LLQRConfig.ngd_scaling` and the allowed values.
    """
    cfg = config if config is not None else LLQRConfig()
    match cfg.divergence:
        case "newton":
            newton = True
        case "ngd" | "renyi" | "reverse_kl":
            newton = False
        case _:
            raise ValueError(
                f"Invalid LLQRConfig.divergence={cfg.divergence!r}. Must be 'ngd', 'newton', 'renyi' or 'reverse_kl'."
            )
    if cfg.ngd_scaling not in ("sum", "mean"):
        raise ValueError(f"Invalid LLQRConfig.ngd_scaling={cfg.ngd_scaling!r}. Must be 'sum' or 'mean'.")
    sharded = cfg.curvature_sharding == "sharded" and dist.is_available() and dist.is_initialized()
    damping, chunk_size = cfg.damping, cfg.chunk_size
    named = trainable_parameters(model)
    names = [n for n, _ in named]
    params = [p for _, p in named]
    extract = extractor if extractor is not None else partial(logits_and_targets, shift_labels=shift_labels)
    piece = partial(
        _Piece,
        model,
        params=params,
        extractor=extract,
        newton=newton,
        label_smoothing=cfg.label_smoothing,
        include_pad_rows=cfg.include_pad_rows,
        pad_token_id=pad_token_id,
    )
    chunks = None if chunk_size is None else _split(batch, chunk_size)
    whole: _Piece | None = None
    if chunks is None:
        with curvature_context(model):
            whole = piece(batch, products=True)
        g_sum, count, bad = whole.g_sum, whole.count, whole.nonfinite_rows
        rows = torch.tensor(whole.rows, device=count.device)
    else:
        g_sum = [torch.zeros_like(p) for p in params]
        count = torch.zeros((), dtype=torch.long, device=params[0].device)
        bad, rows = torch.zeros_like(count), torch.zeros_like(count)
        for chunk in chunks:
            with curvature_context(model):
                part = piece(chunk, products=False)
            torch._foreach_add_(g_sum, part.g_sum)
            count, bad, rows = count + part.count, bad + part.nonfinite_rows, rows + part.rows
    if sharded:
        _all_reduce_([*g_sum, count, bad, rows], all_reduce)
    if diagnostics is not None:
        diagnostics.update(rows=rows, nonfinite_rows=bad)
    n_rows = max(int(count), 1)
    g_list = torch._foreach_div(g_sum, float(n_rows))

    match cfg.divergence:
        case "newton":
            scale = 1.0 / n_rows  # Hessian of the mean loss
        case "renyi":
            scale = cfg.renyi_alpha / n_rows
        case "ngd" if cfg.ngd_scaling == "mean":
            scale = 1.0 / n_rows
        case _:
            scale = 1.0  # ngd/sum and reverse_kl: Σ_r J_rᵀ F_r J_r (reference)

    def gv(v: Mapping[str, Tensor]) -> TensorDict:
        vs = [v[n].to(p.dtype) for n, p in zip(names, params, strict=True)]
        with torch.enable_grad(), torch.autocast(params[0].device.type, enabled=False):
            if whole is not None:
                acc = whole.product(vs)
            else:
                acc = [torch.zeros_like(p) for p in params]
                for chunk in chunks or []:
                    with curvature_context(model):
                        part = piece(chunk, products=True)
                        torch._foreach_add_(acc, part.product(vs))
                    del part
        if sharded:
            _all_reduce_(acc, all_reduce)
        out = acc if scale == 1.0 else list(torch._foreach_mul(acc, scale))  # ×1 is exact: skip the pass
        if damping:
            torch._foreach_add_(out, vs, alpha=damping)
        return dict(zip(names, out, strict=True))

    return dict(zip(names, g_list, strict=True)), gv
