"""The `llqrsam_state.pt` file saved next to `optimizer.pt` (`docs/integration.md` §9).

It holds only tensors, primitives, dicts and lists, so it loads with `torch.load(..., weights_only=True)`. The top
level is `{"format_version": 2, "sam": dict, "llqr": dict | None, "config": dict}`.

| `format_version` | change                                                                                  |
|------------------|-----------------------------------------------------------------------------------------|
| 1                | first format                                                                            |
| 2                | `llqr` holds a `fingerprint` of the settings that give U its meaning (checked on resume) |
| 3                | FSDP2: DTensor shards are `{"__dcp__": key}` placeholders, saved with DCP in `llqrsam_dcp/` |

A version-1 file without LLQR state is read as is (its SAM state is unchanged in version 2). A version-1 file with
LLQR state is refused: its U cannot be checked against the run.

[`load_state`] checks the file and its top level; U's part is checked by
[`~hf_llqrsam.llqr.LLQRPreconditioner.load_state_dict`] against its fingerprint, and the SAM part by
[`validate_sam_state`] against the live parameters, before any step runs.
"""

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from transformers.trainer import FSDP_MODEL_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from transformers.utils.peft_utils import ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME

from .modes import MODES, SAM_MODE_NAMES

__all__ = [
    "FORMAT_VERSION",
    "REQUIRED_KEYS",
    "SHARDED_FORMAT_VERSION",
    "STATE_FILE",
    "LLQRSAMStateError",
    "checkpoint_problem",
    "describe_state",
    "last_complete_checkpoint",
    "load_state",
    "save_state",
    "validate_sam_state",
]

logger = logging.getLogger(__name__)

STATE_FILE = "llqrsam_state.pt"
FORMAT_VERSION = 2
SHARDED_FORMAT_VERSION = 3  # written only when the state holds FSDP2 shards (`hf_llqrsam/sharded_state.py`)
REQUIRED_KEYS = ("sam", "llqr", "config")


class LLQRSAMStateError(ValueError):
    """A `llqrsam_state.pt` that cannot be used: corrupt, truncated, not a state file, or of another format.

    The message names the file's full path, what is wrong and what to do.
    """


def _remedy(path: str) -> str:
    return (
        f"Delete {path} to resume the rest of the checkpoint with fresh SAM/LLQR state (U = I, empty SAM buffers), "
        "or resume from another checkpoint."
    )


def save_state(output_dir: str, state: dict[str, Any], sharded: bool = False) -> str:
    """Write `state` (with its format version) to `output_dir/llqrsam_state.pt`; returns the path.

    The file is written to a temporary name and renamed into place, so an interrupted save never leaves a truncated
    `llqrsam_state.pt` behind.

    Args:
        output_dir (`str`): the checkpoint directory.
        state (`dict[str, Any]`): `sam`, `llqr` and `config` ([`REQUIRED_KEYS`]), tensors and primitives only.
        sharded (`bool`, *optional*, defaults to `False`): `state` holds DCP placeholders (FSDP2); the file is then
            written as format version 3, which older versions refuse instead of misreading.

    Raises:
        `ValueError`: if a required key is missing (a file that [`load_state`] would refuse is never written).
    """
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"Invalid LLQR+SAM state to save: missing keys {missing} (expected {list(REQUIRED_KEYS)}).")
    path = os.path.join(output_dir, STATE_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save({"format_version": SHARDED_FORMAT_VERSION if sharded else FORMAT_VERSION, **state}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _reason(err: BaseException) -> str:
    """The informative line of a `torch.load` error, without its boilerplate (and without its weights_only advice)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch 2.6")
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(boilerplate)] or lines
    reason = lines[-1] if lines else ""
    reason = reason.split(". This is an internal")[0]  # miniz: "... failed finding central directory. This is ..."
    reason = reason if len(reason) <= 200 else reason[:197] + "..."
    return f"{type(err).__name__}: {reason}" if reason else type(err).__name__


def load_state(checkpoint_dir: str) -> dict[str, Any] | None:
    """Read the state file of a checkpoint, or `None` if it has none (e.g. a stock Trainer checkpoint).

    Args:
        checkpoint_dir (`str`): the checkpoint directory.

    Returns:
        `dict[str, Any] | None`: the state, with `format_version`, `sam`, `llqr` and `config`.

    Raises:
        [`LLQRSAMStateError`] (a `ValueError`): the file is empty, truncated or corrupt, is refused by
            `torch.load(weights_only=True)`, is not a dict with the expected keys, or has an unsupported
            `format_version`. The message names the file's full path and what to do.
    """
    path = os.path.abspath(os.path.join(checkpoint_dir, STATE_FILE))
    if not os.path.isfile(path):
        return None
    if os.path.getsize(path) == 0:
        raise LLQRSAMStateError(
            f"Cannot resume: {path} is corrupt or truncated: it is empty (0 bytes), so the save that wrote it was "
            f"interrupted. {_remedy(path)}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise LLQRSAMStateError(
            f"Cannot resume: {path} is corrupt or truncated, or not an hf_llqrsam state file: "
            f"torch.load(weights_only=True) refuses it ({_reason(err)}). hf_llqrsam writes only tensors and "
            f"primitives, and never loads this file with weights_only=False. {_remedy(path)}"
        ) from err
    except PermissionError as err:
        raise LLQRSAMStateError(
            f"Cannot resume: {path} cannot be read ({_reason(err)}). Fix its permissions."
        ) from err
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError) as err:
        raise LLQRSAMStateError(
            f"Cannot resume: {path} is corrupt or truncated: torch.load cannot read it ({_reason(err)}). "
            f"{_remedy(path)}"
        ) from err
    return _validated(state, path)


def _validated(state: Any, path: str) -> dict[str, Any]:
    if not isinstance(state, dict):
        raise LLQRSAMStateError(
            f"Cannot resume: {path} is not an hf_llqrsam state file: it holds a {type(state).__name__}, not a dict "
            f"with {['format_version', *REQUIRED_KEYS]}. {_remedy(path)}"
        )
    version = state.get("format_version")
    if version not in (1, FORMAT_VERSION, SHARDED_FORMAT_VERSION):
        newer = isinstance(version, int) and not isinstance(version, bool) and version > SHARDED_FORMAT_VERSION
        origin = "a newer hf_llqrsam" if newer else "no known hf_llqrsam version"
        raise LLQRSAMStateError(
            f"Cannot resume: {path} has format_version={version!r}, written by {origin}; this version reads "
            f"format_version ≤ {SHARDED_FORMAT_VERSION}. Resume with the hf_llqrsam version that wrote it, or: "
            f"{_remedy(path)}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise LLQRSAMStateError(
            f"Cannot resume: {path} is not a complete hf_llqrsam state file: missing keys {missing} (expected "
            f"{['format_version', *REQUIRED_KEYS]}). {_remedy(path)}"
        )
    wrong = [
        k
        for k, ok in (
            ("sam", isinstance(state["sam"], dict)),
            ("llqr", state["llqr"] is None or isinstance(state["llqr"], dict)),
            ("config", isinstance(state["config"], dict)),
        )
        if not ok
    ]
    if wrong:
        raise LLQRSAMStateError(
            f"Cannot resume: {path} is corrupt: {wrong} are not dicts ('llqr' may be None). {_remedy(path)}"
        )
    if version == 1 and state["llqr"] is not None:
        raise LLQRSAMStateError(
            f"Cannot resume: {path} has format_version=1, whose LLQR state has no fingerprint of the settings that "
            "give U its meaning (llqr_structure, llqr_identity_scaling, llqr_clip_groups, the tensors of U), so U "
            "cannot be checked against this run. Resume with the hf_llqrsam version that wrote it, or: "
            f"{_remedy(path)}"
        )
    return state


def describe_state(state: Mapping[str, Any]) -> dict[str, bool]:
    """Which parts of a loaded state file hold state, so that a run can warn about state it will not use.

    Args:
        state (`Mapping[str, Any]`): from [`load_state`].

    Returns:
        `dict[str, bool]`: `"sam"`, the file holds SAM state (a per-mode buffer such as FSAM's ḡ, or non-zero
        ascent counters); `"llqr"`, the file holds a U (even one never refreshed).
    """
    sam = state.get("sam") or {}
    buffers = sam.get("buffers") or {}
    has_sam = bool(sam.get("ascents") or sam.get("skipped_ascent") or any(bool(b) for b in buffers.values()))
    return {"sam": has_sam, "llqr": state.get("llqr") is not None}


def _sam_refused(path: str, what: str) -> LLQRSAMStateError:
    return LLQRSAMStateError(f"Cannot resume: {path} holds an unusable SAM state: {what}. {_remedy(path)}")


def _is_count(x: Any) -> bool:
    return type(x) is int and x >= 0


def validate_sam_state(state: Mapping[str, Any], path: str, *, mode: str, params: Mapping[str, Tensor]) -> None:
    """Check the SAM part of a loaded state file against this run, as U's part is checked against its fingerprint.

    The part is what [`~hf_llqrsam.sam.SAMState.state_dict`] writes: `{"ascents": int, "skipped_ascent": int,
    "buffers": {kind: {parameter name: tensor}}}`, plus `"batches"` (past-FSAM's overlap window, a list of
    `{"inputs": [dict, ...], "num_items": ...}`). Always checked: `config.sam_mode` is a known mode, the required
    keys, the types (a dict of dicts of tensors, counters that are non-negative ints, the batch window's layout).
    When the file's `sam_mode` is this run's `mode`, its state is used, so each buffer is also checked: its kind
    belongs to the mode ([`~hf_llqrsam.modes.ModeSpec.state`]), its name is a parameter of this model, and it has the
    parameter's shape (a broadcastable shape is refused too), a floating dtype and finite values. A file of another
    mode is only checked for its layout (the trainer warns and starts the SAM state fresh).

    Args:
        state (`Mapping[str, Any]`): the state file, from [`load_state`] (FSDP2 shards already read into tensors).
        path (`str`): the file, named in every error.
        mode (`str`): this run's `sam_mode`.
        params (`Mapping[str, Tensor]`): canonical parameter name -> the live parameter of this run (the trainable
            ones the SAM state is keyed by). For an FSDP2 DTensor parameter `p.shape` is the global shape, which a
            buffer read whole or as a DTensor shard has as well.

    Raises:
        [`LLQRSAMStateError`] (a `ValueError`): naming the file, the key or buffer at fault and the fix.
    """
    config, sam = state.get("config"), state.get("sam")
    if not isinstance(config, Mapping) or not isinstance(sam, Mapping):
        raise _sam_refused(path, "'sam' and 'config' must be dicts")
    saved_mode = config.get("sam_mode", None)
    if not isinstance(saved_mode, str) or saved_mode not in SAM_MODE_NAMES:
        what = "config has no 'sam_mode'" if "sam_mode" not in config else f"config.sam_mode={saved_mode!r}"
        raise _sam_refused(path, f"{what}, which is not one of {', '.join(map(repr, SAM_MODE_NAMES))}")
    missing = [k for k in ("buffers", "ascents", "skipped_ascent") if k not in sam]
    if missing:
        raise _sam_refused(path, f"missing keys {missing} in 'sam' (expected 'buffers', 'ascents', 'skipped_ascent')")
    extra = sorted(set(sam) - {"buffers", "ascents", "skipped_ascent", "batches"}, key=str)
    if extra:
        raise _sam_refused(path, f"unknown keys {extra} in 'sam'")
    for key in ("ascents", "skipped_ascent"):
        if not _is_count(sam[key]):
            raise _sam_refused(path, f"sam.{key}={sam[key]!r} is not a non-negative int")
    buffers = sam["buffers"]
    if not isinstance(buffers, Mapping):
        raise _sam_refused(
            path, f"sam.buffers is a {type(buffers).__name__}, not a dict of {{kind: {{name: tensor}}}}"
        )
    for kind, store in buffers.items():
        if not isinstance(kind, str) or not isinstance(store, Mapping):
            raise _sam_refused(path, f"sam.buffers[{kind!r}] is a {type(store).__name__}, not a dict {{name: tensor}}")
        for name, t in store.items():
            if not isinstance(name, str) or not isinstance(t, Tensor):
                raise _sam_refused(path, f"sam.buffers[{kind!r}][{name!r}] is a {type(t).__name__}, not a tensor")
    if "batches" in sam:
        _check_batches(sam["batches"], path, saved_mode)
    if saved_mode == mode:
        _check_buffers(buffers, path, mode, params)


def _check_batches(batches: Any, path: str, saved_mode: str) -> None:
    """past-FSAM's overlap window: `[{"inputs": [dict, ...], "num_items": int | Tensor | None}, ...]`."""
    spec = MODES.get(saved_mode)
    if spec is None or spec.probe != "past_difference":  # the window belongs to the stored-gradient probe
        raise _sam_refused(path, f"sam.batches (past-FSAM's overlap window) in a file of sam_mode={saved_mode!r}")
    if not isinstance(batches, list):
        raise _sam_refused(path, f"sam.batches is a {type(batches).__name__}, not a list")
    for i, entry in enumerate(batches):
        ok = isinstance(entry, Mapping) and set(entry) == {"inputs", "num_items"}
        ok = ok and isinstance(entry["inputs"], list) and all(isinstance(mb, Mapping) for mb in entry["inputs"])
        num = entry["num_items"] if ok else None
        ok = ok and (num is None or isinstance(num, Tensor) or _is_count(num))
        if not ok:
            raise _sam_refused(
                path, f"sam.batches[{i}] is not {{'inputs': [dict, ...], 'num_items': int, tensor or None}}"
            )


def _check_buffers(
    buffers: Mapping[str, Mapping[str, Tensor]], path: str, mode: str, params: Mapping[str, Tensor]
) -> None:
    kinds = MODES[mode].state if mode in MODES else ()
    extra = sorted(set(buffers) - set(kinds))
    if extra:
        raise _sam_refused(
            path,
            f"buffers {extra} do not belong to sam_mode={mode!r} (its buffers: {list(kinds) or 'none'}), so the file "
            "does not match this run",
        )
    for kind, store in buffers.items():
        unknown = [name for name in store if name not in params]
        if unknown:
            raise _sam_refused(
                path,
                f"buffer {kind!r} is keyed by {len(unknown)} name(s) that are not trainable parameters of this model "
                f"(e.g. {unknown[0]!r}), so it was written for another model or another set of trainable parameters",
            )
        for name, t in store.items():
            p = params[name]
            where = f"buffer {kind!r} of {name!r}"
            if tuple(t.shape) != tuple(p.shape):
                raise _sam_refused(path, f"{where} has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}")
            if not t.is_floating_point():
                raise _sam_refused(path, f"{where} has dtype {t.dtype}, not a floating dtype")
            if not bool(torch.isfinite(t).all()):
                raise _sam_refused(path, f"{where} holds non-finite values, so every later ascent would be skipped")


# ---------------------------------------------------------------------------------------------- complete checkpoints

_WEIGHT_FILES = (
    SAFE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    WEIGHTS_INDEX_NAME,
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    f"{FSDP_MODEL_NAME}.bin",
)
_CHECKPOINT_DIR = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")  # as transformers' get_last_checkpoint


def _has_weights(checkpoint: str) -> bool:
    """The weights `Trainer._load_from_checkpoint` accepts: a weights, index or adapter file, an FSDP sharded folder
    (`pytorch_model_fsdp_*`), one folder per adapter; or a DeepSpeed engine folder (`global_step*`)."""
    if any(os.path.isfile(os.path.join(checkpoint, name)) for name in _WEIGHT_FILES):
        return True
    for name in os.listdir(checkpoint):
        folder = os.path.join(checkpoint, name)
        if not os.path.isdir(folder):
            continue
        if FSDP_MODEL_NAME in name or name.startswith("global_step"):
            return True
        if any(os.path.isfile(os.path.join(folder, f)) for f in (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME)):
            return True
    return False


def checkpoint_problem(checkpoint: str) -> str | None:
    """Why a `checkpoint-N` folder cannot be resumed from, or `None` when it is complete.

    Complete means: `trainer_state.json` is there and parses (`Trainer._save_checkpoint` writes it last, so a save
    killed before its end leaves none), the model or adapter weights are there, and a `llqrsam_state.pt`, if there is
    one, loads ([`load_state`]).

    Args:
        checkpoint (`str`): the checkpoint folder.

    Returns:
        `str | None`: what is missing or broken, in a few words; `None` for a complete checkpoint.
    """
    trainer_state = os.path.join(checkpoint, TRAINER_STATE_NAME)  # written last by Trainer._save_checkpoint
    if not os.path.isfile(trainer_state):
        return f"no {TRAINER_STATE_NAME}: its save was interrupted"
    try:
        with open(trainer_state, encoding="utf-8") as f:
            json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{TRAINER_STATE_NAME} cannot be read ({type(err).__name__}): its save was interrupted"
    if not _has_weights(checkpoint):
        return "no model or adapter weights"
    try:
        load_state(checkpoint)
    except LLQRSAMStateError as err:
        return f"{STATE_FILE} is unusable ({err})"
    return None


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest complete `checkpoint-N` in `output_dir`, for resuming; `None` if there is none.

    transformers' `get_last_checkpoint` returns the newest `checkpoint-N` folder whatever it holds, so a save killed
    half-way (a `checkpoint-N` with weights but no `trainer_state.json`) would be chosen by every later resume and
    fail each one. Here an incomplete folder ([`checkpoint_problem`]) is skipped, with one warning naming each skipped
    folder and why; nothing is deleted.

    Args:
        output_dir (`str`): the run's output directory.

    Returns:
        `str | None`: the path of the newest complete checkpoint.

    Example:

    ```python
    >>> from hf_llqrsam.checkpoint import last_complete_checkpoint
    >>> trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))  # doctest: +SKIP
    ```
    """
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_DIR.match(name)
        if match is not None and os.path.isdir(os.path.join(output_dir, name)):
            steps.append((int(match.group(1)), name))
    skipped = []
    found = None
    for _, name in sorted(steps, reverse=True):
        path = os.path.join(output_dir, name)
        problem = checkpoint_problem(path)
        if problem is None:
            found = path
            break
        skipped.append(f"{path} ({problem})")
    if skipped:
        logger.warning(
            f"Skipping {len(skipped)} incomplete checkpoint(s), newest first: {'; '.join(skipped)}. "
            + (f"Resuming from {found} instead." if found else "No complete checkpoint is left to resume from.")
            + " Delete the incomplete folder(s) once you no longer need them."
        )
    return found
