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
"""

import os
import pickle
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "FORMAT_VERSION",
    "REQUIRED_KEYS",
    "SHARDED_FORMAT_VERSION",
    "STATE_FILE",
    "LLQRSAMStateError",
    "describe_state",
    "load_state",
    "save_state",
]

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
