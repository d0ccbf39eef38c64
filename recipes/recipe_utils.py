"""What both recipes share: config files as flags, argument parsing, logging, resume detection, offline metrics."""

import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import datasets
import evaluate
import transformers
import yaml
from transformers import HfArgumentParser
from transformers.trainer_utils import get_last_checkpoint


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
    return parser.parse_args_into_dataclasses(args=argv)


def setup_logging(logger: logging.Logger, training_args: Any) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(f"Training/evaluation parameters {training_args}")


def last_checkpoint(logger: logging.Logger, training_args: Any) -> str | None:
    """The newest checkpoint in `--output_dir` when training without an explicit `--resume_from_checkpoint`."""
    if not (training_args.do_train and training_args.resume_from_checkpoint is None):
        return None
    if not os.path.isdir(training_args.output_dir):
        return None
    found = get_last_checkpoint(training_args.output_dir)
    if found is not None:
        logger.info(f"Checkpoint detected, resuming training at {found}. Use a new --output_dir to start over.")
    return found


def load_metric(
    logger: logging.Logger, source: str, local_dir: str, hub_name: str, fallback: Callable[..., dict[str, Any]]
) -> Callable[..., dict[str, Any]]:
    """`compute(predictions=, references=)` of the shipped metric module (`local`), the hub's (`hub`), or
    `fallback`, which computes the same number without `evaluate`; a failed load falls back with a warning."""
    if source == "fallback":
        return fallback
    try:
        return evaluate.load(os.path.abspath(local_dir) if source == "local" else hub_name).compute
    except Exception as err:  # evaluate raises FileNotFoundError, ConnectionError, ImportError, ...
        logger.warning(f"Could not load the {source} {hub_name} metric ({err}); using the built-in fallback.")
        return fallback
