"""ρ schedules over the optimizer step (`docs/algorithm.md` §9)."""

import math

# The reference's opt-in IWSLT14 ramp (github.com/SimonDufLab/LLQR, d2c62b3, perturbation_rho_scheduler): its
# constants are fixed in the reference config, so they are fixed here too.
_RAMP_RHO0 = 0.005
_RAMP_START, _RAMP_END = 4000, 150000
_RAMP_BUMP_START, _RAMP_BUMP_EVERY, _RAMP_BUMP = 200000, 50000, 0.05


def iwslt14_cosine_ramp(step: int, rho: float) -> float:
    """ρ(s) = ρ₀ + (ρ − ρ₀)·½(1 − cos(π·clip((s − 4000)/146000, 0, 1))) + 0.05·n(s), ρ₀ = 0.005.

    n(s) = 0 for s < 200 000, else ⌊(s − 200 000)/50 000⌋ + 1.

    The reference's `lqr_optimizer/_src/utils/utils.py:cosine_ramp_step_increase_schedule` with the constants of its
    preset `configs/perturbation_rho_scheduler/iwslt14_cosine_ramp_step_increase.yaml` (checked step by step in
    `tests/unit/test_sam_reference_parity.py`). That preset pins the target at 0.2 whatever `perturbation_rho` is;
    here the target is `rho` (`sam_rho`), so `--sam_rho 0.2` reproduces it. A pure function of the step, so resume
    needs no state.
    """
    frac = min(max((step - _RAMP_START) / (_RAMP_END - _RAMP_START), 0.0), 1.0)
    bumps = 0 if step < _RAMP_BUMP_START else (step - _RAMP_BUMP_START) // _RAMP_BUMP_EVERY + 1
    return _RAMP_RHO0 + (rho - _RAMP_RHO0) * 0.5 * (1.0 - math.cos(math.pi * frac)) + _RAMP_BUMP * bumps


def lr_proportional(lr: float, lr_max: float, lr_min: float, rho: float, rho_min: float) -> float:
    """GSAM's ρ_t = ρ_min + (ρ − ρ_min)(lr_t − lr_min)/(lr_max − lr_min) (Zhuang et al., ICLR 2022)."""
    if lr_max <= lr_min:
        return rho
    return rho_min + (rho - rho_min) * (lr - lr_min) / (lr_max - lr_min)


def rho_at(schedule: str, step: int, rho: float, rho_min: float = 0.0, lr: float = 0.0, lr_max: float = 0.0) -> float:
    """ρ at optimizer step `step` for `schedule` ∈ {constant, iwslt14_cosine_ramp, lr_proportional}.

    `lr_proportional` takes the live learning rate `lr`, the peak `lr_max` and lr_min = 0.
    """
    match schedule:
        case "constant":
            return rho
        case "iwslt14_cosine_ramp":
            return iwslt14_cosine_ramp(step, rho)
        case "lr_proportional":
            return lr_proportional(lr, lr_max, 0.0, rho, rho_min)
    raise ValueError(
        f"Invalid sam_rho_schedule={schedule!r}. Must be constant, iwslt14_cosine_ramp or lr_proportional."
    )
