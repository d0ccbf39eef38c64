"""What both recipes share: config files as flags, argument parsing, logging, resume, training, offline metrics."""

import contextlib
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import Any

import datasets
import torch
import transformers
import yaml
from transformers import HfArgumentParser
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_llqrsam.args import cli_errors
from hf_llqrsam.checkpoint import last_complete_checkpoint

LOG_FORMAT = "%(asctime)s - %(levelname)s - %(name)s - %(message)s"
FRESH_HELP = (
    "Start over: delete the checkpoint-* folders in --output_dir instead of resuming from the newest one. "
    "(transformers 5 has no --overwrite_output_dir.)"
)


def accelerator_available() -> bool:
    """Whether torch sees an accelerator (CUDA, XPU, MPS, ...). Without one, pinned DataLoader memory is not used
    and every DataLoader iterator warns about it, so the recipes default `dataloader_pin_memory` to this."""
    return torch.accelerator.is_available()


def config_to_argv(path: str) -> list[str]:
    """Turn a flat JSON/YAML mapping `{flag: value}` into command-line arguments."""
    with open(path, encoding="utf-8") as f:
        config = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    argv = []
    for key, value in (config or {}).items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, dict):
            value = json.dumps(value)
        argv += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return argv


def parse_args(dataclass_types: tuple[type, ...], defaults: dict[str, Any], argv: list[str] | None) -> tuple:
    """Parse `argv` (default `sys.argv[1:]`) with the recipe's defaults. A first argument ending in .json/.yaml/.yml
    is a config file whose entries act as flags placed before the remaining arguments, so the command line wins."""
    parser = HfArgumentParser(dataclass_types)
    parser.set_defaults(**defaults)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        argv = config_to_argv(argv[0]) + argv[1:]
    with cli_errors(parser):  # a bad value exits 2 with one line naming the flag, not a 20-line traceback
        return parser.parse_args_into_dataclasses(args=argv)


def setup_logging(logger: logging.Logger, training_args: Any) -> None:
    """The transformers examples' logging, plus `hf_llqrsam`'s own lines (e.g. the trainer's LLQR refresh timings)
    at INFO on the main process unless `--log_level` says otherwise; other processes follow `--log_level_replica`.
    They propagate to the root logger's stdout handler, so they are printed once."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%m/%d/%Y %H:%M:%S"))
    logging.basicConfig(handlers=[handler])  # no-op when the root logger already has handlers
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    package_logger = logging.getLogger("hf_llqrsam")
    if training_args.should_log and training_args.log_level == "passive":
        package_logger.setLevel(min(log_level, logging.INFO))
    else:
        package_logger.setLevel(log_level)
    if not package_logger.hasHandlers():  # its lines reach the root logger's handlers; a handler only if none does
        package_logger.addHandler(handler)
    logger.info(f"Training/evaluation parameters {training_args}")


def checkpoint_steps(checkpoint: str) -> tuple[int, int]:
    """`(global_step, max_steps)` from a checkpoint's trainer_state.json; `(0, 0)` when it has none."""
    path = os.path.join(checkpoint, "trainer_state.json")
    if not os.path.isfile(path):
        return 0, 0
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    return int(state.get("global_step", 0)), int(state.get("max_steps", 0))


def last_checkpoint(logger: logging.Logger, training_args: Any, fresh: bool = False) -> str | None:
    """The newest complete checkpoint in `--output_dir` when training without an explicit `--resume_from_checkpoint`,
    said at WARNING. A checkpoint whose save was interrupted (no `trainer_state.json`, no weights, an unusable
    `llqrsam_state.pt`) is skipped with a warning naming it ([`~hf_llqrsam.checkpoint.last_complete_checkpoint`]).
    With `fresh` (`--fresh`), the checkpoint-* folders there are deleted instead and None is returned: a stale
    checkpoint-640 would otherwise outlive the new run's checkpoints and be resumed from later."""
    if fresh and training_args.resume_from_checkpoint is not None:
        raise ValueError("--fresh starts over and --resume_from_checkpoint resumes: pass one of them.")
    if not training_args.do_train or training_args.resume_from_checkpoint is not None:
        return None
    output_dir = training_args.output_dir
    if not os.path.isdir(output_dir):
        return None
    if fresh:
        stale = [
            os.path.join(output_dir, name)
            for name in sorted(os.listdir(output_dir))
            if name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and os.path.isdir(os.path.join(output_dir, name))
        ]
        if stale and training_args.should_save:
            logger.warning(f"--fresh: deleting {len(stale)} checkpoint folder(s) in {output_dir} and starting over.")
            for path in stale:
                shutil.rmtree(path)
        return None
    found = last_complete_checkpoint(output_dir)
    if found is not None and training_args.should_log:
        step, max_steps = checkpoint_steps(found)
        logger.warning(
            f"Resuming from {found} (step {step} of {max_steps}): --output_dir {output_dir} holds checkpoints. "
            "To start over, pass --fresh (deletes its checkpoint-* folders) or a new --output_dir."
        )
    return found


def planned_steps(trainer: Any) -> int | None:
    """The optimizer steps this run trains to, as `Trainer.train` computes them: `--max_steps`, or the epochs times
    the update steps per epoch of the (prepared, so per-process) train dataloader. None when it cannot be known
    beforehand (a dataloader without a length, `--auto_find_batch_size`)."""
    args = trainer.args
    if args.max_steps > 0:
        return int(args.max_steps)
    if args.auto_find_batch_size:
        return None
    dataloader = trainer.get_train_dataloader()
    try:
        batches = len(dataloader)
    except TypeError:
        return None
    per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def saved_results(output_dir: str) -> dict[str, float]:
    """`<output_dir>/all_results.json`, or {} when there is none."""
    path = os.path.join(output_dir, "all_results.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def nothing_left_to_train(logger: logging.Logger, trainer: Any, checkpoint: str | None) -> bool:
    """True, with a warning, when `checkpoint` is already at (or past) the step this run trains to.

    Resuming such a run would write train_loss 0 (no step trained) over the saved results, and transformers 5
    even trains one step past max_steps when the checkpoint is mid-epoch; so the recipes stop before training and
    keep what `--output_dir` holds."""
    if checkpoint is None:
        return False
    step = checkpoint_steps(checkpoint)[0]
    plan = planned_steps(trainer)
    if plan is None or step < plan:
        return False
    args = trainer.args
    if args.should_log:
        kept = saved_results(args.output_dir)
        shown = ", ".join(
            f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
            for key, value in kept.items()
            if key in {"train_loss", "eval_loss", "eval_accuracy", "test_accuracy", "eval_bleu", "test_bleu"}
        )
        logger.warning(
            f"Nothing left to train: {checkpoint} is at step {step} and this run trains to step {plan}. Not "
            "training, evaluating or rewriting the model card; "
            + (
                f"keeping the results in {args.output_dir}/all_results.json ({shown})."
                if kept
                else f"{args.output_dir} holds no all_results.json."
            )
            + " To train again, pass --fresh or a new --output_dir; to evaluate the checkpoint, pass --do_train "
            f"false --model_name_or_path {checkpoint}."
        )
    return True


@contextlib.contextmanager
def no_save_progress_bars() -> Iterator[None]:
    """Silence transformers' own progress bars (one "Writing model shards" bar per checkpoint) while training; the
    Trainer's training and evaluation bars are not theirs and stay."""
    enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers.utils.logging.enable_progress_bar()


def train(trainer: Any, checkpoint: str | None, num_train_samples: int) -> dict[str, float]:
    """`trainer.train(resume_from_checkpoint=checkpoint)`, then save the model, the train metrics and the state."""
    with no_save_progress_bars():
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
    metrics = {**train_result.metrics, "train_samples": num_train_samples}
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


def load_metric(
    logger: logging.Logger, source: str, local_dir: str, hub_name: str, fallback: Callable[..., dict[str, Any]]
) -> Callable[..., dict[str, Any]]:
    """`compute(predictions=, references=)` of the shipped metric module (`local`), the hub's (`hub`), or
    `fallback`, which computes the same number without `evaluate`; a failed load falls back with a warning."""
    if source == "fallback":
        return fallback
    import evaluate  # here, not at the top: it costs about a second of `--help`

    try:
        return evaluate.load(os.path.abspath(local_dir) if source == "local" else hub_name).compute
    except Exception as err:  # evaluate raises FileNotFoundError, ConnectionError, ImportError, ...
        logger.warning(f"Could not load the {source} {hub_name} metric ({err}); using the built-in fallback.")
        return fallback


def load_hub_dataset(data_args: Any, model_args: Any, embedded: str) -> datasets.DatasetDict:
    """`datasets.load_dataset(--dataset_name, --dataset_config_name)` (with `--dataset_revision` where the recipe has
    it); an unreachable Hub stops with a one-line error that names the recipe's `embedded` default data."""
    try:
        return datasets.load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            revision=getattr(data_args, "dataset_revision", None),
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
    except ConnectionError as err:
        raise SystemExit(
            f"error: --dataset_name {data_args.dataset_name!r}: the Hugging Face Hub could not be reached "
            f"({err}). Check the network or the datasets cache, or drop --dataset_name to train on the embedded "
            f"{embedded}."
        ) from None


def load_data_files(data_args: Any, model_args: Any) -> datasets.DatasetDict | None:
    """`--train_file` / `--validation_file` / `--test_file` as a DatasetDict (`csv` by the first file's extension,
    else json lines), or None when none is given."""
    data_files = {
        split: path
        for split, path in [
            ("train", data_args.train_file),
            ("validation", data_args.validation_file),
            ("test", data_args.test_file),
        ]
        if path is not None
    }
    if not data_files:
        return None
    extension = next(iter(data_files.values())).rsplit(".", 1)[-1]
    builder = "csv" if extension == "csv" else "json"
    return datasets.load_dataset(builder, data_files=data_files, cache_dir=model_args.cache_dir)
