"""U diagnostics (issue 12, item 2): `llqr/u_rms_displacement`, `llqr/u_at_floor`, `llqr/objective_ratio`, the
per-tensor summary and the once-per-run floor warning, against direct computations on a hand-set U (float64); and
the deferral of `llqr_apply="update"` refreshes past LR 0 (item 4)."""

import logging
import math

import pytest
import torch

from hf_llqrsam.llqr import LLQRConfig, LLQRPreconditioner
from hf_llqrsam.llqr.diagnostics import block_summary, u_diagnostics
from tests.oracles.dense_llqr import TanhNet

MIN_DIAG = 1e-3
LOGGER = "hf_llqrsam.llqr.refresh"


def _data(seed: int = 1, n: int = 8):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return {"x": x, "labels": torch.randint(0, 3, (n,), generator=gen)}


def _frozen_refresh_config(**kw) -> LLQRConfig:
    """A refresh that keeps U (β = 1), so its metrics describe the hand-set U."""
    return LLQRConfig(inner_steps=2, ema_decay=1.0, min_diag=MIN_DIAG, **kw)


def _set_diagonal(pre: LLQRPreconditioner, floor_share: dict[str, int]) -> dict[str, torch.Tensor]:
    """d = 0.5 … 2 (seeded), with the first `floor_share[name]` entries of a tensor at the floor."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    with torch.no_grad():
        for layout, blk in zip(pre.structure.layouts, pre.structure.blocks, strict=True):
            d = blk["d"]
            d.copy_(0.5 + 1.5 * torch.rand(d.shape, generator=gen, dtype=d.dtype))
            d.view(-1)[: floor_share.get(layout.name, 0)] = MIN_DIAG
            out[layout.name] = d.clone()
    return out


def test_diagonal_metrics_equal_a_direct_computation(caplog):
    model = TanhNet((3, 4, 3), seed=1)
    pre = LLQRPreconditioner(model, _frozen_refresh_config())
    d = _set_diagonal(pre, {"layers.1.bias": 2})  # 2 of 3 output biases at the floor
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        metrics = pre.update(model, _data())
    flat = torch.cat([t.reshape(-1) for t in d.values()])
    assert metrics["llqr/u_rms_displacement"] == pytest.approx(float(((flat - 1) ** 2).mean().sqrt()), rel=1e-12)
    assert metrics["llqr/u_at_floor"] == pytest.approx(2 / flat.numel())
    assert metrics["llqr/objective_ratio"] == pytest.approx(
        metrics["llqr/objective_end"] / metrics["llqr/objective_start"]
    )
    warnings = [r for r in caplog.records if "floor" in r.getMessage()]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "layers.1.bias 66.7%" in message and "layers.0.weight" not in message
    for flag in ("LLQRConfig.inner_lr", "LLQRConfig.ema_decay", "LLQRConfig.min_diag"):
        assert flag in message

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        pre.update(model, _data(seed=2))  # still at the floor: no second warning in the run
    assert not [r for r in caplog.records if "floor" in r.getMessage()]


def test_no_floor_warning_when_nothing_is_at_the_floor(caplog):
    model = TanhNet((3, 4, 3), seed=1)
    pre = LLQRPreconditioner(model, _frozen_refresh_config())
    _set_diagonal(pre, {})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        metrics = pre.update(model, _data())
    assert metrics["llqr/u_at_floor"] == 0.0
    assert not [r for r in caplog.records if "floor" in r.getMessage()]


def test_floor_warning_from_a_large_inner_lr(caplog):
    """Not hand-set: a large inner LR with β = 0 overshoots below zero and the clamp puts entries on the floor."""
    model = TanhNet((3, 4, 3), seed=1)
    pre = LLQRPreconditioner(model, LLQRConfig(inner_steps=20, inner_lr=50.0, ema_decay=0.0, min_diag=MIN_DIAG))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        metrics = pre.update(model, _data())
    d = torch.cat([t.reshape(-1) for t in pre.structure.parameters()])
    assert metrics["llqr/u_at_floor"] == pytest.approx(float((d <= MIN_DIAG * (1 + 1e-6)).double().mean()))
    assert metrics["llqr/u_at_floor"] > 0.01
    assert len([r for r in caplog.records if "floor" in r.getMessage()]) == 1


def test_scalar_displacement_divides_out_the_identity_scaling():
    model = TanhNet((3, 4, 3), seed=1)
    pre = LLQRPreconditioner(model, LLQRConfig(structure="scalar", identity_scaling=2.0, min_diag=MIN_DIAG))
    cs = [0.5, 1.5]  # U = c·I per clip group: the stored value is s·c
    with torch.no_grad():
        for t, c in zip(pre.structure.parameters(), cs, strict=True):
            t.fill_(2.0 * c)
    got = u_diagnostics(pre.structure, MIN_DIAG)
    assert got["llqr/u_rms_displacement"] == pytest.approx(math.sqrt(((0.5 - 1) ** 2 + (1.5 - 1) ** 2) / 2))
    assert got["llqr/u_at_floor"] == 0.0
    with torch.no_grad():
        pre.structure.parameters()[0].fill_(MIN_DIAG)  # the clamp acts on the stored s·c
    assert u_diagnostics(pre.structure, MIN_DIAG)["llqr/u_at_floor"] == 0.5
    assert u_diagnostics(pre.structure, None)["llqr/u_at_floor"] == 0.0  # allow_inversion: no floor


def test_kfac_displacement_is_over_the_factor_entries():
    model = TanhNet((3, 4, 3), seed=1)
    pre = LLQRPreconditioner(model, LLQRConfig(structure="kfac"))
    gen = torch.Generator().manual_seed(3)
    expected_sq, n = 0.0, 0
    with torch.no_grad():
        for blk in pre.structure.blocks:
            for t in blk.values():
                ident = torch.eye(t.shape[0], dtype=t.dtype) if t.dim() == 2 else torch.ones_like(t)
                t.add_(0.1 * torch.randn(t.shape, generator=gen, dtype=t.dtype))
                expected_sq += float(((t - ident) ** 2).sum())
                n += t.numel()
    got = u_diagnostics(pre.structure, MIN_DIAG)
    assert got["llqr/u_rms_displacement"] == pytest.approx(math.sqrt(expected_sq / n), rel=1e-12)
    assert got["llqr/u_at_floor"] == 0.0  # Kronecker structures have no floor


def test_u_summary_per_tensor():
    model = TanhNet((3, 4, 3), seed=1)
    pre = LLQRPreconditioner(model, _frozen_refresh_config())
    d = _set_diagonal(pre, {"layers.0.weight": 3})
    pre.update(model, _data(), step=7)
    summary = pre.u_summary()
    assert summary["structure"] == "diagonal" and summary["last_update_step"] == 7 and summary["num_updates"] == 1
    assert set(summary["modules"]) == set(d)
    for name, t in d.items():
        row = summary["modules"][name]
        assert row["structure"] == "diagonal" and row["entries"] == t.numel() and row["last_update_step"] == 7
        assert row["min"] == float(t.min()) and row["max"] == float(t.max())
        assert row["mean"] == pytest.approx(float(t.mean()), rel=1e-12)
        assert row["rms_displacement"] == pytest.approx(float(((t - 1) ** 2).mean().sqrt()), rel=1e-12)
        assert row["at_floor"] == pytest.approx((3 if name == "layers.0.weight" else 0) / t.numel())
    assert block_summary(pre.structure, MIN_DIAG) == {
        k: {key: v for key, v in row.items() if key != "last_update_step"} for k, row in summary["modules"].items()
    }


# ---------------------------------------------------------------- item 4: the deferral past LR 0


def _refresh_steps(cfg: LLQRConfig, lr_at, steps: int) -> list[int]:
    pre = LLQRPreconditioner(TanhNet((2, 2), seed=0), cfg)
    due = []
    for k in range(steps):
        if pre.is_due(k, lr_at=lr_at):
            due.append(k)
            pre.last_update_step = k
    return due


def test_update_mode_defers_the_first_refresh_past_lr_zero():
    warmup = lambda k: min(k / 3, 1.0) * 1e-3  # noqa: E731 - LR 0 at step 0, as a linear warm-up
    update = LLQRConfig(apply="update", update_interval=4)
    assert _refresh_steps(update, warmup, 13) == [1, 4, 8, 12]  # deferred to 1, then the grid keeps its cadence
    assert _refresh_steps(LLQRConfig(update_interval=4), warmup, 13) == [0, 4, 8, 12]  # gradient mode: unchanged
    assert _refresh_steps(update, None, 13) == [0, 4, 8, 12]
    late = lambda k: 0.0 if k < 6 else 1e-3  # noqa: E731 - a zero stretch past the grid step 4
    assert _refresh_steps(update, late, 13) == [6, 8, 12]
    # a pure function of the step: a fresh instance (a resumed run) agrees at every step
    pre = LLQRPreconditioner(TanhNet((2, 2), seed=0), update)
    assert [k for k in range(13) if pre.is_due(k, lr_at=late)] == [6, 8, 12]
    until = LLQRConfig(apply="update", update_interval=4, update_until=6)
    assert _refresh_steps(until, late, 13) == []  # no refresh at or after llqr_update_until
