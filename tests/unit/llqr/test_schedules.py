"""The per-refresh schedules (inner LR, EMA β, piecewise-constant E): hand-computed values, the refresh grid, that a
refresh uses them, and that a resumed run reproduces an uninterrupted one bit for bit (float64)."""

import io
import math

import pytest
import torch

from hf_llqrsam.llqr import LLQRConfig, LLQRPreconditioner
from hf_llqrsam.llqr.schedules import (
    check_schedules,
    ema_decay_at,
    inner_lr_at,
    parse_milestones,
    scheduled_value,
    update_interval_at,
)
from tests.oracles.dense_llqr import TanhNet


def _reference_cosine_no_cycle(t, base, t_max_epochs, steps_per_epoch, eta_min):
    """The reference's `cosine_annealing_schedule_per_epoch(..., cycle=False)` written out (`utils.py`)."""
    step_max = steps_per_epoch * t_max_epochs
    t = min(t, step_max)
    return eta_min + (base - eta_min) * 0.5 * (1 + math.cos(math.pi * t / step_max))


def _reference_step_warmup(s, base, total_epochs, steps_per_epoch, warmup_ratio, init_value):
    """The reference's `step_warmup` written out (`utils.py`)."""
    warmup_steps = total_epochs * steps_per_epoch * warmup_ratio
    return init_value + (base - init_value) * min(s / warmup_steps, 1)


def test_constant_cosine_warmup_values():
    assert scheduled_value("constant", 123, 0.3, 9.0, None) == 0.3
    assert scheduled_value("cosine", 0, 1.0, 0.2, 100) == 1.0
    assert math.isclose(scheduled_value("cosine", 50, 1.0, 0.2, 100), 0.6, rel_tol=1e-15)
    assert math.isclose(scheduled_value("cosine", 25, 1.0, 0.2, 100), 0.2 + 0.8 * (1 + math.sqrt(0.5)) / 2)
    assert scheduled_value("cosine", 100, 1.0, 0.2, 100) == scheduled_value("cosine", 10**6, 1.0, 0.2, 100) == 0.2
    assert scheduled_value("warmup", 0, 1e-3, 5e-4, 40) == 5e-4
    assert math.isclose(scheduled_value("warmup", 10, 1e-3, 5e-4, 40), 5e-4 + 5e-4 / 4, rel_tol=1e-15)
    assert scheduled_value("warmup", 40, 1e-3, 5e-4, 40) == scheduled_value("warmup", 41, 1e-3, 5e-4, 40) == 1e-3
    for bad in ((None,), (0,)):
        with pytest.raises(ValueError, match="needs its length"):
            scheduled_value("cosine", 3, 1.0, 0.0, *bad)
    with pytest.raises(ValueError, match="Invalid schedule='linear'"):
        scheduled_value("linear", 3, 1.0, 0.0, 10)  # type: ignore[arg-type]


def test_iwslt_ema_cosine_0925_in_steps():
    """`transformer-iwslt14-de-en-ema-cosine0925`: β from 0.8 to 0.925 over 133 epochs = 133·steps_per_epoch steps,
    evaluated at the refreshes 0, E, 2E, … (E = 1000)."""
    steps_per_epoch = 1103  # any value: the schedule only sees S = 133 · steps_per_epoch
    S = 133 * steps_per_epoch
    cfg = LLQRConfig(ema_decay=0.8, ema_schedule="cosine", ema_schedule_value=0.925, ema_schedule_steps=S)
    for j in range(0, S // 1000 + 5):
        step = 1000 * j
        want = _reference_cosine_no_cycle(step, 0.8, 133, steps_per_epoch, 0.925)
        assert math.isclose(ema_decay_at(cfg, step), want, rel_tol=1e-14, abs_tol=1e-15), step
    assert ema_decay_at(cfg, 0) == 0.8 and ema_decay_at(cfg, S) == 0.925 and ema_decay_at(cfg, 2 * S) == 0.925
    assert math.isclose(ema_decay_at(cfg, S // 2), 0.8625, rel_tol=1e-5)  # S is odd: half-way up to 1e-5
    assert all(ema_decay_at(cfg, a) < ema_decay_at(cfg, a + 1000) for a in range(0, S - 1000, 1000))  # increasing


def test_precond_lr_step_warmup_preset():
    """`precond_lr_scheduler/step_warmup.yaml` (warmup_ratio 0.2, init_value 5e-4) on precond_lr 1e-3."""
    total_epochs, steps_per_epoch = 200, 391
    S = round(total_epochs * steps_per_epoch * 0.2)
    cfg = LLQRConfig(
        inner_lr=1e-3, inner_lr_schedule="warmup", inner_lr_schedule_value=5e-4, inner_lr_schedule_steps=S
    )
    for step in (0, 1000, 7000, S, S + 1000, 78200):
        want = _reference_step_warmup(step, 1e-3, total_epochs, steps_per_epoch, 0.2, 5e-4)
        assert math.isclose(inner_lr_at(cfg, step), want, rel_tol=1e-14), step


def test_milestones_parse_and_interval():
    assert parse_milestones(None) == () == parse_milestones("  ")
    assert parse_milestones("10:3, 20:7") == ((10, 3), (20, 7))
    ms = parse_milestones("10:3,20:7")
    assert [update_interval_at(4, ms, k) for k in (0, 9, 10, 19, 20, 10**6)] == [4, 4, 3, 3, 7, 7]
    for bad, match in [
        ("10", "is not 'step:interval'"),
        ("10:3:4", "is not 'step:interval'"),
        ("a:3", "is not 'step:interval'"),
        ("10:-3", "is not 'step:interval'"),
        ("0:3", "the step must be >= 1"),
        ("10:0", "the interval >= 1"),
        ("20:3,10:7", "must strictly increase"),
        ("10:3,10:7", "must strictly increase"),
    ]:
        with pytest.raises(ValueError, match=rf"Invalid LLQRConfig\.update_interval_milestones='{bad}'.*{match}"):
            parse_milestones(bad)


def test_milestone_errors_name_the_field_the_caller_gives():
    """The math names the `LLQRConfig` field; the argument layer passes its flag instead."""
    with pytest.raises(ValueError, match=r"^Invalid llqr_update_interval_milestones='5': '5' is not"):
        parse_milestones("5", field="llqr_update_interval_milestones")


def test_refresh_grid_with_milestones_is_anchored_at_zero():
    """k mod E(k) = 0 with E = 4, then 3 from step 10, then 7 from step 20, none at or after 30: the grid of the
    reference's `step % precond_up_sched(step) == 0`, by hand."""
    model = TanhNet((2, 2), seed=0)
    pre = LLQRPreconditioner(
        model, LLQRConfig(update_interval=4, update_interval_milestones="10:3,20:7", update_until=30)
    )
    assert [k for k in range(45) if pre.is_due(k)] == [0, 4, 8, 12, 15, 18, 21, 28]
    plain = LLQRPreconditioner(model, LLQRConfig(update_interval=4))
    assert [k for k in range(20) if plain.is_due(k)] == [0, 4, 8, 12, 16]


def test_check_schedules_rejects_a_schedule_without_length():
    with pytest.raises(
        ValueError, match=r"LLQRConfig\.ema_schedule_steps=None with LLQRConfig\.ema_schedule='cosine'"
    ):
        check_schedules(LLQRConfig(ema_schedule="cosine"))
    with pytest.raises(
        ValueError, match=r"LLQRConfig\.inner_lr_schedule_steps=0 with LLQRConfig\.inner_lr_schedule='warmup'"
    ):
        LLQRPreconditioner(TanhNet((2, 2)), LLQRConfig(inner_lr_schedule="warmup", inner_lr_schedule_steps=0))
    with pytest.raises(ValueError, match=r"LLQRConfig\.update_interval_milestones='5'"):
        LLQRPreconditioner(TanhNet((2, 2)), LLQRConfig(update_interval_milestones="5"))
    assert check_schedules(LLQRConfig(update_interval_milestones="5:2")) == ((5, 2),)


def _batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    return {"x": x, "labels": torch.randint(0, 3, (6,), generator=gen)}


SCHEDULED = LLQRConfig(
    update_interval=3,
    update_interval_milestones="7:2,12:5",
    inner_steps=4,
    inner_solver="adam",
    inner_lr=0.05,
    inner_lr_schedule="cosine",
    inner_lr_schedule_value=0.005,
    inner_lr_schedule_steps=16,
    ema_decay=0.9,
    ema_schedule="warmup",
    ema_schedule_value=0.2,
    ema_schedule_steps=10,
    damping=0.1,
)


def test_a_refresh_uses_the_values_at_its_step():
    """The refresh at step k equals a refresh with constant η = η(k) and β = β(k), bit for bit."""
    model = TanhNet((3, 4, 3), seed=1)
    for step in (0, 5, 9, 20):
        pre = LLQRPreconditioner(model, SCHEDULED)
        metrics = pre.update(model, _batch(1), step=step)
        lr, decay = inner_lr_at(SCHEDULED, step), ema_decay_at(SCHEDULED, step)
        assert metrics["llqr/inner_lr"] == lr and metrics["llqr/ema_decay"] == decay
        constant = LLQRConfig(
            update_interval=3, inner_steps=4, inner_solver="adam", inner_lr=lr, ema_decay=decay, damping=0.1
        )
        ref = LLQRPreconditioner(model, constant)
        ref.update(model, _batch(1), step=step)
        for a, b in zip(pre.structure.parameters(), ref.structure.parameters(), strict=True):
            assert torch.equal(a, b)
    # the values really change along the steps
    assert inner_lr_at(SCHEDULED, 0) == 0.05 and inner_lr_at(SCHEDULED, 16) == 0.005
    assert ema_decay_at(SCHEDULED, 0) == 0.2 and math.isclose(ema_decay_at(SCHEDULED, 10), 0.9, rel_tol=1e-15)


def _run(pre, model, steps):
    for k in steps:
        if pre.is_due(k):
            pre.update(model, _batch(k), step=k)


@pytest.mark.parametrize("cut", [5, 8, 13])
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(cut):
    """Schedules and milestones depend on the step alone: save after step `cut` − 1, reload into a fresh
    preconditioner (through `torch.save` / `weights_only` load), continue, and U and the counters are identical."""
    model = TanhNet((3, 4, 3), seed=1)
    whole = LLQRPreconditioner(model, SCHEDULED)
    _run(whole, model, range(24))
    first = LLQRPreconditioner(model, SCHEDULED)
    _run(first, model, range(cut))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = LLQRPreconditioner(model, SCHEDULED)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    _run(resumed, model, range(cut, 24))
    # E = 3 until step 6, 2 from step 7, 5 from step 12: refreshes at 0, 3, 6, 8, 10, 15, 20
    assert [k for k in range(24) if LLQRPreconditioner(model, SCHEDULED).is_due(k)] == [0, 3, 6, 8, 10, 15, 20]
    assert (resumed.num_updates, resumed.last_update_step) == (whole.num_updates, whole.last_update_step) == (7, 20)
    for a, b in zip(resumed.structure.parameters(), whole.structure.parameters(), strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, torch.ones_like(a)) for a in whole.structure.parameters())


def test_fit_problem_without_a_step_uses_step_zero():
    model = TanhNet((3, 4, 3), seed=1)
    pre = LLQRPreconditioner(model, SCHEDULED)
    metrics = pre.update(model, _batch(0), step=None)
    assert metrics["llqr/inner_lr"] == 0.05 and metrics["llqr/ema_decay"] == 0.2
