"""The typed, frozen SAM-family config: the only SAM settings object the math modules accept.

It is built from the flat CLI fields by [`~hf_llqrsam.args.LLQRSAMFields.to_sam_config`], field by field. The
`Literal` aliases below are the single source of the allowed values: the CLI fields are typed with the same aliases.

Pure Python: imports nothing but the standard library.
"""

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Accumulation",
    "BNStats",
    "FSAMEma",
    "FSAMInit",
    "FisherSAMForm",
    "InfoSAMVariance",
    "Norm",
    "RhoSchedule",
    "SAMConfig",
    "past_fsam_window",
    "SAMMode",
    "Scope",
]

# Must list exactly `hf_llqrsam.modes.SAM_MODE_NAMES` (a test checks it; mypy needs the values spelled out).
SAMMode = Literal[
    "none",
    "sam",
    "asam",
    "fsam",
    "fisher_sam",
    "gsam",
    "vasso",
    "infosam",
    "past_fsam",
    "looksam",
    "wsam",
    "flat_lora",
    "bi_lora",
]
RhoSchedule = Literal["constant", "iwslt14_cosine_ramp", "lr_proportional"]
Norm = Literal["euclidean", "matrix", "layer_euclidean", "layer_matrix"]
Accumulation = Literal["window", "micro"]
Scope = Literal["global", "local"]
BNStats = Literal["second", "first"]
FSAMInit = Literal["zero", "first_grad"]
FSAMEma = Literal["grad", "precond_grad", "direction"]
FisherSAMForm = Literal["reference", "paper"]
InfoSAMVariance = Literal["instant", "ema"]


def past_fsam_window(overlap: float) -> int:
    """K = round(1 / (1 − f)): how many fresh batches past-FSAM's one pass runs on, for `past_fsam_overlap` f.

    The reference (SimonDufLab/LLQR, `lqr_optimizer/_src/utils/utils.py:prepare_dataloader`) cuts the stream into
    chunks of `replace = round(B (1 − f))` examples and yields windows of `K = B / replace` consecutive chunks that
    advance by one chunk per step (it raises unless `B % replace == 0`), so consecutive batches share B − replace.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"Invalid past_fsam_overlap={overlap!r}. Must be in [0, 1).")
    return max(1, round(1.0 / (1.0 - overlap)))


@dataclass(frozen=True)
class SAMConfig:
    """The SAM-family settings of one run (defaults from `docs/algorithm.md` §12.1), the only SAM settings object the
    math and the engine accept.

    Each field mirrors a flag of [`~hf_llqrsam.args.LLQRSAMFields`]: `mode`, `rho`, `rho_schedule`, `rho_min`,
    `start_step`, `end_step`, `interval`, `norm`, `eps`, `accumulation`, `scope`, `bn_stats` and `same_dropout` are
    `sam_<name>`; the per-mode fields keep their flag names. Each is described once, in its flag's help (the flag
    reference `docs/reference/flags.md`, generated from it, and `--help`). The defaults equal the flags' defaults,
    except `mode` (`"sam"` here, as the config is only consulted for a SAM run; `"none"` on the CLI) and
    `fisher_sam_eta`, which is resolved (0.1 for the reference form, 1.0 for the paper form). The plain API
    [`~hf_llqrsam.api.SAM`] takes the same fields as keyword arguments.

    Example:

    ```python
    >>> from hf_llqrsam.config import SAMConfig
    >>> SAMConfig(mode="fsam", rho=0.05, fsam_beta=0.95).start_step  # sam_mode, sam_rho, fsam_beta
    0
    ```
    """

    mode: SAMMode = "sam"
    rho: float = 0.1
    rho_schedule: RhoSchedule = "constant"
    rho_min: float = 0.0
    start_step: int = 0
    end_step: int | None = None
    interval: int = 1
    norm: Norm = "euclidean"
    eps: float = 1e-12
    accumulation: Accumulation = "window"
    scope: Scope = "global"
    bn_stats: BNStats = "second"
    same_dropout: bool = False
    asam_eta: float = 0.01
    fsam_beta: float = 0.9
    fsam_sigma: float = 1.0
    fsam_init: FSAMInit = "zero"
    fisher_sam_form: FisherSAMForm = "reference"
    fisher_sam_eta: float = 0.1
    gsam_alpha: float = 0.4
    vasso_theta: float = 0.4
    infosam_alpha: float = 0.9
    infosam_damping: float = 1e-8
    infosam_variance: InfoSAMVariance = "instant"
    fsam_ema: FSAMEma = "precond_grad"
    past_fsam_overlap: float = 0.0
    looksam_interval: int = 5
    looksam_alpha: float = 0.7
    wsam_gamma: float = 0.9
    wsam_decouple: bool = True
    flat_lora_ramp_steps: int | None = None
    bi_lora_lr: float | None = None
    seed: int = 42
