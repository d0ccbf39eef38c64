"""`llqr_apply="update"` (`docs/algorithm.md` §7.3): the dry-run optimizer update and the objective it induces
(float64)."""

import copy

import pytest
import torch

from hf_llqrsam.llqr import LLQRConfig, LLQRPreconditioner
from hf_llqrsam.llqr.update_probe import make_update_probe, optimizer_update
from tests.oracles.dense_llqr import TanhNet, dense_curvature, flatten

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd_momentum_wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True, maximize=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1),
    "adam_amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.3, betas=(0.8, 0.95)),
}


def _grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()}


@pytest.mark.parametrize("warm_steps", [0, 3])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_dry_run_matches_a_real_step_and_mutates_nothing(name, warm_steps):
    model = TanhNet((3, 4, 2), seed=0)
    opt = OPTIMIZERS[name](list(model.parameters()))
    for k in range(warm_steps):
        for n, p in model.named_parameters():
            p.grad = _grads(model, 100 + k)[n]
        opt.step()
    g = _grads(model, 7)
    state_before = copy.deepcopy(opt.state_dict())
    params_before = [p.detach().clone() for p in model.parameters()]
    got = optimizer_update(opt, dict(model.named_parameters()), g)

    twin = copy.deepcopy({"model": model, "opt": opt})  # the oracle: really take the step on a copy
    for n, p in twin["model"].named_parameters():
        p.grad = g[n].clone()
    twin["opt"].step()
    for (n, p_new), p_old in zip(twin["model"].named_parameters(), params_before, strict=True):
        torch.testing.assert_close(got[n], p_new.detach() - p_old, rtol=1e-10, atol=1e-15)

    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params_before, strict=True))
    after = opt.state_dict()
    for key, st in state_before["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(after["state"][key][k]), torch.as_tensor(v))


def test_unsupported_optimizer_raises():
    model = TanhNet((2, 2))
    with pytest.raises(ValueError, match=r"LLQRConfig\.apply='update'"):
        optimizer_update(torch.optim.RMSprop(model.parameters()), dict(model.named_parameters()), _grads(model, 0))


@pytest.mark.parametrize("scale", ["none", "gradient_norm"])
def test_update_mode_objective_uses_the_optimizer_update(scale):
    """δ = U·Δ: one plain SGD inner step gives d₁ = d₀ − η·Δ ⊙ (g + (G + λI)(d₀ ⊙ Δ)), Δ = Δ_opt(g) (`none`) or
    Δ_opt(g)·‖g‖/‖Δ_opt(g)‖ (`gradient_norm`, the default)."""
    model = TanhNet((3, 4, 3), seed=1)
    gen = torch.Generator().manual_seed(2)
    batch = {
        "x": torch.randn(6, 3, generator=gen, dtype=torch.float64),
        "labels": torch.randint(0, 3, (6,), generator=gen),
    }
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for k in range(2):
        for n, p in model.named_parameters():
            p.grad = _grads(model, k)[n]
        opt.step()
    cfg = LLQRConfig(
        apply="update",
        inner_steps=1,
        inner_lr=0.3,
        inner_momentum=0.0,
        ema_decay=0.0,
        clip_norm=1e30,
        damping=0.2,
        allow_inversion=True,
        update_probe_scale=scale,
    )
    pre = LLQRPreconditioner(model, cfg)
    with pytest.raises(ValueError, match="update_probe"):
        pre.update(model, batch)
    probe = make_update_probe(opt, model)
    metrics = pre.update(model, batch, update_probe=probe)

    g, G = dense_curvature(model, batch["x"], batch["labels"], "ngd")
    g_named = dict(zip([n for n, _ in model.named_parameters()], (t for t in _split(g, model)), strict=True))
    delta_opt = flatten(optimizer_update(opt, dict(model.named_parameters()), g_named).values())
    if scale == "gradient_norm":
        factor = g.norm() / delta_opt.norm()
        assert metrics["llqr/update_probe_scale"] == pytest.approx(float(factor), rel=1e-10)
        delta_opt = delta_opt * factor
    else:
        assert "llqr/update_probe_scale" not in metrics
    A = G + 0.2 * torch.eye(len(g), dtype=torch.float64)
    expected = 1.0 - 0.3 * delta_opt * (g + A @ delta_opt)
    torch.testing.assert_close(flatten(pre.structure.parameters()), expected, rtol=1e-10, atol=1e-13)


def _split(vec, model):
    out, offset = [], 0
    for p in model.parameters():
        out.append(vec[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out
