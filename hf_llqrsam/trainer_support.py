"""Trainer-side helpers that read the Trainer's internals for the glue in `trainer.py`: the LLQR curvature batch,
the scheduled learning rate, the pad target, the flag names of errors and the transformers#43701 resume workaround.

They take the trainer as their first argument and change nothing on it.
"""

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from .checkpoint import STATE_FILE, load_state, save_state
from .data import curvature_indices
from .distributed import is_fsdp2

logger = logging.getLogger("hf_llqrsam.trainer")

U_SUMMARY_FILE = "llqr_u_summary.json"
"""The per-tensor summary of U written next to each checkpoint ([`save_llqrsam_files`])."""

_TRANSFORMERS_MAJOR = int(__import__("transformers").__version__.split(".")[0])


def curvature_batch(trainer: Any, step: int) -> dict[str, Any]:
    """`llqr_batch_size` examples drawn as a pure function of (seed, step), through the training collator.

    Transforms run under a forked RNG, so the training stream is untouched and resume needs no extra state
    (`docs/algorithm.md` §5.5). Uses the Trainer's column filtering, as `get_train_dataloader` does. With
    `llqr_curvature_sharding="sharded"` each rank takes every W-th example; the partial sums are all-reduced.
    """
    import datasets

    llqr, args = trainer.llqr_config, trainer.args
    dataset, collator = trainer.train_dataset, trainer.data_collator
    if isinstance(dataset, datasets.Dataset):
        dataset = trainer._remove_unused_columns(dataset, description="training")
    else:
        collator = trainer._get_collator_with_removed_columns(collator, description="training")
    indices = curvature_indices(args.seed, step, len(dataset), llqr.batch_size)
    if llqr.curvature_sharding == "sharded" and args.world_size > 1:
        indices = indices[args.process_index :: args.world_size]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + step)
        batch = collator([dataset[i] for i in indices])
    return cast(dict[str, Any], trainer._prepare_inputs(batch))


def scheduled_lr(trainer: Any, step: int) -> float:
    """The base optimizer's largest learning rate at optimizer step `step`, a pure function of the step.

    From the LR scheduler's multiplier (`LambdaLR`: every schedule of `get_scheduler` but `reduce_lr_on_plateau`):
    max over param groups of base_lr · λ(step). Other schedulers, or none yet, give the optimizer's current LR at the
    current step and treat earlier steps as LR > 0 (a refresh at an LR-0 grid step is then skipped, not deferred).
    Used by `llqr_apply="update"` to defer refreshes past LR 0 ([`~hf_llqrsam.llqr.LLQRPreconditioner.is_due`]).
    """
    scheduler = getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler)
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return max(
            float(base) * float(fn(step)) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        )
    if step != trainer.state.global_step:
        return 1.0
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return max(float(group["lr"]) for group in optimizer.param_groups)


def pad_token_id(model: nn.Module) -> int | None:
    """The target of pad rows with `llqr_include_pad_rows` (the reference's "predict pad"), from the model config."""
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    return pad if isinstance(pad, int) else None


@contextlib.contextmanager
def flag_names() -> Iterator[None]:
    """Errors of the math and the engine name config fields (`LLQRConfig.inner_lr`); the Trainer's user sets flags
    (`llqr_inner_lr`), so a `ValueError` that names a field is raised again naming the flag."""
    try:
        yield
    except ValueError as err:
        text = re.sub(r"\bLLQRConfig\.label_smoothing\b", "label_smoothing_factor", str(err))  # the stock flag
        text = re.sub(r"\bLLQRConfig\.(\w+)", r"llqr_\1", text)
        if text == str(err):
            raise
        raise type(err)(text) from err


def load_renamed_weights(trainer: Any, checkpoint: str, target: nn.Module) -> bool:
    """Work around huggingface/transformers#43701 (5.x): resume silently drops renamed weights (e.g. ViT).

    `load_state_dict(strict=False)` skips checkpoint keys that 5.x `save_pretrained` wrote under their legacy names;
    `from_pretrained` applies the renames. Runs only where the bug bites: transformers 5.x, a plain
    `PreTrainedModel` (no FSDP/DeepSpeed), and a checkpoint whose tensor names differ from the model's; returns
    whether it loaded the weights. The canary test `test_vit_resume_canary_43701` fails once upstream fixes it.
    """
    weights = os.path.join(checkpoint, "model.safetensors")
    if not (
        _TRANSFORMERS_MAJOR >= 5
        and isinstance(target, PreTrainedModel)
        and os.path.isfile(weights)
        and not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled or is_fsdp2(target))
        and _renamed_keys(weights, target)
    ):
        return False
    dtype = next(target.parameters()).dtype
    loaded = type(target).from_pretrained(checkpoint, config=target.config, dtype=dtype)
    target.load_state_dict(loaded.state_dict(), strict=True)
    return True


def _renamed_keys(weights: str, model: nn.Module) -> bool:
    """Whether a checkpoint's tensor names differ from the model's own (the #43701 symptom)."""
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as f:
        saved = set(f.keys())
    return bool(saved - set(model.state_dict()))


def save_llqrsam_files(trainer: Any, output_dir: str) -> None:
    """`llqrsam_state.pt` (rank 0) next to the optimizer state; under FSDP2 also every rank's shards of U and of the
    SAM buffers, with DCP in `llqrsam_dcp/` (`hf_llqrsam/sharded_state.py`; the Trainer saves on all ranks).

    With LLQR, also `llqr_u_summary.json` (written by the saving rank, read by nothing): per tensor of U its
    structure, entries, min, max, mean, RMS displacement from I, fraction at `llqr_min_diag` and the step of the last
    refresh ([`~hf_llqrsam.llqr.LLQRPreconditioner.u_summary`]).
    """
    engine = trainer.engine
    if not trainer.llqrsam_enabled or engine is None:
        return
    from .sharded_state import save_sharded, split_dtensors

    state, shards = split_dtensors(engine.state_dict())
    if shards:
        save_sharded(output_dir, shards)  # a collective
    summary = engine.learned.u_summary() if engine.learned is not None else None  # FSDP2: a collective
    if trainer.args.should_save:
        save_state(output_dir, state, sharded=bool(shards))
        if summary is not None:
            with open(os.path.join(output_dir, U_SUMMARY_FILE), "w") as f:
                json.dump(summary, f, indent=1, allow_nan=True)


def read_llqrsam_checkpoint(trainer: Any, checkpoint: str | None) -> tuple[str, dict[str, Any]] | None:
    """`(path, contents)` of a checkpoint's `llqrsam_state.pt`, materialised by the engine on the first
    `training_step`, after prepare (FSDP2 swaps the parameters there); `None` when there is nothing to load."""
    if checkpoint is None:
        return None
    path = os.path.join(checkpoint, STATE_FILE)
    if not trainer.llqrsam_enabled:
        if os.path.isfile(path):
            logger.warning(
                f"{path} holds SAM/LLQR state, but this run has sam_mode='none' and llqr=False: it is not used."
            )
        return None
    state = load_state(checkpoint)
    if state is None:
        if trainer.llqr_config is not None or (trainer.mode_spec is not None and trainer.mode_spec.state):
            logger.warning(f"No {STATE_FILE} in {checkpoint}: starting with U = I and empty SAM state.")
        return None
    return path, state
