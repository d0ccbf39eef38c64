"""The LoRA-aware math (`hf_llqrsam/lora_sam.py`) against hand-written oracles.

Flat-LoRA: the cosine ramp, the per-row noise std of the merged weight, seeds as a pure function of (seed, step),
the forward-time noisy layer (forward and backward) against dense autograd at W + ξ, and the adapter gradient of one
engine pass against the reference's way (ξ added to W in place, on a copy). Bi-LoRA: the ascent and the ρ-ball
projection against the formula written out in float64, the auxiliary branch's gradients against dense autograd at
W + sBA + s·B₂A₂. Rejections: no LoRA layer, a quantized base layer, a LoRA layer that is not linear.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("peft")

from hf_llqrsam.config import SAMConfig
from hf_llqrsam.engine import SAMEngine
from hf_llqrsam.lora_sam import (
    _NoisyLinear,
    aux_forwards,
    bi_lora_ascent,
    bi_lora_init,
    flat_lora_noise,
    flat_lora_plan,
    flat_lora_sigma,
    lora_forwards,
    lora_layers,
    merged_weight,
    noise_seed,
)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 12)
        self.down = nn.Linear(12, 3, bias=False)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _lora_mlp(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = _MLP()
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["up", "down"], init_lora_weights=False)
    return get_peft_model(model, cfg)


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


# ---------------------------------------------------------------------------------------------- Flat-LoRA


@pytest.mark.parametrize(
    ("step", "factor"), [(0, 0.0), (5, 0.5), (10, 1.0), (25, 1.0), (2, (1 - math.cos(0.2 * math.pi)) / 2)]
)
def test_flat_lora_sigma_is_the_cosine_ramp(step, factor):
    assert flat_lora_sigma(0.05, step, 10) == pytest.approx(0.05 * factor, abs=1e-15)


def test_noise_seed_is_a_pure_function_of_seed_step_and_layer():
    seeds = {noise_seed(s, t, i) for s in (0, 1) for t in (0, 1, 2) for i in (0, 1)}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)
    assert noise_seed(7, 3, 1) == noise_seed(7, 3, 1)


def test_noise_has_the_filter_wise_std():
    std = torch.tensor([[0.5], [2.0], [0.0]])
    noise = flat_lora_noise(std, 40000, seed=3)
    assert torch.equal(noise, flat_lora_noise(std, 40000, seed=3))  # drawn again from the seed alone
    assert not torch.equal(noise, flat_lora_noise(std, 40000, seed=4))
    torch.testing.assert_close(noise.std(dim=1), std.squeeze(1), rtol=0.02, atol=0.0)
    assert noise.mean(dim=1).abs().max() < 0.03


def test_plan_std_is_sigma_times_row_norm_of_the_merged_weight_over_sqrt_n():
    model = _lora_mlp()
    layers = lora_layers(model, "flat_lora")
    plan = flat_lora_plan(layers, 0.1, seed=5, step=2)
    for layer, std in zip(layers, plan.stds, strict=True):
        m = layer.module
        w = layer.base.weight.detach().double() + m.scaling["default"] * (
            m.lora_B["default"].weight.double() @ m.lora_A["default"].weight.double()
        )
        expected = 0.1 / math.sqrt(w.shape[1]) * w.pow(2).sum(dim=1, keepdim=True).sqrt()
        torch.testing.assert_close(std.double(), expected, rtol=1e-6, atol=0.0)
    assert plan.seeds == [noise_seed(5, 2, i) for i in range(len(layers))]


@pytest.mark.parametrize("transposed", [False, True])
def test_noisy_linear_matches_dense_autograd_at_w_plus_noise(transposed):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, requires_grad=True)
    w = torch.randn(5, 7) if transposed else torch.randn(7, 5)
    w.requires_grad_(True)
    b = torch.randn(7, requires_grad=True)
    std = torch.rand(7, 1)
    y = _NoisyLinear.apply(x, w, b, std, 11, transposed)
    gy = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy)

    xr, wr, br = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    w_out_in = wr.t() if transposed else wr
    yr = F.linear(xr, w_out_in + flat_lora_noise(std, 5, 11), br)
    rx, rw, rb = torch.autograd.grad(yr, (xr, wr, br), gy)
    torch.testing.assert_close(y, yr, rtol=1e-6, atol=1e-6)
    for a, r in ((gx, rx), (gw, rw), (gb, rb)):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)


def test_noisy_linear_under_bf16_autocast_matches_dense_autograd():
    torch.manual_seed(0)
    x = torch.randn(6, 5, requires_grad=True)
    w, b, std = torch.randn(7, 5), torch.randn(7), torch.rand(7, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _NoisyLinear.apply(x, w, b, std, 2, False)
        xr = x.detach().clone().requires_grad_(True)
        yr = F.linear(xr, w + flat_lora_noise(std, 5, 2), b)
    assert y.dtype == yr.dtype == torch.bfloat16
    torch.testing.assert_close(y, yr, rtol=0, atol=0)
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)
    (rx,) = torch.autograd.grad(yr, xr, gy)
    assert gx.dtype == rx.dtype == torch.float32
    torch.testing.assert_close(gx, rx, rtol=2e-2, atol=2e-2)  # bf16 products, summed in another order


def test_flat_lora_pass_equals_the_reference_in_place_noise():
    """The engine's one pass gives the adapter gradient of the reference (`logTrainer.py`: W += ξ; loss; backward),
    run here on a copy, while the engine's own W stays bit-identical."""
    model = _lora_mlp()
    ref = copy.deepcopy(model)
    x, y = _data()
    cfg = SAMConfig(mode="flat_lora", rho=0.2, flat_lora_ramp_steps=4, seed=9)
    engine = SAMEngine(model, cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    st = engine.begin(3)
    assert st.kind == "one" and engine.ascend(0.2)
    with engine.perturbed(zero_grads=False):
        F.cross_entropy(model(x), y).backward()
    assert engine.descend()
    engine.end()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)

    sigma = 0.2 * 0.5 * (1 - math.cos(math.pi * 3 / 4))
    with torch.no_grad():
        for i, layer in enumerate(lora_layers(ref, "flat_lora")):
            merged = merged_weight(layer)
            std = (sigma + 1e-16) / math.sqrt(merged.shape[1]) * merged.norm(dim=1, keepdim=True)
            layer.base.weight.add_(flat_lora_noise(std, merged.shape[1], noise_seed(9, 3, i)))
    F.cross_entropy(ref(x), y).backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert set(got) == set(want) and got
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- Bi-LoRA


def test_bi_lora_ascent_and_projection_match_the_formula():
    torch.manual_seed(0)
    aux = [torch.randn(2, 6), torch.randn(12, 2)]
    grads = [torch.randn(2, 6), torch.randn(12, 2)]
    for lr, rho in ((0.3, 100.0), (0.3, 0.5), (2.0, 1.0)):
        got = bi_lora_ascent(aux, grads, lr, rho)
        # by hand, in float64: u = θ + lr g / ‖g‖; Π(u) = u·min(1, ρ/‖u‖)
        gnorm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
        u = [a.double() + lr * g.double() / gnorm for a, g in zip(aux, grads, strict=True)]
        unorm = math.sqrt(sum(float((t**2).sum()) for t in u))
        want = [t * min(1.0, rho / unorm) for t in u]
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-7)
        norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in got))
        assert norm <= rho * (1 + 1e-6)
        if rho == 100.0:  # inside the ball: no projection
            assert norm < rho


def test_bi_lora_init_is_in_the_ball_with_a_zero_perturbation():
    model = _lora_mlp()
    layers = lora_layers(model, "bi_lora")
    aux = bi_lora_init(layers, 0.3, seed=1)
    params = dict(model.named_parameters())
    assert set(aux) == {n for layer in layers for pair in layer.adapters for n in pair}
    assert all(aux[n].shape == params[n].shape for n in aux)
    assert math.sqrt(sum(float((t.double() ** 2).sum()) for t in aux.values())) == pytest.approx(0.3, rel=1e-6)
    assert all(not aux[b].any() for layer in layers for _, b in layer.adapters)  # B₂ = 0: ε = s·B₂A₂ = 0
    assert all(torch.equal(aux[n], bi_lora_init(layers, 0.3, seed=1)[n]) for n in aux)


def test_bi_lora_branch_gradients_match_dense_autograd():
    """Adapter and auxiliary gradients of the pass with the auxiliary branch equal dense autograd with W replaced by
    W + s·BA + s·B₂A₂ (B₂, A₂ leaves)."""
    model = _lora_mlp()
    layers = lora_layers(model, "bi_lora")
    g = torch.Generator().manual_seed(3)
    aux = {n: torch.randn(t.shape, generator=g).requires_grad_(True) for n, t in bi_lora_init(layers, 1.0, 0).items()}
    x, y = _data()
    with lora_forwards(layers, aux_forwards(layers, aux)):
        F.cross_entropy(model(x), y).backward()
    frozen = {n: p.detach() for n, p in model.named_parameters()}

    # dense oracle: the same MLP with merged weights as functions of the factors
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad}
    aux_ref = {n: t.detach().clone().requires_grad_(True) for n, t in aux.items()}

    def weight(layer):
        (na, nb), s = layer.adapters[0], layer.module.scaling["default"]
        w = frozen[f"{layer.name}.base_layer.weight"]
        return w + s * params[nb] @ params[na] + s * aux_ref[nb] @ aux_ref[na]

    up, down = layers
    h = torch.tanh(F.linear(x, weight(up), frozen[f"{up.name}.base_layer.bias"]))
    F.cross_entropy(F.linear(h, weight(down)), y).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, params[n].grad, rtol=1e-5, atol=1e-7)
    for n, t in aux.items():
        torch.testing.assert_close(t.grad, aux_ref[n].grad, rtol=1e-5, atol=1e-7)
    assert all("forward" not in vars(layer.base) for layer in layers)  # the base layers' own forward is back


def test_bi_lora_engine_step_commits_the_projected_ascent():
    model = _lora_mlp()
    x, y = _data()
    cfg = SAMConfig(mode="bi_lora", rho=0.05, bi_lora_lr=0.02, seed=4)
    engine = SAMEngine(model, cfg)
    start = bi_lora_init(engine.lora, 0.05, 4)
    engine.begin(0)
    engine.ascend(0.05)
    leaves = engine._lora_step
    with engine.perturbed(zero_grads=False):
        F.cross_entropy(model(x), y).backward()
    grads = [leaves[n].grad for n in start]
    assert engine.descend()
    engine.end()
    stored = engine.state.buffers["aux"]
    assert all(not t.requires_grad and t.grad_fn is None for t in stored.values())  # no graph kept in the state
    # by hand, in float64: θ₂ ← Π_ρ(θ₂ + η₂ g₂/‖g₂‖) over all auxiliary factors together, ρ = 0.05, η₂ = 0.02
    gnorm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    u = {n: start[n].double() + 0.02 * g.double() / gnorm for n, g in zip(start, grads, strict=True)}
    unorm = math.sqrt(sum(float((t**2).sum()) for t in u.values()))
    assert unorm > 0.05  # the ball is active here: the projection is exercised
    for n, t in u.items():
        torch.testing.assert_close(stored[n].double(), t * 0.05 / unorm, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------- rejections


@pytest.mark.parametrize("mode", ["flat_lora", "bi_lora"])
def test_a_model_without_lora_layers_is_refused(mode):
    with pytest.raises(ValueError, match=rf"Invalid sam_mode='{mode}': the model has no LoRA layer"):
        SAMEngine(_MLP(), SAMConfig(mode=mode, flat_lora_ramp_steps=3))


def test_a_quantized_base_layer_is_refused():
    model = _lora_mlp()
    base = model.base_model.model.up.base_layer
    base.weight = nn.Parameter(torch.zeros(12, 6, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"Invalid sam_mode='flat_lora' with the quantized base layer .*up"):
        lora_layers(model, "flat_lora")


def test_a_lora_layer_on_an_embedding_is_refused():
    from peft import LoraConfig, get_peft_model

    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match=r"Invalid sam_mode='bi_lora' with the LoRA layer .*linear layers"):
        lora_layers(model, "bi_lora")


def test_flat_lora_needs_its_ramp_length():
    with pytest.raises(ValueError, match=r"Invalid flat_lora_ramp_steps=None with sam_mode='flat_lora'"):
        SAMEngine(_lora_mlp(), SAMConfig(mode="flat_lora"))
