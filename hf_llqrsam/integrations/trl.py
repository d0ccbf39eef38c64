"""TRL's `SFTTrainer` (and `DPOTrainer`) with SAM-family and LLQR steps: a config and a trainer per method.

```python
>>> from hf_llqrsam.integrations.trl import LLQRSAMSFTConfig, LLQRSAMSFTTrainer
>>> args = LLQRSAMSFTConfig(output_dir="out", sam_mode="sam", sam_rho=0.05, llqr=True)
>>> LLQRSAMSFTTrainer(model=model, args=args, train_dataset=dataset).train()  # doctest: +SKIP
```

- **Configs** are TRL's configs plus [`~hf_llqrsam.args.LLQRSAMFields`], validated like
  [`~hf_llqrsam.LLQRSAMTrainingArguments`]: the `sam_*`/`llqr_*` fields before TRL's `__post_init__`, the support
  matrix after it, one warning naming ignored flags.
- **bf16.** TRL defaults `bf16` to True when it is not set (`bf16=None`). Where bf16 cannot run (no bf16 GPU or XLA
  device, and `use_cpu` not set) an unset `bf16` becomes False here, so a config built on a CPU-only machine works;
  an explicit `bf16=True` there still raises transformers' error, which names `use_cpu`. With `use_cpu=True` TRL's
  default stands (bf16 autocast on the CPU).
- **Trainers** are [`~hf_llqrsam.LLQRSAMTrainerMixin`] in front of TRL's trainer; every override passes its
  arguments through to TRL's signatures (TRL's `create_model_card(model_name, dataset_name, tags)` gets the
  `hf-llqrsam`, SAM-mode and `llqr` tags). TRL records metrics inside `compute_loss` (`entropy`,
  `mean_token_accuracy`, `num_tokens`, DPO's rewards); SAM's pass 2 runs `compute_loss` again at θ + ε, so those
  records are dropped there: the logged TRL metrics are those of the clean pass, and `num_tokens` counts each token
  once.
- **DPO** supports the SAM family but not LLQR: the LLQR curvature problem is the cross-entropy GGN/Hessian of
  labelled rows, while DPO's batches carry no `labels` and its loss is a logistic loss on policy/reference
  log-ratios; `llqr=True` raises at argument time.

Importing this module without TRL installed raises an `ImportError` that says `pip install "hf-llqrsam[trl]"`.
"""

from dataclasses import dataclass
from typing import Any, ClassVar

try:
    from trl.trainer.dpo_config import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.sft_config import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer
except ImportError as err:
    raise ImportError(
        f"hf_llqrsam.integrations.trl needs TRL, which could not be imported ({err}). Install it with: "
        'pip install "hf-llqrsam[trl]"'
    ) from err

from torch import nn
from transformers.utils import logging
from transformers.utils.import_utils import is_torch_bf16_gpu_available, is_torch_xla_available

from ..args import LLQRSAMFields, _post_init
from ..trainer import LLQRSAMTrainerMixin

__all__ = ["LLQRSAMDPOConfig", "LLQRSAMDPOTrainer", "LLQRSAMSFTConfig", "LLQRSAMSFTTrainer"]

logger = logging.get_logger(__name__)


def _default_bf16(config: Any) -> None:
    """TRL's unset `bf16` (None, meaning "True unless fp16") becomes False where bf16 cannot run.

    The condition is transformers' own (`TrainingArguments.__post_init__`: no `use_cpu`, no bf16 GPU, no XLA), so an
    unset `bf16` becomes False exactly where True would raise "Your setup doesn't support bf16/gpu".
    """
    bf16_device = config.use_cpu or is_torch_bf16_gpu_available() or is_torch_xla_available()
    if config.bf16 is None and not config.fp16 and not bf16_device:
        logger.info("No bf16 device and use_cpu is not set: TRL's default bf16=True is turned off (fp32).")
        config.bf16 = False


@dataclass
class LLQRSAMSFTConfig(SFTConfig, LLQRSAMFields):
    """[`trl.SFTConfig`] with the hf_llqrsam fields (see [`~hf_llqrsam.args.LLQRSAMFields`]).

    An unset `bf16` is False on a machine where bf16 cannot run (see the module docstring); no other default of
    `SFTConfig` is changed.
    """

    def __post_init__(self) -> None:
        _default_bf16(self)
        _post_init(self, super().__post_init__)


@dataclass
class LLQRSAMDPOConfig(DPOConfig, LLQRSAMFields):
    """[`trl.DPOConfig`] with the hf_llqrsam fields; SAM family only (`llqr=True` raises, see the module docstring).

    An unset `bf16` is False on a machine where bf16 cannot run; no other default of `DPOConfig` is changed.
    """

    llqr_unsupported: ClassVar[str | None] = (
        "DPO: the LLQR curvature problem is the cross-entropy of labelled rows (logits against `labels`), but DPO "
        "batches carry no labels and DPO's loss is a logistic loss on policy/reference log-ratios, so U would be "
        "fitted to a problem DPO does not optimise. Use the SAM family alone (sam_mode) with DPO, or LLQR with SFT "
        "(LLQRSAMSFTConfig)."
    )

    def __post_init__(self) -> None:
        _default_bf16(self)
        _post_init(self, super().__post_init__)


class _CleanPassMetrics:
    """TRL trainers record metrics in `compute_loss` (`self._metrics[mode][key]` lists, `self._total_train_tokens`);
    during SAM's pass 2 those records are undone, so the logs describe the clean pass and count tokens once."""

    _metrics: Any  # mode -> key -> list of recorded values
    _total_train_tokens: int
    llqrsam_perturbed_pass: bool

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        parent: Any = super()
        if not self.llqrsam_perturbed_pass:
            return parent.compute_loss(model, inputs, *args, **kwargs)
        kept = {key: list(values) for key, values in self._metrics["train"].items()}
        tokens = self._total_train_tokens
        try:
            return parent.compute_loss(model, inputs, *args, **kwargs)
        finally:
            self._metrics["train"].clear()
            self._metrics["train"].update(kept)
            self._total_train_tokens = tokens


class LLQRSAMSFTTrainer(_CleanPassMetrics, LLQRSAMTrainerMixin, SFTTrainer):
    """[`trl.SFTTrainer`] with SAM-family and LLQR steps; use it with [`LLQRSAMSFTConfig`].

    The curvature batch of LLQR goes through SFT's collator, so its `labels` carry SFT's masks (padding,
    completion-only, assistant-only); the label shift is decided by `llqr_shift_labels` (a causal LM: shifted).
    """

    args_class = LLQRSAMSFTConfig
    default_output_suffix = "SFT"


class LLQRSAMDPOTrainer(_CleanPassMetrics, LLQRSAMTrainerMixin, DPOTrainer):
    """[`trl.DPOTrainer`] with SAM-family steps (no LLQR); use it with [`LLQRSAMDPOConfig`].

    Pass 2 evaluates the DPO loss at θ + ε. The reference log-probabilities do not move: a separate reference model
    is never perturbed (it has no trainable parameters in the run), and with PEFT the reference is the base model
    with the adapter disabled, while ε lives on the adapter only.
    """

    args_class = LLQRSAMDPOConfig
    default_output_suffix = "DPO"
