"""The `llqrsam_state.pt` file saved next to `optimizer.pt` (`integration.md` §9).

It holds only tensors, primitives, dicts and lists, so it loads with `torch.load(..., weights_only=True)`.
"""

import os
from typing import Any

import torch

STATE_FILE = "llqrsam_state.pt"
FORMAT_VERSION = 1


def save_state(output_dir: str, state: dict[str, Any]) -> str:
    """Write `state` (with its format version) to `output_dir/llqrsam_state.pt`; returns the path."""
    path = os.path.join(output_dir, STATE_FILE)
    torch.save({"format_version": FORMAT_VERSION, **state}, path)
    return path


def load_state(checkpoint_dir: str) -> dict[str, Any] | None:
    """Read the state file of a checkpoint, or `None` if it has none (e.g. a stock Trainer checkpoint)."""
    path = os.path.join(checkpoint_dir, STATE_FILE)
    if not os.path.isfile(path):
        return None
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"Unsupported {STATE_FILE} format_version={state.get('format_version')} in {path}.")
    return state
