"""Whether the LLQR curvature problem pairs logits at t with the label at t + 1 (`llqr_shift_labels`).

A causal LM predicts token t + 1 from position t, so its curvature rows are `(logits[:, t], labels[:, t + 1])`, the
pairing of its own loss (`ForCausalLMLoss` in transformers). Classification heads and encoder–decoder LMs (whose
labels are already aligned with the decoder positions) are not shifted. Getting this wrong fits U to the wrong
problem without any error, so `llqr_shift_labels="auto"` decides from what the model *is*, looking through wrappers
(PEFT, `torch.compile`, DDP), and raises when it cannot tell (`docs/integration.md` §5.3).
"""

from typing import Any

from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.models.auto import modeling_auto

from .distributed import unwrap
from .llqr.config import ShiftLabels

__all__ = ["ShiftLabels", "resolve_shift_labels", "underlying_model"]

# Auto mappings (keyed by config class) whose heads are not next-token predictors: rows are examples, tokens or
# decoder positions that already line up with their labels.
_NOT_SHIFTED = (
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING",
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING",
    "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING",
    "MODEL_FOR_AUDIO_FRAME_CLASSIFICATION_MAPPING",
    "MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING",
    "MODEL_FOR_TIME_SERIES_CLASSIFICATION_MAPPING",
    "MODEL_FOR_MULTIPLE_CHOICE_MAPPING",
    "MODEL_FOR_MASKED_LM_MAPPING",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING",
    "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING",
)


def underlying_model(model: nn.Module) -> nn.Module:
    """The model under its wrappers: `torch.compile` (`_orig_mod`), DDP (`.module`) and PEFT (`get_base_model()`,
    or `.base_model.model` for tuner wrappers without it), in any nesting. Stops at the first `PreTrainedModel`."""
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        model = unwrap(model)
        if isinstance(model, PreTrainedModel):
            return model
        get_base_model = getattr(model, "get_base_model", None)
        inner = getattr(getattr(model, "base_model", None), "model", None)
        if callable(get_base_model):
            model = get_base_model()
        elif isinstance(inner, nn.Module):
            model = inner
    return model


def _head_classes(mapping_name: str, config: Any) -> tuple[type, ...]:
    """The model classes an auto mapping registers for this config class (none if the mapping lacks it)."""
    mapping = getattr(modeling_auto, mapping_name, None)
    if mapping is None or type(config) not in mapping:
        return ()
    classes = mapping[type(config)]
    return tuple(classes) if isinstance(classes, (tuple, list)) else (classes,)


def _decide(model: nn.Module, labels: Tensor | None) -> tuple[bool, str] | None:
    """(shift, reason) from the model itself, then from the labels; None when neither tells."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is not None:
        if getattr(config, "is_encoder_decoder", False):
            return False, f"{name} is an encoder-decoder model (config.is_encoder_decoder)"
        causal = _head_classes("MODEL_FOR_CAUSAL_LM_MAPPING", config)
        if causal and isinstance(model, causal):
            return True, f"{name} is a causal-LM head for {type(config).__name__}"
        for mapping_name in _NOT_SHIFTED:
            heads = _head_classes(mapping_name, config)
            if heads and isinstance(model, heads):
                kind = mapping_name.removeprefix("MODEL_FOR_").removesuffix("_MAPPING").lower().replace("_", "-")
                return False, f"{name}: {kind} head"
        can_generate = getattr(model, "can_generate", None)
        if callable(can_generate) and can_generate():
            return True, f"{name} is a decoder-only generative model (can_generate, not encoder-decoder)"
    if labels is not None and labels.dim() == 1:
        return False, "the labels have one entry per example (no sequence dimension)"
    return None


def resolve_shift_labels(setting: str, model: nn.Module, labels: Tensor | None = None) -> tuple[bool, str]:
    """Resolve `llqr_shift_labels` for `model`: whether the curvature rows pair logits at t with labels at t + 1.

    `"true"` / `"false"` are taken as given. `"auto"` looks through the wrappers ([`underlying_model`]) and decides,
    in this order:

    1. `config.is_encoder_decoder` → no shift (the labels are aligned with the decoder inputs);
    2. the model is an instance of the causal-LM class that `MODEL_FOR_CAUSAL_LM_MAPPING` registers for its config
       class (user subclasses included) → shift;
    3. it is an instance of a classification, token-classification, masked-LM or seq2seq head class of the auto
       mappings → no shift;
    4. it can generate (`can_generate()`, i.e. a `GenerationMixin` decoder; remote-code causal LMs) → shift;
    5. the labels are 1-D (one per example, a classifier) → no shift.

    Args:
        setting (`str`): `"auto"`, `"true"` or `"false"`.
        model (`nn.Module`): the model the curvature batch runs through, possibly wrapped.
        labels (`Tensor`, *optional*): the curvature batch's labels, for rule 5 and the checks of `"true"`.

    Returns:
        `tuple[bool, str]`: whether to shift, and why (for the log).

    Raises:
        `ValueError`: naming `llqr_shift_labels` when `"auto"` cannot decide (e.g. a plain `nn.Module` with
        `(B, T, V)` logits and `(B, T)` labels), or when `"true"` meets labels without a sequence dimension.
    """
    if setting == "false":
        return False, "llqr_shift_labels='false'"
    if setting == "true":
        if labels is not None and labels.dim() < 2:
            raise ValueError(
                f"Invalid llqr_shift_labels='true' with labels of shape {tuple(labels.shape)}: shifting needs a "
                "sequence dimension, labels (B, T). Use llqr_shift_labels='false' (or 'auto') for a classifier."
            )
        return True, "llqr_shift_labels='true'"
    if setting != "auto":
        raise ValueError(f"Invalid llqr_shift_labels={setting!r}. Must be one of 'auto', 'true', 'false'.")
    inner = underlying_model(model)
    decided = _decide(inner, labels)
    if decided is None:
        shape = "" if labels is None else f" and labels of shape {tuple(labels.shape)}"
        raise ValueError(
            f"Invalid llqr_shift_labels='auto' for {type(inner).__name__}{shape}: cannot tell whether it is a causal "
            "LM (logits at t predict the label at t + 1) from its config or class. Pass --llqr_shift_labels true "
            "for a causal LM, or --llqr_shift_labels false when labels are aligned with the logits."
        )
    return decided
