"""LoRA-aware sharpness at one pass per step: Flat-LoRA's filtered noise on the merged weight, Bi-LoRA's auxiliary
adversarial adapter (`docs/guides/peft.md`).

Both act on the LoRA layers of a PEFT model, recognised by their attributes (`base_layer`, `lora_A`, `lora_B`,
`scaling`, `active_adapters`: `peft.tuners.lora.LoraLayer`), so this module imports no PEFT. Neither touches a frozen
base weight W: during the step's one pass, each LoRA layer's base layer runs a forward of its own ([`lora_forwards`])
that adds the perturbation to the weight used in that forward (Flat-LoRA) or to its output (Bi-LoRA), and the base
layer's own forward is back on exit. W stays bit-identical and no copy of it is kept.

Pure torch.
"""

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LoRALayer",
    "NoisePlan",
    "bi_lora_ascent",
    "bi_lora_init",
    "flat_lora_noise",
    "flat_lora_plan",
    "flat_lora_sigma",
    "lora_forwards",
    "lora_layers",
    "mean_over_ranks",
    "merged_weight",
    "noise_seed",
]

_MASK63 = (1 << 63) - 1


@dataclass(frozen=True)
class LoRALayer:
    """One PEFT LoRA layer whose base layer is a full-precision linear map.

    Args:
        name (`str`): the module's name in the model.
        module (`nn.Module`): the PEFT LoRA layer (read by attribute).
        base (`nn.Module`): its base layer (`torch.nn.Linear`, or transformers' `Conv1D`, whose weight is stored
            transposed: `fan_in_fan_out`).
        fan_in_fan_out (`bool`): the base weight is stored (in, out).
        adapters (`tuple[tuple[str, str], ...]`): (`lora_A` weight name, `lora_B` weight name) in the model, per active
            adapter.
    """

    name: str
    module: Any  # duck-typed PEFT LoraLayer
    base: Any
    fan_in_fan_out: bool
    adapters: tuple[tuple[str, str], ...]

    def weight(self) -> Tensor:
        """The base weight W as (out, in) (a view; never written)."""
        w: Tensor = self.base.weight
        return w.t() if self.fan_in_fan_out else w

    def active(self) -> list[str]:
        lora_a = self.module.lora_A
        return [a for a in self.module.active_adapters if a in lora_a]


def _is_lora_layer(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("base_layer", "lora_A", "lora_B", "scaling", "active_adapters"))


def lora_layers(module: nn.Module, mode: str) -> list[LoRALayer]:
    """The LoRA layers of `module` that `mode` perturbs, in model order; every other case refused by name.

    Raises:
        `ValueError`: naming `sam_mode` when the model has no LoRA layer, a LoRA layer is not on a linear map
            (embedding, convolution), or its base weight is quantized (QLoRA: bitsandbytes, GPTQ, ...).
    """
    names = {id(p): n for n, p in module.named_parameters()}
    layers: list[LoRALayer] = []
    for name, found in module.named_modules():
        if not _is_lora_layer(found):
            continue
        m: Any = found
        base = m.get_base_layer() if hasattr(m, "get_base_layer") else m.base_layer
        weight = getattr(base, "weight", None)
        kind = f"{type(base).__module__}.{type(base).__qualname__}"
        quantized = (
            not isinstance(weight, Tensor)
            or not weight.is_floating_point()
            or type(weight) not in (Tensor, nn.Parameter)
            or kind.startswith(("bitsandbytes", "auto_gptq", "gptqmodel", "hqq", "awq", "torchao"))
        )
        if quantized:
            raise ValueError(
                f"Invalid sam_mode={mode!r} with the quantized base layer {name!r} ({kind}): {mode} perturbs the "
                "full-precision merged weight W + s·BA, and a QLoRA-style base weight is stored in quantized blocks "
                "that its forward dequantizes on the fly, so there is no W to perturb without a dequantized copy per "
                "layer and step. Load the base model unquantized, or use sam_mode='sam' (SAM on the adapter)."
            )
        assert isinstance(weight, Tensor)
        if (type(base) is not nn.Linear and type(base).__name__ != "Conv1D") or weight.dim() != 2:
            raise ValueError(
                f"Invalid sam_mode={mode!r} with the LoRA layer {name!r} on {kind}: {mode} is defined for LoRA on "
                "linear layers (torch.nn.Linear, transformers' Conv1D). Leave this module out of target_modules, or "
                "use sam_mode='sam'."
            )
        adapters = tuple(
            (names[id(m.lora_A[a].weight)], names[id(m.lora_B[a].weight)])
            for a in m.active_adapters
            if a in m.lora_A and id(m.lora_A[a].weight) in names
        )
        layers.append(LoRALayer(name, m, base, bool(getattr(m, "fan_in_fan_out", False)), adapters))
    if not layers:
        raise ValueError(
            f"Invalid sam_mode={mode!r}: the model has no LoRA layer. {mode} perturbs LoRA-adapted weights; wrap the "
            "model with peft.get_peft_model(model, LoraConfig(...)) first, or choose another sam_mode."
        )
    return layers


def merged_weight(layer: LoRALayer) -> Tensor:
    """W + Σ_a s_a·B_a A_a over the active adapters, (out, in), fp32 (Flat-LoRA's `data`, `logTrainer.py`)."""
    m = layer.module
    with torch.no_grad():
        merged = layer.weight().float().clone()
        for a in layer.active():
            merged.addmm_(m.lora_B[a].weight.float(), m.lora_A[a].weight.float(), alpha=float(m.scaling[a]))
    return merged


# ---------------------------------------------------------------------------------------------- Flat-LoRA


def flat_lora_sigma(rho: float, step: int, ramp_steps: int) -> float:
    """σ_t = ρ·½(1 − cos(π·min(t/T, 1))): Flat-LoRA's cosine ramp from 0 to ρ over training.

    Li et al., ICML 2025 (arXiv 2409.14396), public code `github.com/nblt/Flat-LoRA`, `logTrainer.py:FlatLoraTrainer.
    training_step` (`factor = 0.5 * (1 - cos(counter / cnt * pi))`, counted there in micro-batches over the whole
    run; here in optimizer steps t over T = `flat_lora_ramp_steps`, held at ρ after T).
    """
    frac = min(max(step / ramp_steps, 0.0), 1.0)
    return rho * 0.5 * (1.0 - math.cos(math.pi * frac))


def noise_seed(seed: int, step: int, index: int) -> int:
    """The seed of layer `index`'s noise at optimizer step `step` of a run seeded `seed` (a pure function, so a
    resumed run draws the same noise as the uninterrupted one; the reference seeds from the clock)."""
    x = ((seed & 0xFFFFFFFF) << 31) ^ (step & 0x7FFFFFFF) ^ ((index + 1) * 0x9E3779B97F4A7C15)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK63
    return ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK63


@dataclass(frozen=True)
class NoisePlan:
    """One step's Flat-LoRA noise, as seeds and per-row standard deviations (the noise itself is drawn in the forward
    and again in the backward, never stored).

    Args:
        seeds (`list[int]`): per layer, [`noise_seed`].
        stds (`list[Tensor]`): per layer, (out, 1) fp32: σ_t·‖row of (W + sBA)‖/√n.
        sigma (`float`): σ_t.
    """

    seeds: list[int]
    stds: list[Tensor]
    sigma: float


def flat_lora_plan(layers: Sequence[LoRALayer], sigma: float, seed: int, step: int) -> NoisePlan:
    """The noise of one step: std of row i = σ_t·‖(W + sBA)_i‖₂/√n, n = in_features (filter-wise noise).

    `logTrainer.py`: `filter_norm = factor * (rho + 1e-16) / sqrt(data.shape[1]) * norm(data, dim=1)`, with `data`
    the merged weight at the step's start.
    """
    stds = []
    for layer in layers:
        merged = merged_weight(layer)
        rows = torch.linalg.vector_norm(merged, dim=1, keepdim=True)
        stds.append((sigma + 1e-16) / math.sqrt(merged.shape[1]) * rows)
    return NoisePlan([noise_seed(seed, step, i) for i in range(len(layers))], stds, sigma)


def flat_lora_noise(std: Tensor, in_features: int, seed: int) -> Tensor:
    """The (out, in) fp32 noise N(0, std²) of one layer, from its seed (on `std`'s device)."""
    g = torch.Generator(device=std.device)
    g.manual_seed(seed)
    return torch.randn((std.shape[0], in_features), generator=g, device=std.device, dtype=torch.float32).mul_(std)


class _NoisyLinear(torch.autograd.Function):
    """y = x (W + ξ)ᵀ + b with ξ drawn from its seed in the forward and drawn again in the backward: no copy of W + ξ
    is kept between the two (memory as the plain layer)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, std: Tensor, seed: int, transposed: bool
    ) -> Tensor:
        w = weight.t() if transposed else weight
        noisy = flat_lora_noise(std, w.shape[1], seed).add_(w).to(w.dtype)  # ξ + W: one buffer
        ctx.save_for_backward(x if weight.requires_grad else None, weight, std)
        ctx.seed, ctx.transposed, ctx.x_dtype, ctx.has_bias = seed, transposed, x.dtype, bias is not None
        return F.linear(x, noisy, bias)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, std = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w = weight.t() if ctx.transposed else weight
            noisy = flat_lora_noise(std, w.shape[1], ctx.seed).add_(w).to(gy.dtype)
            grad_x = (gy @ noisy).to(ctx.x_dtype)
        flat = gy.reshape(-1, gy.shape[-1])
        if ctx.needs_input_grad[1]:
            gw = flat.t().to(x.dtype) @ x.reshape(-1, x.shape[-1])
            grad_w = (gw.t() if ctx.transposed else gw).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat.sum(0)
        return grad_x, grad_w, grad_b, None, None, None


def _noisy_forward(layer: LoRALayer, std: Tensor, seed: int) -> Callable[..., Tensor]:
    base = layer.base

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        y: Tensor = _NoisyLinear.apply(x, base.weight, base.bias, std, seed, layer.fan_in_fan_out)  # type: ignore[no-untyped-call]
        return y

    return forward


@contextmanager
def lora_forwards(layers: Sequence[LoRALayer], forwards: Sequence[Callable[..., Tensor]]) -> Iterator[None]:
    """Run each layer's base layer with `forwards[i]` inside the block; its own forward is back on exit (an instance
    forward set by someone else, e.g. an offloading hook, too)."""
    saved = [vars(layer.base).get("forward") for layer in layers]
    for layer, fn in zip(layers, forwards, strict=True):
        layer.base.forward = fn
    try:
        yield
    finally:
        for layer, old in zip(layers, saved, strict=True):
            if old is None:
                del layer.base.forward
            else:
                layer.base.forward = old


def noisy_forwards(layers: Sequence[LoRALayer], plan: NoisePlan) -> list[Callable[..., Tensor]]:
    """Flat-LoRA's forwards: W + ξ in the base layer's matmul, ξ ~ N(0, std²) per row, from the plan's seeds."""
    return [_noisy_forward(layer, std, s) for layer, std, s in zip(layers, plan.stds, plan.seeds, strict=True)]


# ---------------------------------------------------------------------------------------------- Bi-LoRA


def bi_lora_init(layers: Sequence[LoRALayer], rho: float, seed: int) -> dict[str, Tensor]:
    """The auxiliary adapter at the start: per primary LoRA factor, a tensor of its shape, fp32; A₂ random with
    ‖(A₂, B₂)‖ = ρ, B₂ = 0, so the perturbation s·B₂A₂ starts at zero (LoRA's own initialisation) and the first
    ascent moves B₂. Keyed by the primary factor's parameter name (the SAM state's convention)."""
    g = torch.Generator()
    g.manual_seed(noise_seed(seed, 0, -2))
    out: dict[str, Tensor] = {}
    for layer in layers:
        m = layer.module
        for a, (name_a, name_b) in zip(layer.active(), layer.adapters, strict=True):
            wa, wb = m.lora_A[a].weight, m.lora_B[a].weight
            out[name_a] = torch.randn(wa.shape, generator=g, dtype=torch.float32).to(wa.device)
            out[name_b] = torch.zeros(wb.shape, dtype=torch.float32, device=wb.device)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in out.values()]))
    for t in out.values():
        t.mul_(rho / float(norm))
    return out


def bi_lora_ascent(aux: Sequence[Tensor], grads: Sequence[Tensor], lr: float, rho: float) -> list[Tensor]:
    """One ascent step of the auxiliary adapter and its projection onto the ρ-ball (out of place, fp32):
    θ₂ ← Π_ρ(θ₂ + η₂·g₂/‖g₂‖), Π_ρ(u) = u·min(1, ρ/‖u‖), norms over all auxiliary factors together.

    Liu et al., ICLR 2026 (arXiv 2508.19564): the auxiliary module follows normalized gradient ascent and stays in a
    ρ-ball, so that s·B₂A₂ plays SAM's ε = ρ·g/‖g‖.
    """
    g32 = [g.detach().float() for g in grads]
    aux = [a.detach() for a in aux]
    gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in g32]))
    step = lr / (gnorm + 1e-12)
    moved = [a.float() + step * g for a, g in zip(aux, g32, strict=True)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in moved]))
    shrink = torch.clamp(rho / (norm + 1e-12), max=1.0)
    return [t * shrink for t in moved]


def mean_over_ranks(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The mean of `tensors` over the ranks of the default process group, in one all-reduce (themselves on one
    process). The auxiliary adapter is not a model parameter, so DDP does not reduce its gradient: this does, so that
    every rank takes the same ascent, that of one process on the union batch."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(tensors)
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].view(t.shape))
        start += t.numel()
    return out


def _aux_forward(layer: LoRALayer, pairs: list[tuple[Tensor, Tensor, float]]) -> Callable[..., Tensor]:
    base, own = layer.base, type(layer.base).forward

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        y: Tensor = own(base, x, *args, **kwargs)
        for a2, b2, scaling in pairs:
            y = y + F.linear(F.linear(x.to(a2.dtype), a2), b2).to(y.dtype) * scaling
        return y

    return forward


def aux_forwards(layers: Sequence[LoRALayer], aux: dict[str, Tensor]) -> list[Callable[..., Tensor]]:
    """Bi-LoRA's forwards: the base layer's output plus s·B₂(A₂x) per active adapter (the auxiliary module's own
    branch, beside the primary adapter's, as the paper's W₀ + B₁A₁ + B₂A₂)."""
    out = []
    for layer in layers:
        m = layer.module
        pairs = [
            (aux[name_a], aux[name_b], float(m.scaling[a]))
            for a, (name_a, name_b) in zip(layer.active(), layer.adapters, strict=True)
        ]
        out.append(_aux_forward(layer, pairs))
    return out
