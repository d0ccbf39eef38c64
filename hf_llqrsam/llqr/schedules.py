"""Per-refresh schedules of LLQR: the inner learning rate, the EMA decay β and the refresh interval E.

Each is a pure function of the optimizer step k at which a refresh runs, so a resumed run follows the same values
with no extra state (`num_updates` and `last_update_step` are all [`~hf_llqrsam.llqr.LLQRPreconditioner`] keeps).
The reference evaluates its schedules the same way: `precond_lr_fn(step)`, `ema_fn(step)` and
`step % precond_up_sched(step) == 0` in its training loop (github.com/SimonDufLab/LLQR, d2c62b3, `run.py:main`),
with the schedule functions of `lqr_optimizer/_src/utils/utils.py`. Its schedules take epochs and are converted
with `steps_per_epoch`; ours take optimizer steps, so the reference's `t_max` epochs become
`t_max · steps_per_epoch` steps.

With base b (`llqr_inner_lr` or `llqr_ema_decay`), other end v₁ (`*_schedule_value`) and length S
(`*_schedule_steps`), the value at step k is:

* `constant`: b;
* `cosine`: v₁ + (b − v₁)·½(1 + cos(π·min(k, S)/S)), so b at k = 0 and v₁ from k = S on;
* `warmup`: v₁ + (b − v₁)·min(k/S, 1), so v₁ at k = 0 and b from k = S on.

`cosine` is the reference's `cosine_annealing_schedule_per_epoch` with `cycle=False` (its `ema_scheduler/
cosine_annealing.yaml`; `eta_min` is v₁). The reference's precond-LR `cosine_annealing` keeps the default
`cycle=True`, which continues the cosine past S instead of holding v₁; the two agree on [0, S], the whole training
in its preset (`t_max` = the training length). `warmup` is its `step_warmup` (`init_value` is v₁, its
`warmup_ratio · total steps` is S). The reference computes these in float32; we compute in float64.

The IWSLT variant `transformer-iwslt14-de-en-ema-cosine0925` (`ema_decay: 0.8`, `ema_scheduler: cosine_annealing`,
`t_max: 133`, `eta_min: 0.925`, `cycle: false`) is `llqr_ema_decay=0.8`, `llqr_ema_schedule="cosine"`,
`llqr_ema_schedule_value=0.925`, `llqr_ema_schedule_steps=133·steps_per_epoch`: β rises from 0.8 at step 0 to
0.925 at the end of epoch 133. With E = 1000 that is β_j = v(1000·j) at refresh j.

The refresh interval is piecewise constant, `llqr_update_interval_milestones="k₁:E₁,k₂:E₂,…"` (strictly increasing
k_i ≥ 1, E_i ≥ 1): E(k) = E_i for the last k_i ≤ k, else `llqr_update_interval`, and a refresh is due at k when
k mod E(k) = 0. This is the reference's `piecewise_constant` `precond_update_scheduler` (optax's
`piecewise_constant_schedule`, scale applied from the boundary on), written with absolute intervals instead of
scales: its `boundaries: {15: 10}` with E = 1000 is `"⌈15·steps_per_epoch⌉:10000"`. As in the reference, the grid
stays anchored at step 0: after a milestone the next refresh is the next multiple of the new E, not k_i + E_i.
"""

import math
from collections.abc import Callable
from typing import Literal

from .config import LLQRConfig

__all__ = [
    "check_schedules",
    "ema_decay_at",
    "inner_lr_at",
    "on_refresh_grid",
    "parse_milestones",
    "refresh_due",
    "scheduled_value",
    "update_interval_at",
]

Milestones = tuple[tuple[int, int], ...]


def scheduled_value(
    schedule: Literal["constant", "cosine", "warmup"], step: int, base: float, value: float, steps: int | None
) -> float:
    """v(k) of the module table: `base` b, the other end `value` v₁, the length `steps` S (unused by `constant`).

    Raises:
        `ValueError`: for an unknown schedule, a negative step, or S missing or < 1 with `cosine` / `warmup`.
    """
    if schedule == "constant":
        return base
    if schedule not in ("cosine", "warmup"):
        raise ValueError(f"Invalid schedule={schedule!r}. Must be 'constant', 'cosine' or 'warmup'.")
    if steps is None or steps < 1:
        raise ValueError(f"The {schedule} schedule needs its length in steps (>= 1), got {steps!r}.")
    if step < 0:
        raise ValueError(f"Invalid step={step!r}. Must be >= 0.")
    frac = min(step, steps) / steps
    if schedule == "cosine":
        return value + (base - value) * 0.5 * (1.0 + math.cos(math.pi * frac))
    return value + (base - value) * frac


def inner_lr_at(config: LLQRConfig, step: int) -> float:
    """The inner learning rate η of a refresh at optimizer step `step` (`llqr_inner_lr_schedule`).

    The reference builds its solver with lr 1 and scales the solver's update by `precond_lr_fn(step)` when a
    precond-LR schedule is set (`run.py:main`, `preconditioner.py:BasePreconditioner._get_evaluate_lqr`); for
    `momentum`, `sgd` and `adam` that equals running the solver with lr η(step), which is what we do.
    """
    return scheduled_value(
        config.inner_lr_schedule, step, config.inner_lr, config.inner_lr_schedule_value, config.inner_lr_schedule_steps
    )


def ema_decay_at(config: LLQRConfig, step: int) -> float:
    """The EMA decay β of a refresh at optimizer step `step` (`llqr_ema_schedule`; the reference's `ema_fn(step)`)."""
    return scheduled_value(
        config.ema_schedule, step, config.ema_decay, config.ema_schedule_value, config.ema_schedule_steps
    )


def parse_milestones(text: str | None, field: str = "LLQRConfig.update_interval_milestones") -> Milestones:
    """`"k₁:E₁,k₂:E₂,…"` as `((k₁, E₁), (k₂, E₂), …)`; `None` or an empty string gives `()`.

    Args:
        text (`str`, *optional*): the milestones.
        field (`str`, *optional*, defaults to `"LLQRConfig.update_interval_milestones"`): what to call `text` in
            messages (the argument layer passes its flag's name).

    Raises:
        `ValueError`: naming `field`, for a malformed pair, a step < 1, an interval < 1 or steps that do not
            strictly increase.
    """
    if text is None or not text.strip():
        return ()
    where = f"Invalid {field}={text!r}"
    out: list[tuple[int, int]] = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"{where}: {item.strip()!r} is not 'step:interval' (two non-negative integers).")
        step, interval = int(parts[0]), int(parts[1])
        if step < 1 or interval < 1:
            raise ValueError(
                f"{where}: in {item.strip()!r} the step must be >= 1 (the base interval covers step 0) and the "
                "interval >= 1."
            )
        if out and step <= out[-1][0]:
            raise ValueError(f"{where}: the steps must strictly increase ({out[-1][0]} then {step}).")
        out.append((step, interval))
    return tuple(out)


def update_interval_at(base: int, milestones: Milestones, step: int) -> int:
    """E(k): the interval of the last milestone k_i ≤ `step`, else `base` (`llqr_update_interval`)."""
    interval = base
    for start, value in milestones:
        if start > step:
            break
        interval = value
    return interval


def check_schedules(config: LLQRConfig) -> Milestones:
    """Check the schedule settings of `config` and return the parsed milestones.

    Raises:
        `ValueError`: naming the `LLQRConfig` field: a `cosine` / `warmup` schedule without its length, or malformed
            milestones.
    """
    for name in ("inner_lr", "ema"):
        schedule = getattr(config, f"{name}_schedule")
        steps = getattr(config, f"{name}_schedule_steps")
        if schedule != "constant" and (steps is None or steps < 1):
            raise ValueError(
                f"Invalid LLQRConfig.{name}_schedule_steps={steps!r} with LLQRConfig.{name}_schedule={schedule!r}: "
                f"the {schedule} schedule needs its length in optimizer steps (>= 1)."
            )
    return parse_milestones(config.update_interval_milestones)


def on_refresh_grid(config: LLQRConfig, milestones: Milestones, step: int) -> bool:
    """k mod E(k) = 0 and k < `update_until`: the refresh grid 0, E, 2E, … (`docs/algorithm.md` §5.4).

    Args:
        config (`LLQRConfig`): reads `update_interval` and `update_until`.
        milestones (`Milestones`): `config.update_interval_milestones`, parsed ([`check_schedules`]).
        step (`int`): the optimizer step k.
    """
    until = config.update_until
    return step % update_interval_at(config.update_interval, milestones, step) == 0 and (until is None or step < until)


def refresh_due(
    config: LLQRConfig,
    milestones: Milestones,
    step: int,
    last_update_step: int | None,
    lr_at: Callable[[int], float] | None = None,
) -> bool:
    """Whether a refresh runs before optimizer step `step`: k on the grid ([`on_refresh_grid`]), once per k (§5.4).

    A pure function of k, the config, the schedule `lr_at` and the step of the last refresh, so resume needs no
    state beyond `last_update_step`. The reference's cadence is `step % precond_up_sched(step) == 0`
    (github.com/SimonDufLab/LLQR, d2c62b3, `run.py:main`).

    With `apply="update"` and `lr_at` (k ↦ the base optimizer's learning rate at step k, from the LR schedule) a
    refresh needs an informative probe Δ_opt(g), which is zero at a zero learning rate: a grid step whose LR is 0
    (a warm-up that starts at 0) is deferred to the first later step with LR > 0, and the grid itself is unchanged
    (the refreshes after it stay at E, 2E, …). So k is due when LR(k) > 0 and, walking back from k, a grid step is
    met before any earlier step with LR > 0. In `gradient` mode, or without `lr_at`, `lr_at` is not read.

    Args:
        config (`LLQRConfig`): reads `update_interval`, `update_until` and `apply`.
        milestones (`Milestones`): the parsed `update_interval_milestones` ([`check_schedules`]).
        step (`int`): the optimizer step k.
        last_update_step (`int`, *optional*): the step of the last refresh (run or skipped); never due twice.
        lr_at (`Callable[[int], float]`, *optional*): the base optimizer's learning rate at a step.
    """
    if step == last_update_step:
        return False
    if config.apply != "update" or lr_at is None:
        return on_refresh_grid(config, milestones, step)
    until = config.update_until
    if (until is not None and step >= until) or not lr_at(step) > 0:
        return False
    for k in range(step, -1, -1):  # usually two look-ups: LR(k) > 0 and LR(k − 1) > 0 end it off the grid
        if k < step and lr_at(k) > 0:
            return False  # a step with LR > 0 after the last grid step: that step had the refresh
        if on_refresh_grid(config, milestones, k):
            return True
    return False
