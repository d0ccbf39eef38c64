"""T7 (update semantics), T8 (eval-mode isolation), T9 (Adam cancellation), apply/state of `LLQRPreconditioner`."""

import copy
import dataclasses
import io
import logging

import pytest
import torch
from torch import nn

from hf_llqrsam.llqr import LLQRConfig, LLQRPreconditioner, LLQRStateError, curvature_problem
from tests.oracles.dense_llqr import TanhNet, dense_curvature, flatten, unflatten


def _data(seed: int = 1, n: int = 8, dim: int = 3, classes: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, dim, generator=gen, dtype=torch.float64),
        "labels": torch.randint(0, classes, (n,), generator=gen),
    }


def _random_u(pre: LLQRPreconditioner, seed: int = 0, low: float = 0.5, high: float = 2.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in pre.structure.parameters():
            t.copy_(low + (high - low) * torch.rand(t.shape, generator=gen, dtype=t.dtype))


def _u(pre: LLQRPreconditioner) -> list[torch.Tensor]:
    return [t.clone() for t in pre.structure.parameters()]


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- T7: update semantics


def test_zero_inner_steps_and_unit_decay_leave_u_unchanged():
    model, batch = TanhNet((3, 4, 3)), _data()
    for cfg in (LLQRConfig(inner_steps=0, ema_decay=0.3), LLQRConfig(inner_steps=5, ema_decay=1.0)):
        pre = LLQRPreconditioner(model, cfg)
        _random_u(pre)
        before = _u(pre)
        pre.update(model, batch, step=0)
        assert _equal(before, _u(pre))
        assert pre.num_updates == 1 and pre.last_update_step == 0


def _oracle_inner_loop(model, batch, d0, cfg: LLQRConfig) -> tuple[torch.Tensor, float]:
    """V_T for diagonal U, from the dense oracle: ∂J/∂d = −g ⊙ (g − (G + λI)(d ⊙ g)), per-module clip, heavy ball."""
    g, G = dense_curvature(model, batch["x"], batch["labels"], cfg.divergence, cfg.ngd_scaling)
    A = G + cfg.damping * torch.eye(len(g), dtype=torch.float64)
    sizes = [p.numel() for p in model.parameters()]
    module_of = torch.cat([torch.full((s,), i // 2) for i, s in enumerate(sizes)])  # weight + bias per Linear
    d, buf, clipped = d0.clone(), torch.zeros_like(d0), 0
    for _ in range(cfg.inner_steps):
        grad = -g * (g - A @ (d * g))
        factors = []
        for k in module_of.unique():
            sel = module_of == k
            norm = float(grad[sel].norm())
            factors.append(min(1.0, cfg.clip_norm / norm) if norm > 0 else 1.0)
            grad[sel] *= factors[-1]
        clipped += min(factors) < 1.0
        buf = grad + cfg.inner_momentum * buf
        d = d - cfg.inner_lr * buf
    return d, clipped / cfg.inner_steps


@pytest.mark.parametrize("divergence", ["ngd", "newton"])
def test_zero_decay_with_warm_start_gives_v_t(divergence):
    """β = 0 and warm start: U = V_T of the inner loop, which matches a hand-written heavy-ball oracle."""
    model, batch = TanhNet((3, 4, 3), seed=3), _data(seed=4)
    cfg = LLQRConfig(
        divergence=divergence,
        inner_steps=7,
        inner_lr=0.5,
        clip_norm=0.05,
        ema_decay=0.0,
        damping=0.1,
        allow_inversion=True,
    )
    pre = LLQRPreconditioner(model, cfg)
    _random_u(pre, seed=5)
    d0 = flatten(_u(pre))
    metrics = pre.update(model, batch, step=3)
    expected, clip_fraction = _oracle_inner_loop(model, batch, d0, cfg)
    torch.testing.assert_close(flatten(_u(pre)), expected, rtol=1e-12, atol=1e-14)
    assert metrics["llqr/clip_fraction"] == clip_fraction
    # EMA with β: U = β U_old + (1 − β) V_T
    pre2 = LLQRPreconditioner(model, dataclasses.replace(cfg, ema_decay=0.8))
    _random_u(pre2, seed=5)
    pre2.update(model, batch)
    torch.testing.assert_close(flatten(_u(pre2)), 0.8 * d0 + 0.2 * expected, rtol=1e-12, atol=1e-14)
    # cold start begins from the identity instead
    pre3 = LLQRPreconditioner(model, dataclasses.replace(cfg, warm_start=False))
    _random_u(pre3, seed=5)
    pre3.update(model, batch)
    expected_cold, _ = _oracle_inner_loop(model, batch, torch.ones_like(d0), cfg)
    torch.testing.assert_close(flatten(_u(pre3)), expected_cold, rtol=1e-12, atol=1e-14)


def test_positivity_clamp_after_ema_unless_inversion_allowed():
    model, batch = TanhNet((3, 4, 3), seed=3), _data(seed=4)
    cfg = LLQRConfig(
        divergence="ngd", inner_steps=10, inner_lr=100.0, clip_norm=10.0, ema_decay=0.5, allow_inversion=True
    )
    free = LLQRPreconditioner(model, cfg)
    free.update(model, batch)
    u_free = flatten(_u(free))
    assert (u_free < 0).any(), "the setting must push some entries below zero"
    clamped = LLQRPreconditioner(model, dataclasses.replace(cfg, allow_inversion=False))
    metrics = clamped.update(model, batch)
    torch.testing.assert_close(flatten(_u(clamped)), u_free.clamp(min=1e-8), rtol=0, atol=0)
    assert metrics["llqr/u_min"] == pytest.approx(1e-8)
    # the clamp applies to scalar U too, never to Kronecker structures
    for structure, clamps in (("scalar", True), ("kfac", False)):
        pre = LLQRPreconditioner(model, dataclasses.replace(cfg, structure=structure, allow_inversion=False))
        with torch.no_grad():
            for t in pre.structure.parameters():
                t.fill_(-1.0)
        pre.update(model, batch)
        values = flatten(_u(pre))
        assert bool((values >= 1e-8).all()) == clamps


def test_momentum_buffer_is_fresh_each_update():
    """Two updates from the same U and data give identical results (no momentum carried over)."""
    model, batch = TanhNet((3, 4, 3), seed=6), _data(seed=7)
    for structure in ("diagonal", "ekfac"):
        pre = LLQRPreconditioner(model, LLQRConfig(structure=structure, inner_steps=6, inner_lr=0.05))
        _random_u(pre, seed=1)
        state = copy.deepcopy(pre.state_dict())
        pre.update(model, batch, step=0)
        first = _u(pre)
        pre.load_state_dict(state)
        pre.update(model, batch, step=1000)
        assert _equal(first, _u(pre))


def test_cadence():
    model = TanhNet((2, 2))
    pre = LLQRPreconditioner(model, LLQRConfig(update_interval=5, update_until=12))
    assert [k for k in range(20) if pre.is_due(k)] == [0, 5, 10]
    pre.last_update_step = 5
    assert not pre.is_due(5) and pre.is_due(10)
    forever = LLQRPreconditioner(model, LLQRConfig(update_interval=3))
    assert [k for k in range(10) if forever.is_due(k)] == [0, 3, 6, 9]


def test_update_metrics_keys_and_ngd_objective_decreases():
    model, batch = TanhNet((3, 4, 3), seed=2), _data(seed=3)
    metrics = LLQRPreconditioner(model, LLQRConfig()).update(model, batch, step=0)
    expected = {
        "objective_start",
        "objective_end",
        "update_seconds",
        "ugrad_norm",
        "clip_fraction",
        "nonfinite_ugrad",
        "u_min",
        "u_max",
        "u_mean",
        "memory_bytes",
        "skipped_refresh",
    }
    assert {f"llqr/{k}" for k in expected} <= set(metrics)
    assert metrics["llqr/skipped_refresh"] == 0.0
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["llqr/objective_end"] < metrics["llqr/objective_start"]
    assert metrics["llqr/memory_bytes"] == 8 * sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- T8: eval-mode isolation


class _Noisy(nn.Module):
    """Consumes the global RNG on every forward, in any mode (so a missing RNG fork is visible)."""

    def forward(self, x):
        return x + 0.0 * torch.rand_like(x)


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 6, dtype=torch.float64)
        self.bn = nn.BatchNorm1d(6, dtype=torch.float64)
        self.noisy = _Noisy()
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(6, 3, dtype=torch.float64)

    def forward(self, x):
        return self.fc2(self.drop(self.noisy(torch.tanh(self.bn(self.fc1(x))))))


def test_update_runs_in_eval_mode_and_leaves_no_trace():
    model = _BNNet()
    model.train()
    model.bn(torch.randn(16, 6, dtype=torch.float64))  # non-trivial running stats
    model.noisy.eval()  # a module the user put in eval mode stays there
    batch = _data(seed=2, n=10, dim=4)
    grads = {"fc1.weight": torch.randn(6, 4, dtype=torch.float64), "bn.bias": torch.randn(6, dtype=torch.float64)}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone() if n in grads else None
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()

    pre = LLQRPreconditioner(model, LLQRConfig(inner_steps=3))
    pre.update(model, batch)

    assert torch.equal(torch.get_rng_state(), rng)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n  # running_mean, running_var, num_batches_tracked
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.equal(p.grad, grads[n]), n
        else:
            assert p.grad is None, n
    assert model.training and model.fc1.training and model.bn.training and model.drop.training
    assert not model.noisy.training

    # dropout was off: two builds give the same g, equal to a plain eval-mode gradient
    g1, _ = curvature_problem(model, batch)
    g2, _ = curvature_problem(model, batch)
    reference = copy.deepcopy(model).eval()
    loss = nn.functional.cross_entropy(reference(batch["x"]), batch["labels"])
    expected = torch.autograd.grad(loss, list(reference.parameters()))
    for a, b, c in zip(g1.values(), g2.values(), expected, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- T9: Adam cancellation (documentation test)


def _trajectory(opt_name: str, pre: LLQRPreconditioner | None, steps: int = 15) -> list[torch.Tensor]:
    model = TanhNet((3, 5, 3), seed=9)
    batch = _data(seed=10)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    opt = (
        torch.optim.AdamW(params, lr=1e-2, eps=1e-30, weight_decay=0.0)
        if opt_name == "adamw"
        else torch.optim.SGD(params, lr=0.2)
    )
    out = []
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(batch["x"]), batch["labels"]).backward()
        if pre is not None:
            pre.apply_(names, [p.grad for p in params])
        opt.step()
        out.append(flatten([p.detach() for p in params]).clone())
    return out


def test_fixed_diagonal_u_cancels_under_adam_but_not_sgd():
    """§7.2: with a constant positive diagonal U, Adam's m̂/√v̂ is invariant; SGD's step is not."""
    pre = LLQRPreconditioner(TanhNet((3, 5, 3), seed=9), LLQRConfig())
    _random_u(pre, seed=11, low=0.1, high=10.0)
    plain, precond = _trajectory("adamw", None), _trajectory("adamw", pre)
    for a, b in zip(plain, precond, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    plain, precond = _trajectory("sgd", None), _trajectory("sgd", pre)
    assert (plain[-1] - precond[-1]).abs().max() > 1e-2


# ---------------------------------------------------------------- apply, state, config


@pytest.mark.parametrize("structure", ["diagonal", "scalar", "kfac", "ekfac", "sep_ekfac"])
def test_apply_and_apply_inplace_agree(structure):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)
    pre = LLQRPreconditioner(model, LLQRConfig(structure=structure, identity_scaling=2.0))
    _random_u(pre, seed=3)
    names = [n for n, _ in model.named_parameters()]
    assert "1.bias" not in pre.names
    ts = [torch.randn(p.shape) for p in model.parameters()]
    out = pre.apply(names, ts)
    assert all(o.dtype == torch.float32 and o is not t for o, t in zip(out, ts, strict=True))
    assert torch.equal(out[names.index("1.bias")], ts[names.index("1.bias")])  # frozen → identity
    if structure == "diagonal":
        for n, o, t in zip(names, out, ts, strict=True):
            if n in pre.names:
                d = pre.structure.blocks[pre.names.index(n)]["d"]
                torch.testing.assert_close(o, d * t / 2.0)
    inplace = [t.clone() for t in ts]
    pre.apply_(names, inplace)
    for a, b in zip(inplace, out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    half = [t.to(torch.bfloat16) for t in ts]
    pre.apply_(names, half)
    assert all(h.dtype == torch.bfloat16 for h in half)
    for a, b in zip(half, out, strict=True):
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2)


def test_diagonal_apply_in_u_order_is_fused_and_equals_the_per_name_loop():
    """`apply` in U's own name order takes the fused diagonal path; any other order loops per name. Same values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    pre = LLQRPreconditioner(model, LLQRConfig(identity_scaling=2.0))
    _random_u(pre, seed=5)
    ts = [torch.randn(p.shape) for p in model.parameters()]
    assert list(pre.names) == [n for n, _ in model.named_parameters()]
    fused = pre.apply(pre.names, ts)
    looped = pre.apply(pre.names[::-1], ts[::-1])[::-1]
    for f, lo, t in zip(fused, looped, ts, strict=True):
        assert f is not t
        torch.testing.assert_close(f, lo, rtol=0, atol=0)


def test_identity_scaling_starts_at_identity():
    model = TanhNet((3, 4, 3), dtype=torch.float32)
    pre = LLQRPreconditioner(model, LLQRConfig(identity_scaling=4.0, structure="ekfac"))
    ts = [torch.randn(p.shape) for p in model.parameters()]
    for a, b in zip(pre.apply(pre.names, ts), ts, strict=True):
        torch.testing.assert_close(a, b)


def test_state_dict_round_trip_with_weights_only(tmp_path):
    model, batch = TanhNet((3, 4, 3), dtype=torch.float32), _data()
    batch = {"x": batch["x"].float(), "labels": batch["labels"]}
    pre = LLQRPreconditioner(model, LLQRConfig(structure="sep_ekfac", inner_steps=3, inner_lr=0.1))
    pre.update(model, batch, step=7)
    buf = io.BytesIO()
    torch.save(pre.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = LLQRPreconditioner(model, LLQRConfig(structure="sep_ekfac"))
    fresh.load_state_dict(state)
    assert _equal(_u(pre), _u(fresh))
    assert fresh.num_updates == 1 and fresh.last_update_step == 7
    assert all(t.dtype == torch.float32 for blk in state["blocks"].values() for t in blk.values())
    with pytest.raises(ValueError, match=r"LLQRConfig\.structure='sep_ekfac'"):
        LLQRPreconditioner(model, LLQRConfig(structure="ekfac")).load_state_dict(state)
    other = TanhNet((3, 4, 4, 3), dtype=torch.float32)
    with pytest.raises(ValueError, match="does not match"):
        LLQRPreconditioner(other, LLQRConfig(structure="sep_ekfac")).load_state_dict(state)
    pre.broadcast_(0)  # no process group: a no-op
    assert _equal(_u(pre), _u(fresh))


def test_u_dtype_is_fp32_for_fp32_models():
    model = TanhNet((3, 4, 3), dtype=torch.float32)
    pre = LLQRPreconditioner(model, LLQRConfig())
    assert all(t.dtype == torch.float32 for t in pre.structure.parameters())
    assert pre.memory_bytes() == 4 * sum(p.numel() for p in model.parameters())


def test_config_from_training_args(tmp_path):
    from hf_llqrsam import LLQRSAMTrainingArguments

    args = LLQRSAMTrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        llqr=True,
        sam_mode="sam",
        llqr_structure="kfac",
        llqr_divergence="renyi",
        llqr_renyi_alpha=0.3,
        llqr_inner_steps=7,
        llqr_chunk_size=16,
        llqr_update_until=100,
        label_smoothing_factor=0.1,
    )
    cfg = args.to_llqr_config()
    assert cfg.structure == "kfac" and cfg.divergence == "renyi" and cfg.renyi_alpha == 0.3
    assert cfg.inner_steps == 7 and cfg.chunk_size == 16 and cfg.update_until == 100
    assert cfg.label_smoothing == 0.1
    for f in dataclasses.fields(LLQRConfig):
        if f.name != "label_smoothing":
            assert getattr(cfg, f.name) == getattr(args, f"llqr_{f.name}")


def test_unflatten_helper_alignment():
    model = TanhNet((2, 3))
    params = list(model.parameters())
    v = flatten(params).detach()
    assert all(torch.equal(a, b) for a, b in zip(unflatten(v, params), params, strict=True))


# ---------------------------------------------------------------- resume: the fingerprint and the saved values


def _trained(cfg: LLQRConfig, model=None, step: int = 3) -> tuple[nn.Module, LLQRPreconditioner]:
    model = model if model is not None else TanhNet((3, 4, 3), dtype=torch.float32)
    pre = LLQRPreconditioner(model, cfg)
    _random_u(pre, seed=2)
    pre.num_updates, pre.last_update_step = 1, step
    return model, pre


def _saved(pre: LLQRPreconditioner) -> dict:
    buf = io.BytesIO()
    torch.save(pre.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_holds_a_weights_only_fingerprint():
    model, pre = _trained(LLQRConfig(structure="kfac", identity_scaling=2.0, clip_groups="tensor"))
    fp = _saved(pre)["fingerprint"]
    assert fp["structure"] == "kfac" and fp["identity_scaling"] == 2.0 and fp["clip_groups"] == "tensor"
    assert fp["blocks"] == [[n, list(p.shape)] for n, p in model.named_parameters()]
    assert fp["fallback_names"] == [] and fp["allow_inversion"] is False and fp["min_diag"] == 1e-8


def _assert_refused_and_untouched(fresh: LLQRPreconditioner, state: dict, *needles: str) -> str:
    before = _u(fresh)
    with pytest.raises(LLQRStateError) as err:
        fresh.load_state_dict(state, source="/run/checkpoint-3/llqrsam_state.pt")
    msg = str(err.value)
    assert all(n in msg for n in needles), msg
    assert "delete /run/checkpoint-3/llqrsam_state.pt" in msg.lower()
    assert _equal(before, _u(fresh)) and fresh.num_updates == 0 and fresh.last_update_step is None
    return msg


@pytest.mark.parametrize("structure", ["diagonal", "scalar", "kfac", "ekfac", "sep_ekfac"])
def test_resume_with_another_identity_scaling_is_refused(structure):
    """U is stored as s·U: loading s = 2 state into an s = 1 run would silently double (kfac: quarter...) U."""
    model, pre = _trained(LLQRConfig(structure=structure, identity_scaling=2.0))
    fresh = LLQRPreconditioner(model, LLQRConfig(structure=structure, identity_scaling=1.0))
    _assert_refused_and_untouched(
        fresh,
        _saved(pre),
        "Invalid resume: /run/checkpoint-3/llqrsam_state.pt was written with LLQRConfig.identity_scaling=2.0 but this "
        "run has LLQRConfig.identity_scaling=1.0; U would silently change meaning. Resume with "
        "LLQRConfig.identity_scaling=2.0",
    )
    same = LLQRPreconditioner(model, LLQRConfig(structure=structure, identity_scaling=2.0))
    same.load_state_dict(_saved(pre))
    ts = [torch.randn(p.shape) for p in model.parameters()]
    for a, b in zip(same.apply(same.names, ts), pre.apply(pre.names, ts), strict=True):
        assert torch.equal(a, b)


def test_scalar_resume_with_other_clip_groups_is_refused():
    """Scalar U holds one c per clip group: per-tensor values would overwrite each other in module groups."""
    model, pre = _trained(LLQRConfig(structure="scalar", clip_groups="tensor"))
    assert len({float(t) for t in pre.structure.parameters()}) == 4  # 4 distinct per-tensor values
    fresh = LLQRPreconditioner(model, LLQRConfig(structure="scalar", clip_groups="module"))
    _assert_refused_and_untouched(
        fresh,
        _saved(pre),
        "written with LLQRConfig.clip_groups='tensor' but this run has LLQRConfig.clip_groups='module'",
    )


def test_clip_groups_do_not_change_diagonal_or_kronecker_u_and_may_change_on_resume():
    for structure in ("diagonal", "kfac"):
        model, pre = _trained(LLQRConfig(structure=structure, clip_groups="tensor"))
        fresh = LLQRPreconditioner(model, LLQRConfig(structure=structure, clip_groups="module"))
        fresh.load_state_dict(_saved(pre))
        assert _equal(_u(pre), _u(fresh)) and fresh.num_updates == 1 and fresh.last_update_step == 3


def test_resume_with_another_structure_or_model_is_refused_with_the_differing_names():
    model, pre = _trained(LLQRConfig(structure="sep_ekfac"))
    _assert_refused_and_untouched(
        LLQRPreconditioner(model, LLQRConfig(structure="ekfac")),
        _saved(pre),
        "written with LLQRConfig.structure='sep_ekfac' but this run has LLQRConfig.structure='ekfac'",
    )
    wider = TanhNet((3, 5, 3), dtype=torch.float32)  # same names, other shapes
    msg = _assert_refused_and_untouched(
        LLQRPreconditioner(wider, LLQRConfig(structure="sep_ekfac")),
        _saved(pre),
        "3 differ",
        "'layers.0.weight' (saved: (4, 3), this run: (5, 3))",
        "does not match the model",
    )
    assert "'layers.1.bias'" not in msg  # same name and shape (3,): not a difference
    deeper = TanhNet((3, 4, 4, 3), dtype=torch.float32)
    frozen = LLQRPreconditioner(deeper, LLQRConfig(structure="sep_ekfac"))
    _assert_refused_and_untouched(frozen, _saved(pre), "'layers.2.weight' (saved: absent, this run: (3, 4))")


def test_state_without_a_fingerprint_is_refused():
    model, pre = _trained(LLQRConfig())
    old = _saved(pre)
    del old["fingerprint"]  # the format of hf_llqrsam <= 0.1.0
    _assert_refused_and_untouched(LLQRPreconditioner(model, LLQRConfig()), old, "older format", "fingerprint")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0, 1e-12])
def test_resume_validates_the_saved_values(value):
    model, pre = _trained(LLQRConfig())
    state = _saved(pre)
    state["blocks"]["layers.1.weight"]["d"][0, 1] = value
    what = "non-finite" if not torch.isfinite(torch.tensor(value)) else "below LLQRConfig.min_diag=1e-08"
    _assert_refused_and_untouched(
        LLQRPreconditioner(model, LLQRConfig()), state, "blocks['layers.1.weight']['d']", what
    )
    inverting = LLQRPreconditioner(model, LLQRConfig(allow_inversion=True))
    if what == "non-finite":
        _assert_refused_and_untouched(inverting, state, what)
    else:
        inverting.load_state_dict(state)  # llqr_allow_inversion: a finite U of any sign is valid
        assert float(inverting.structure.blocks[2]["d"][0, 1]) == pytest.approx(value)


def test_resume_validates_the_counters():
    model, pre = _trained(LLQRConfig())
    for key, value in (("num_updates", -1), ("num_updates", 1.5), ("last_update_step", "3")):
        state = {**_saved(pre), key: value}
        _assert_refused_and_untouched(LLQRPreconditioner(model, LLQRConfig()), state, f"{key}={value!r}")


# ---------------------------------------------------------------- non-finite curvature problems keep U


def _mlp_batch(nan_row: int | None = None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    if nan_row is not None:
        x[nan_row, 1] = float("nan")
    return model, {"input": x, "labels": y}


@pytest.mark.parametrize("warm_start", [True, False])
def test_nonfinite_curvature_batch_skips_the_refresh_and_keeps_u(caplog, warm_start):
    """One NaN input makes g NaN everywhere. Before, the sanitised U-gradient was 0, the refresh was counted and,
    without warm start, U moved towards I (β·U + (1 − β)·I); now U is kept bit for bit."""
    model, bad = _mlp_batch(nan_row=2)
    _, clean = _mlp_batch()
    cfg = LLQRConfig(inner_steps=5, inner_lr=0.1, ema_decay=0.5, warm_start=warm_start)
    pre = LLQRPreconditioner(model, cfg)
    _random_u(pre)
    pre.num_updates = 4
    before = copy.deepcopy(pre.state_dict())
    caplog.set_level(logging.WARNING, logger="hf_llqrsam.llqr.refresh")
    metrics = pre.update(model, bad, step=10)
    assert metrics["llqr/skipped_refresh"] == 1.0 and metrics["llqr/updates"] == 4.0
    assert "llqr/objective_start" not in metrics and "llqr/update_seconds" in metrics
    after = pre.state_dict()
    assert _equal(
        [t for b in before["blocks"].values() for t in b.values()],
        [t for b in after["blocks"].values() for t in b.values()],
    )
    assert pre.num_updates == 4 and pre.last_update_step == 10 and not pre.is_due(10)
    pre.update(model, bad, step=20)  # a second skip: counted, not warned again
    warnings = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    msg = warnings[0].getMessage()
    assert "at step 10" in msg and "1 of 6 curvature rows have a non-finite loss" in msg and "non-finite" in msg
    metrics = pre.update(model, clean, step=30)  # a clean batch refreshes as usual
    assert metrics["llqr/skipped_refresh"] == 0.0 and pre.num_updates == 5 and pre.last_update_step == 30
    assert all(torch.isfinite(t).all() for t in pre.structure.parameters())
    assert not _equal([t for b in before["blocks"].values() for t in b.values()], _u(pre))


def test_nonfinite_curvature_products_skip_the_refresh():
    """g finite but G·v = Inf: J at the first inner step is not finite; U stays (no sanitised ±1 steps)."""
    model = TanhNet((3, 4, 3))
    pre = LLQRPreconditioner(model, LLQRConfig(inner_steps=3))
    _random_u(pre)
    before = _u(pre)
    g = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    metrics = pre.fit_problem(g, lambda v: {n: torch.full_like(t, float("inf")) for n, t in v.items()}, step=0)
    assert metrics["llqr/skipped_refresh"] == 1.0 and _equal(before, _u(pre)) and pre.num_updates == 0
    metrics = pre.fit_problem(g, lambda v: dict(v), step=1)
    assert metrics["llqr/skipped_refresh"] == 0.0 and pre.num_updates == 1


def test_nonfinite_update_probe_skips_the_refresh():
    model, batch = TanhNet((3, 4, 3)), _data()
    pre = LLQRPreconditioner(model, LLQRConfig(apply="update", inner_steps=3))
    nan_probe = lambda g: {n: torch.full_like(t, float("nan")) for n, t in g.items()}  # noqa: E731
    metrics = pre.update(model, batch, step=0, update_probe=nan_probe)
    assert metrics["llqr/skipped_refresh"] == 1.0 and pre.num_updates == 0 and pre.last_update_step == 0


# ---------------------------------------------------------------- include_pad_rows with pad_token_id


def _token_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3, dtype=torch.float64), nn.Linear(3, 5, dtype=torch.float64))
    ids = torch.tensor([[1, 2, 3, 0], [4, 1, 0, 0]])
    labels = torch.tensor([[2, 3, 4, -100], [1, 2, -100, -100]])
    return model, {"input": ids, "labels": labels}


def _hand_g(model, batch, pad_target: int | None) -> torch.Tensor:
    logits = model(batch["input"]).reshape(-1, 5)
    labels = batch["labels"].reshape(-1)
    ce = torch.nn.functional.cross_entropy(logits, labels.clamp_min(0), reduction="none")
    if pad_target is None:
        numerator = ce[labels != -100].sum()  # pad rows add nothing
    else:
        numerator = torch.nn.functional.cross_entropy(
            logits, torch.where(labels == -100, pad_target, labels), reduction="sum"
        )
    return flatten(torch.autograd.grad(numerator / labels.numel(), list(model.parameters())))  # N = every row


def test_update_passes_pad_token_id_to_the_curvature_problem(monkeypatch):
    model, batch = _token_model()
    pre = LLQRPreconditioner(model, LLQRConfig(include_pad_rows=True, inner_steps=2))
    seen = []
    original = pre.fit_problem

    def spy(g_dict, *args, **kwargs):
        seen.append(flatten([g_dict[n] for n in pre.names]))
        return original(g_dict, *args, **kwargs)

    monkeypatch.setattr(pre, "fit_problem", spy)
    pre.update(model, batch, step=0, pad_token_id=0)
    pre.update(model, batch, step=1)
    with_pad, without = seen
    torch.testing.assert_close(with_pad, _hand_g(model, batch, pad_target=0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(without, _hand_g(model, batch, pad_target=None), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(with_pad, without)
    off = LLQRPreconditioner(model, LLQRConfig(include_pad_rows=False, inner_steps=2))
    monkeypatch.setattr(off, "fit_problem", lambda g_dict, *a, **k: seen.append(flatten(g_dict.values())) or {})
    off.update(model, batch, step=0, pad_token_id=0)  # ignored without include_pad_rows: N = the valid rows
    g_valid = _hand_g(model, batch, pad_target=None) * batch["labels"].numel() / int((batch["labels"] != -100).sum())
    torch.testing.assert_close(seen[-1], g_valid, rtol=1e-12, atol=1e-14)


def test_progress_reports_every_curvature_product_and_changes_nothing():
    """`update(progress=...)` is called after each (G + λI)·v, one per inner step of the momentum solver; U is the
    same bit for bit as without it."""
    model, batch = TanhNet((3, 4, 3)), _data()
    cfg = LLQRConfig(inner_steps=6, ema_decay=0.0, inner_lr=0.05)
    quiet, reported = LLQRPreconditioner(model, cfg), LLQRPreconditioner(model, cfg)
    quiet.update(model, batch, step=0)
    calls: list[tuple[int, int]] = []
    reported.update(model, batch, step=0, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 6) for i in range(1, 7)]
    assert _equal(_u(quiet), _u(reported))
