"""Issue 10, SAM side, in float64 against hand computations: the per-layer norms, `fsam_ema` (the reference's
`perturb_mode`), past-FSAM's probe, the LookSAM and WSAM descents, and the full IWSLT ρ ramp.

Each expected value is computed here by hand from the formulas of the reference (SimonDufLab/LLQR,
`lqr_optimizer/_src/utils/utils.py:make_perturbation_from_vector`, `update_gbar`, `resolve_sam_state_buffers`,
`cosine_ramp_step_increase_schedule`) and the papers (LookSAM Alg. 1, WSAM Alg. 1), not with `hf_llqrsam.sam`.
"""

import math

import pytest
import torch

from hf_llqrsam.config import SAMConfig, past_fsam_window
from hf_llqrsam.sam import (
    SAMState,
    compute_perturbation,
    layer_groups,
    looksam_orthogonal,
    looksam_reuse_,
    wsam_descent_,
)
from hf_llqrsam.schedules import iwslt14_cosine_ramp, rho_at

# three layers: `a` (weight + bias), `b` (weight + bias), `emb` (one tensor)
NAMES = ["a.weight", "a.bias", "b.weight", "b.bias", "emb"]
SHAPES = [(3, 4), (3,), (2, 3), (2,), (5,)]


def _tensors(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


class DiagU:
    def __init__(self, seed=3):
        g = torch.Generator().manual_seed(seed)
        self.d = {n: torch.rand(s, generator=g, dtype=torch.float64) + 0.2 for n, s in zip(NAMES, SHAPES, strict=True)}

    def apply(self, names, tensors):
        return [t * self.d[n] for n, t in zip(names, tensors, strict=True)]

    def apply_(self, names, tensors):
        for n, t in zip(names, tensors, strict=True):
            t.mul_(self.d[n])


def test_layer_groups_are_the_owning_modules():
    assert layer_groups(NAMES) == [[0, 1], [2, 3], [4]]
    assert layer_groups(["vit.embeddings.cls_token", "vit.embeddings.patch.weight", "vit.embeddings.position"]) == [
        [0, 2],
        [1],
    ]


@pytest.mark.parametrize("norm", ["layer_euclidean", "layer_matrix"])
@pytest.mark.parametrize("with_u", [False, True])
def test_layer_norms_match_the_hand_computation(norm, with_u):
    """ε_l = ρ (Cv)_l / (√(ν_l² + eps) √L), ν_l² = ‖(Cv)_l‖² or v_lᵀ(Cv)_l; L = 3 layers."""
    params, grads = _tensors(1), _tensors(2)
    u = DiagU() if with_u else None
    rho, eps = 0.3, 1e-12
    out = compute_perturbation(SAMConfig(mode="sam", norm=norm, eps=eps), SAMState(), NAMES, params, grads, rho, u)
    cv = u.apply(NAMES, grads) if u else grads
    expected = []
    for idx in ([0, 1], [2, 3], [4]):
        v_l, cv_l = _flat([grads[i] for i in idx]), _flat([cv[i] for i in idx])
        nu2 = float(v_l @ cv_l) if norm == "layer_matrix" else float(cv_l @ cv_l)
        expected.append(rho * cv_l / (math.sqrt(nu2 + eps) * math.sqrt(3)))
    assert torch.allclose(_flat(out.eps), torch.cat(expected), rtol=1e-13, atol=0)
    assert out.perturbation_norm == pytest.approx(float(_flat(out.eps).norm()), rel=1e-12)
    if norm == "layer_euclidean":  # each layer gets ρ/√L, so ‖ε‖ = ρ
        assert out.perturbation_norm == pytest.approx(rho, rel=1e-12)


def test_layer_norm_of_a_zero_layer_is_zero_and_finite():
    grads = _tensors(2)
    grads[4] = torch.zeros(5, dtype=torch.float64)
    out = compute_perturbation(
        SAMConfig(mode="sam", norm="layer_euclidean"), SAMState(), NAMES, _tensors(1), grads, 0.3
    )
    assert out.finite and torch.equal(out.eps[4], torch.zeros(5, dtype=torch.float64))


def test_layer_matrix_with_an_indefinite_layer_skips_the_ascent():
    grads = _tensors(2)
    u = DiagU()
    u.d["emb"] = -u.d["emb"]  # vᵀCv < 0 in one layer
    state = SAMState()
    out = compute_perturbation(SAMConfig(mode="sam", norm="layer_matrix"), state, NAMES, _tensors(1), grads, 0.3, u)
    assert not out.finite and out.eps == [] and state.skipped_ascent == 1 and state.ascents == 0


def _fsam_by_hand(gs, beta, sigma, rho, eps, direction, u=None):
    """Base-FSAM over a sequence of gradients, the reference's way (utils.py), with ḡ₀ = 0; returns the ε's."""
    gbar = torch.zeros_like(gs[0])
    out = []
    for g in gs:
        v = g - sigma * gbar
        cv = v * u if u is not None else v
        if direction:
            cv = cv / math.sqrt(float(cv @ cv) + eps)
        out.append(rho * cv / math.sqrt(float(cv @ cv) + eps))
        gbar = beta * gbar + (1 - beta) * g
        if direction:
            gbar = gbar / math.sqrt(float(gbar @ gbar) + eps)
    return out, gbar


@pytest.mark.parametrize("fsam_ema", ["precond_grad", "grad", "direction"])
def test_fsam_ema_matches_the_reference_perturb_mode(fsam_ema):
    """`direction` = `ema_direction`: unit ḡ after each update and unit C v; `grad`, `precond_grad`: the raw EMA."""
    params, u = _tensors(1), DiagU()
    seq = [_tensors(s) for s in (5, 6, 7)]
    cfg = SAMConfig(mode="fsam", fsam_beta=0.8, fsam_sigma=1.0, fsam_ema=fsam_ema)
    state = SAMState()
    geometry = None if fsam_ema == "grad" else u  # `grad` is ema_grad: U stays out of ε
    got = [_flat(compute_perturbation(cfg, state, NAMES, params, g, 0.2, geometry).eps) for g in seq]
    flat_u = None if geometry is None else _flat([u.d[n] for n in NAMES])
    expected, gbar = _fsam_by_hand([_flat(g) for g in seq], 0.8, 1.0, 0.2, cfg.eps, fsam_ema == "direction", flat_u)
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)
    assert torch.allclose(_flat(state.get("gbar", NAMES, params)), gbar, rtol=1e-12, atol=0)
    if fsam_ema == "direction":
        assert float(gbar.norm()) == pytest.approx(1.0, abs=1e-12)


def test_past_fsam_probe_is_fsam_on_the_stored_perturbed_gradient():
    """v = g̃ₜ₋₁ − σḡ (pre-update ḡ), ḡ ← βḡ + (1 − β)g̃ₜ₋₁ (`make_perturbation_from_noise`,
    `resolve_sam_state_buffers`).

    The first step (g̃₋₁ = 0, ḡ = 0) gives ε = 0.
    """
    params = _tensors(1)
    cfg = SAMConfig(mode="past_fsam", fsam_beta=0.7, fsam_sigma=0.5)
    state = SAMState()
    zeros = state.get("g_last", NAMES, params)
    first = compute_perturbation(cfg, state, NAMES, params, zeros, 0.1)
    assert first.finite and float(_flat(first.eps).abs().max()) == 0.0
    g1, g2 = _tensors(8), _tensors(9)
    gbar = torch.zeros(sum(t.numel() for t in params), dtype=torch.float64)
    for g in (g1, g2):
        out = compute_perturbation(cfg, state, NAMES, params, g, 0.1)
        v = _flat(g) - 0.5 * gbar
        assert torch.allclose(_flat(out.eps), 0.1 * v / math.sqrt(float(v @ v) + 1e-12), rtol=1e-12, atol=0)
        gbar = 0.7 * gbar + 0.3 * _flat(g)
        assert torch.allclose(_flat(state.get("gbar", NAMES, params)), gbar, rtol=1e-13, atol=0)


@pytest.mark.parametrize(("overlap", "window"), [(0.0, 1), (0.5, 2), (2 / 3, 3), (0.667, 3), (0.75, 4), (0.9, 10)])
def test_past_fsam_window(overlap, window):
    assert past_fsam_window(overlap) == window
    # the reference's own rule: replace = round(B (1 − f)) fresh examples per step, B = window * replace
    replace = 8
    assert round(window * replace * (1 - overlap)) == replace


def test_looksam_orthogonal_component_and_reuse():
    g, gs = _tensors(3), _tensors(4)
    gv = looksam_orthogonal(g, gs)
    fg, fgs, fgv = _flat(g), _flat(gs), _flat(gv)
    # g_v = g_s − ‖g_s‖ cos(g, g_s) ĝ (Liu et al. 2022, Alg. 1), orthogonal to g
    cos = float(fg @ fgs) / (float(fg.norm()) * float(fgs.norm()))
    assert torch.allclose(fgv, fgs - float(fgs.norm()) * cos * fg / fg.norm(), rtol=1e-12, atol=1e-15)
    assert abs(float(fgv @ fg)) < 1e-13
    h = _tensors(5)
    expected = _flat(h) + 0.7 * float(_flat(h).norm()) / float(fgv.norm()) * fgv
    looksam_reuse_(h, gv, 0.7)
    assert torch.allclose(_flat(h), expected, rtol=1e-13, atol=0)
    zero = [torch.zeros_like(t) for t in h]
    before = [t.clone() for t in h]
    looksam_reuse_(h, zero, 0.7)  # no g_v yet: g unchanged
    assert all(torch.equal(a, b) for a, b in zip(h, before, strict=True))


@pytest.mark.parametrize("decouple", [False, True])
def test_wsam_descent(decouple):
    g, gs = _tensors(3), _tensors(4)
    a = 0.8 / (1 - 0.8)
    perturbed = [t.clone() for t in gs]
    sharp = wsam_descent_(perturbed, g, 0.8, decouple)
    if decouple:  # the base optimizer sees g; a(g̃ − g) is stepped on after it
        assert torch.equal(_flat(perturbed), _flat(g))
        assert torch.allclose(_flat(sharp), a * (_flat(gs) - _flat(g)), rtol=1e-13, atol=0)
    else:
        assert sharp == []
        assert torch.allclose(_flat(perturbed), _flat(g) + a * (_flat(gs) - _flat(g)), rtol=1e-13, atol=1e-15)


def _reference_ramp(step, target=0.2, init=0.005, ramp=(4000, 150000), start=200000, every=50000, delta=0.05):
    """The reference's `cosine_ramp_step_increase_schedule` (utils.py), transcribed with its YAML constants."""
    progress = min(max((step - ramp[0]) / (ramp[1] - ramp[0]), 0.0), 1.0)
    value = init + (target - init) * 0.5 * (1.0 - math.cos(math.pi * progress))
    count = math.floor((step - start) / every) + 1.0 if step >= start else 0.0
    return value + delta * count


@pytest.mark.parametrize(
    "step",
    [
        0,
        3999,
        4000,
        4001,
        77000,
        149999,
        150000,
        150001,
        199999,
        200000,
        200001,
        249999,
        250000,
        299999,
        300000,
        1_000_000,
    ],
)
def test_iwslt14_ramp_equals_the_reference_schedule(step):
    """Cosine from 0.005 to ρ over steps 4000–150000, then +0.05 at 200k, 250k, 300k, … (the reference preset
    `configs/perturbation_rho_scheduler/iwslt14_cosine_ramp_step_increase.yaml`, target 0.2)."""
    assert iwslt14_cosine_ramp(step, 0.2) == pytest.approx(_reference_ramp(step), rel=1e-12, abs=1e-15)
    assert rho_at("iwslt14_cosine_ramp", step, 0.2) == iwslt14_cosine_ramp(step, 0.2)


def test_iwslt14_ramp_steps_and_purity():
    assert iwslt14_cosine_ramp(199_999, 0.2) == pytest.approx(0.2)
    assert iwslt14_cosine_ramp(200_000, 0.2) - iwslt14_cosine_ramp(199_999, 0.2) == pytest.approx(0.05)
    assert iwslt14_cosine_ramp(249_999, 0.2) == pytest.approx(0.25)
    assert iwslt14_cosine_ramp(250_000, 0.2) == pytest.approx(0.30)
    assert iwslt14_cosine_ramp(1_000_000, 0.2) == pytest.approx(0.2 + 0.05 * 17)
    # a pure function of the step: the same value whatever was evaluated before (what resume relies on)
    steps = [5, 180_000, 4000, 260_000, 5]
    assert [iwslt14_cosine_ramp(s, 0.2) for s in steps] == [iwslt14_cosine_ramp(s, 0.2) for s in reversed(steps)][::-1]
