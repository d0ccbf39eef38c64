"""Unit checks S1–S6 of `docs/algorithm.md` §13 and the infoSAM contract of `docs/infosam.md`, on tiny tensors."""

import math

import pytest
import torch

from hf_llqrsam.config import SAMConfig
from hf_llqrsam.sam import (
    SAMState,
    apply_perturbation_,
    batchnorm_buffers,
    compute_perturbation,
    gsam_descent_,
    restore_,
)
from hf_llqrsam.schedules import iwslt14_cosine_ramp, lr_proportional, rho_at

NAMES = ["lin.weight", "lin.bias"]


def _tensors(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)]
    grads = [scale * torch.randn_like(p) for p in params]
    return params, grads


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


class DiagU:
    """A fixed diagonal U as a Preconditioner."""

    def __init__(self, d):
        self.d = d

    def apply(self, names, tensors):
        return [t * self.d[n] for n, t in zip(names, tensors, strict=True)]

    def apply_(self, names, tensors):
        for n, t in zip(names, tensors, strict=True):
            t.mul_(self.d[n])


def _diag_u(params, seed=3):
    g = torch.Generator().manual_seed(seed)
    return DiagU(
        {n: torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.2 for n, p in zip(NAMES, params, strict=True)}
    )


def test_s1_euclidean_radius_and_matrix_form():
    params, grads = _tensors()
    u = _diag_u(params)
    eps = compute_perturbation(SAMConfig(mode="sam", rho=0.3), SAMState(), NAMES, params, grads, 0.3, u).eps
    assert float(_flat(eps).norm()) == pytest.approx(0.3, rel=1e-12)
    eps_m = compute_perturbation(SAMConfig(mode="sam", norm="matrix"), SAMState(), NAMES, params, grads, 0.3, u).eps
    v, cv = _flat(grads), _flat(u.apply(NAMES, grads))
    expected = 0.3 * cv / torch.sqrt(v @ cv + 1e-12)
    torch.testing.assert_close(_flat(eps_m), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", ["sam", "fsam"])
def test_s2_identity_geometry_reduces_to_plain_row(mode):
    params, grads = _tensors()
    ident = DiagU({n: torch.ones_like(p) for n, p in zip(NAMES, params, strict=True)})
    plain = compute_perturbation(SAMConfig(mode=mode), SAMState(), NAMES, params, grads, 0.1).eps
    with_u = compute_perturbation(SAMConfig(mode=mode), SAMState(), NAMES, params, grads, 0.1, ident).eps
    assert all(torch.equal(a, b) for a, b in zip(plain, with_u, strict=True))


def test_s3_asam_formula_with_unit_bias_scale():
    params, grads = _tensors()
    eps = compute_perturbation(SAMConfig(mode="asam", asam_eta=0.01), SAMState(), NAMES, params, grads, 0.5).eps
    t = torch.cat([params[0].abs().reshape(-1) + 0.01, torch.ones(3, dtype=torch.float64)])
    g = _flat(grads)
    torch.testing.assert_close(
        _flat(eps), 0.5 * t * t * g / torch.sqrt((t * g).pow(2).sum() + 1e-12), rtol=1e-12, atol=0
    )


def test_s4_fisher_reference_form_equals_paper_form():
    params, grads = _tensors()
    rho, eta = 0.1, 0.1
    ref = compute_perturbation(
        SAMConfig(mode="fisher_sam", fisher_sam_eta=eta), SAMState(), NAMES, params, grads, rho
    ).eps
    paper = compute_perturbation(
        SAMConfig(mode="fisher_sam", fisher_sam_form="paper", fisher_sam_eta=1 / eta),
        SAMState(),
        NAMES,
        params,
        grads,
        rho / math.sqrt(eta),
    ).eps
    torch.testing.assert_close(_flat(ref), _flat(paper), rtol=1e-9, atol=1e-12)
    # and the reference form probes ~1/sqrt(eta) farther than SAM when g^2 << eta
    small = [g * 1e-3 for g in grads]
    far = compute_perturbation(SAMConfig(mode="fisher_sam"), SAMState(), NAMES, params, small, rho).eps
    assert float(_flat(far).norm()) == pytest.approx(rho / math.sqrt(eta), rel=1e-4)


def test_s5_fsam_uses_pre_update_gbar_and_zero_init_equals_sam():
    params, g0 = _tensors(0)
    _, g1 = _tensors(1)
    cfg = SAMConfig(mode="fsam", fsam_beta=0.9, fsam_sigma=1.0)
    state = SAMState()
    first = compute_perturbation(cfg, state, NAMES, params, g0, 0.1).eps
    sam = compute_perturbation(SAMConfig(mode="sam"), SAMState(), NAMES, params, g0, 0.1).eps
    assert all(torch.equal(a, b) for a, b in zip(first, sam, strict=True))
    gbar = 0.1 * _flat(g0)
    torch.testing.assert_close(_flat(state.buffers["gbar"].values()), gbar, rtol=1e-12, atol=0)
    second = compute_perturbation(cfg, state, NAMES, params, g1, 0.1).eps
    v = _flat(g1) - gbar  # the pre-update ḡ
    torch.testing.assert_close(_flat(second), 0.1 * v / torch.sqrt(v @ v + 1e-12), rtol=1e-12, atol=1e-15)


def test_s5_fsam_first_grad_init():
    params, g0 = _tensors(0)
    state = SAMState()
    cfg = SAMConfig(mode="fsam", fsam_init="first_grad")
    compute_perturbation(cfg, state, NAMES, params, g0, 0.1)
    torch.testing.assert_close(_flat(state.buffers["gbar"].values()), _flat(g0))


def test_s6_gsam_orthogonal_component_and_alpha_zero():
    _, g = _tensors(0)
    _, gt = _tensors(1)
    d = [t.clone() for t in gt]
    gsam_descent_(d, g, alpha=1.0)
    g_perp = _flat(gt) - _flat(d)  # = α g⊥ with α = 1
    assert abs(float(g_perp @ _flat(gt))) < 1e-10
    torch.testing.assert_close(g_perp, _flat(g) - (_flat(g) @ _flat(gt)) / (_flat(gt) @ _flat(gt)) * _flat(gt))
    same = [t.clone() for t in gt]
    gsam_descent_(same, g, alpha=0.0)
    assert all(torch.equal(a, b) for a, b in zip(same, gt, strict=True))


def test_vasso_is_an_ema_of_gradients():
    params, g0 = _tensors(0)
    _, g1 = _tensors(1)
    cfg, state = SAMConfig(mode="vasso", vasso_theta=0.4), SAMState()
    compute_perturbation(cfg, state, NAMES, params, g0, 0.1)
    eps = compute_perturbation(cfg, state, NAMES, params, g1, 0.1).eps
    d = 0.6 * 0.4 * _flat(g0) + 0.4 * _flat(g1)
    torch.testing.assert_close(_flat(eps), 0.1 * d / d.norm(), rtol=1e-9, atol=1e-12)


def test_infosam_first_step_is_sam_exactly():
    params, grads = _tensors()
    info = compute_perturbation(SAMConfig(mode="infosam"), SAMState(), NAMES, params, grads, 0.1).eps
    sam = compute_perturbation(SAMConfig(mode="sam"), SAMState(), NAMES, params, grads, 0.1).eps
    assert all(torch.equal(a, b) for a, b in zip(info, sam, strict=True))


def test_infosam_uniform_noise_equals_sam():
    """With g₁ = g₀ + c·1 the noise estimate b is the same for every coordinate, so ε is SAM's direction."""
    params, g0 = _tensors()
    g1 = [g + 0.5 for g in g0]
    state, cfg = SAMState(), SAMConfig(mode="infosam", infosam_alpha=0.9)
    compute_perturbation(cfg, state, NAMES, params, g0, 0.1)
    eps = compute_perturbation(cfg, state, NAMES, params, g1, 0.1).eps
    sam = compute_perturbation(SAMConfig(mode="sam"), SAMState(), NAMES, params, g1, 0.1).eps
    torch.testing.assert_close(_flat(eps), _flat(sam), rtol=1e-6, atol=1e-9)


def test_infosam_zero_gradient_coordinate_never_nan():
    params, g0 = _tensors()
    for g in g0:
        g.view(-1)[0] = 0.0
    state, cfg = SAMState(), SAMConfig(mode="infosam")
    for _ in range(3):
        eps = compute_perturbation(cfg, state, NAMES, params, g0, 0.1).eps
        assert all(torch.isfinite(e).all() for e in eps)


def test_infosam_ema_variance_starts_at_first_sample():
    params, g0 = _tensors(0)
    _, g1 = _tensors(1)
    state, cfg = SAMState(), SAMConfig(mode="infosam", infosam_variance="ema", infosam_alpha=0.9)
    compute_perturbation(cfg, state, NAMES, params, g0, 0.1)
    compute_perturbation(cfg, state, NAMES, params, g1, 0.1)
    torch.testing.assert_close(_flat(state.buffers["v"].values()), (_flat(g1) - _flat(g0)) ** 2)


def test_scale_invariant_modes_ignore_the_loss_scale_and_stateful_modes_unscale():
    params, grads = _tensors()
    scaled = [g * 1024.0 for g in grads]
    for mode in ("sam", "asam", "fsam", "fisher_sam", "infosam", "vasso"):
        a = compute_perturbation(SAMConfig(mode=mode), SAMState(), NAMES, params, grads, 0.1).eps
        b = compute_perturbation(SAMConfig(mode=mode), SAMState(), NAMES, params, scaled, 0.1, grad_scale=1024.0).eps
        torch.testing.assert_close(_flat(a), _flat(b), rtol=1e-6, atol=1e-12)
    state = SAMState()
    compute_perturbation(SAMConfig(mode="fsam"), state, NAMES, params, scaled, 0.1, grad_scale=1024.0)
    torch.testing.assert_close(_flat(state.buffers["gbar"].values()), 0.1 * _flat(grads))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_without_touching_state(bad):
    params, grads = _tensors()
    state = SAMState()
    compute_perturbation(SAMConfig(mode="fsam"), state, NAMES, params, grads, 0.1)
    before = {n: t.clone() for n, t in state.buffers["gbar"].items()}
    grads[0][0, 0] = bad
    pert = compute_perturbation(SAMConfig(mode="fsam"), state, NAMES, params, grads, 0.1)
    assert not pert.finite and pert.eps == [] and state.skipped_ascent == 1 and state.ascents == 1
    assert all(torch.equal(before[n], state.buffers["gbar"][n]) for n in before)


def test_restore_is_exact_where_subtraction_is_not():
    torch.manual_seed(0)
    params = [torch.randn(10000)]
    eps = [torch.randn(10000) * 0.37]
    original = params[0].clone()
    backups = apply_perturbation_(params, eps)
    subtracted = params[0] - eps[0]
    restore_(params, backups)
    assert torch.equal(params[0], original)
    assert not torch.equal(subtracted, original)  # (w + ε) − ε ≠ w in fp32


@pytest.mark.parametrize(
    "cfg,geometry",
    [
        (SAMConfig(mode="sam"), False),
        (SAMConfig(mode="sam"), True),
        (SAMConfig(mode="sam", norm="matrix"), True),
        (SAMConfig(mode="asam"), False),
        (SAMConfig(mode="fisher_sam"), False),
        (SAMConfig(mode="fsam", fsam_init="first_grad"), True),
    ],
)
def test_reported_perturbation_norm_is_the_norm_of_eps(cfg, geometry):
    """‖ε‖ is reported as scale·‖Cv‖ without reducing ε again; it must equal the norm of the ε returned."""
    params, grads = _tensors(scale=3.0)
    u = _diag_u(params) if geometry else None
    state = SAMState()
    for _ in range(2):  # the second step exercises the stateful probes (FSAM's g − σḡ)
        pert = compute_perturbation(cfg, state, NAMES, params, grads, 0.2, u)
        assert pert.perturbation_norm == pytest.approx(float(_flat(pert.eps).norm()), rel=1e-12)
        assert pert.grad_norm == pytest.approx(float(_flat(grads).norm()), rel=1e-12)


def test_apply_perturbation_casts_eps_to_each_parameter_dtype():
    """Mixed dtypes (bf16 weights, fp32 ε) take the per-tensor cast; equal dtypes take the fused add."""
    gen = torch.Generator().manual_seed(4)
    params = [torch.randn(5, generator=gen).to(torch.bfloat16), torch.randn(2, 3, generator=gen)]
    eps = [torch.randn(5, generator=gen), torch.randn(2, 3, generator=gen)]
    expected = [p + e.to(p.dtype) for p, e in zip(params, eps, strict=True)]
    originals = [p.clone() for p in params]
    backups = apply_perturbation_(params, eps)
    for p, want in zip(params, expected, strict=True):
        assert torch.equal(p, want)
    restore_(params, backups)
    assert all(torch.equal(p, o) for p, o in zip(params, originals, strict=True))


def test_state_dict_round_trip_is_weights_only_safe(tmp_path):
    params, grads = _tensors()
    state = SAMState()
    compute_perturbation(SAMConfig(mode="infosam", infosam_variance="ema"), state, NAMES, params, grads, 0.1)
    compute_perturbation(SAMConfig(mode="infosam", infosam_variance="ema"), state, NAMES, params, grads, 0.1)
    torch.save(state.state_dict(), tmp_path / "s.pt")
    loaded = SAMState()
    loaded.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert loaded.ascents == 2
    for kind in ("m", "v"):
        assert all(torch.equal(state.buffers[kind][n], loaded.buffers[kind][n]) for n in NAMES)


def test_batchnorm_buffers_found():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.LayerNorm(2))
    assert len(batchnorm_buffers(net)) == 3


def test_rho_schedules():
    assert rho_at("constant", 123, 0.1) == 0.1
    assert iwslt14_cosine_ramp(0, 0.2) == pytest.approx(0.005)
    assert iwslt14_cosine_ramp(4000 + 73000, 0.2) == pytest.approx(0.005 + 0.195 * 0.5)
    assert iwslt14_cosine_ramp(150000, 0.2) == pytest.approx(0.2)
    assert iwslt14_cosine_ramp(200000, 0.2) == pytest.approx(0.25)
    assert iwslt14_cosine_ramp(260000, 0.2) == pytest.approx(0.3)
    assert lr_proportional(lr=0.5, lr_max=1.0, lr_min=0.0, rho=0.2, rho_min=0.02) == pytest.approx(0.11)
    assert rho_at("lr_proportional", 5, 0.2, 0.0, lr=0.25, lr_max=1.0) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="sam_rho_schedule"):
        rho_at("cosine", 0, 0.1)
