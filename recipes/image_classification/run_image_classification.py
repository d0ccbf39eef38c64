#!/usr/bin/env python
# Copyright 2026 The hf_llqrsam authors. Licensed under the Apache License, Version 2.0.
# Adapted from transformers' examples/pytorch/image-classification/run_image_classification.py.
"""Image classification with SAM / LLQR+SAM on the Hugging Face Trainer.

With no data argument the recipe trains a small ViT (built from `ViTConfig`) on scikit-learn's digits, which ship
with scikit-learn, so it runs offline. `--dataset_name` (hub), `--train_dir` (imagefolder) and `--model_name_or_path`
(fine-tune a checkpoint) switch to real workloads. Every `sam_*` / `llqr_*` field of
[`~hf_llqrsam.LLQRSAMTrainingArguments`] is a command-line flag. From the repository root:

    python recipes/image_classification/run_image_classification.py --output_dir out    # AdamW
    python recipes/image_classification/run_image_classification.py --output_dir out --sam_mode sam --sam_rho 0.05
    python recipes/image_classification/run_image_classification.py \
        recipes/image_classification/configs/digits_vit_llqrsam.yaml --output_dir out   # config + overrides

A run into an `--output_dir` with checkpoints resumes from the newest (at WARNING); `--fresh` starts over.

`main(argv)` is importable and returns the metrics that it also writes to `<output_dir>/all_results.json`.
"""

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import datasets
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from datasets import ClassLabel, DatasetDict, load_dataset
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    EvalPrediction,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
    set_seed,
)

from hf_llqrsam import LLQRSAMTrainer, LLQRSAMTrainingArguments
from hf_llqrsam.card import complete_model_card
from hf_llqrsam.compat import launch_errors_exit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import recipe_utils  # noqa: E402
from digits import load_digits_dataset  # noqa: E402

logger = logging.getLogger(__name__)

RECIPE_DIR = os.path.dirname(os.path.abspath(__file__))
LOCAL_METRIC = os.path.join(RECIPE_DIR, "..", "metrics", "accuracy")
DIGITS_MAX_TRAIN_SAMPLES = 500

# Defaults of this recipe that differ from `TrainingArguments` (tuned for the embedded digits run). Config files and
# command-line flags override them.
RECIPE_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/image_classification",  # git-ignored; one per recipe, so no recipe resumes another's run
    "do_train": True,
    "do_eval": True,
    "do_predict": True,
    "remove_unused_columns": False,  # the transforms read the image column on the fly
    "learning_rate": 1e-3,
    "weight_decay": 0.05,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "num_train_epochs": 40,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 1,
    "logging_steps": 10,
    "ddp_find_unused_parameters": False,  # every parameter gets a gradient; SAM would pay the extra traversal twice
    # Pinned memory needs an accelerator; without one each DataLoader iterator warns (about one warning per epoch).
    "dataloader_pin_memory": recipe_utils.accelerator_available(),
}


@dataclass
class ModelArguments:
    """Which model to train: a ViT built from `ViTConfig` (default) or a checkpoint to fine-tune."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint to fine-tune (hub id or local folder). Default: a ViT from the sizes below."},
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path if not the model's."})
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor name or path if not the model's."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store hub downloads."})
    model_revision: str = field(default="main", metadata={"help": "Model revision (branch, tag or commit id)."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models or datasets."})
    ignore_mismatched_sizes: bool = field(
        default=True,
        metadata={"help": "Re-initialise the classifier head when the checkpoint has a different number of labels."},
    )
    image_size: int = field(default=16, metadata={"help": "ViT from config: input resolution."})
    patch_size: int = field(default=4, metadata={"help": "ViT from config: patch size."})
    hidden_size: int = field(default=64, metadata={"help": "ViT from config: width."})
    num_hidden_layers: int = field(default=4, metadata={"help": "ViT from config: depth."})
    num_attention_heads: int = field(default=4, metadata={"help": "ViT from config: attention heads."})
    intermediate_size: int = field(default=128, metadata={"help": "ViT from config: MLP width."})
    hidden_dropout_prob: float = field(default=0.0, metadata={"help": "ViT from config: dropout."})
    attention_probs_dropout_prob: float = field(default=0.0, metadata={"help": "ViT from config: attention dropout."})


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on. With no `--dataset_name` and no `--train_dir`, the embedded digits."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset, e.g. uoft-cs/cifar10 or beans."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the hub dataset."})
    train_dir: str | None = field(default=None, metadata={"help": "imagefolder with the training images."})
    validation_dir: str | None = field(default=None, metadata={"help": "imagefolder with the validation images."})
    test_dir: str | None = field(default=None, metadata={"help": "imagefolder with the test images."})
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images (cifar10: img)."})
    label_column_name: str = field(
        default="label", metadata={"help": "Column holding the labels (cifar100: fine_label)."}
    )
    train_val_split: float = field(
        default=0.15, metadata={"help": "Fraction of train split off as validation when there is no validation set."}
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": f"Keep this many training examples (a seeded shuffle). Defaults to {DIGITS_MAX_TRAIN_SAMPLES} for "
            "the embedded digits (so that AdamW does not saturate) and to all of them otherwise."
        },
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep this many validation examples."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep this many test examples."})
    random_crop_padding: int = field(
        default=1, metadata={"help": "Training augmentation: reflect-pad by this much and crop back (0: off)."}
    )
    horizontal_flip: bool = field(default=False, metadata={"help": "Training augmentation: random h-flip (p=0.5)."})
    cutout_size: int = field(default=0, metadata={"help": "Training augmentation: Cutout square side (0: off)."})
    fresh: bool = field(default=False, metadata={"help": recipe_utils.FRESH_HELP})
    metric_source: Literal["local", "hub", "fallback"] = field(
        default="local",
        metadata={
            "help": "Accuracy from the shipped evaluate module (local), evaluate.load('accuracy') (hub), or numpy "
            "(fallback). local and hub fall back to numpy, with a warning, when loading fails."
        },
    )

    def __post_init__(self) -> None:
        if self.dataset_name is not None and self.train_dir is not None:
            raise ValueError("Pass either --dataset_name or --train_dir, not both.")


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataTrainingArguments, LLQRSAMTrainingArguments]:
    """Parse `argv` (default `sys.argv[1:]`). A first argument ending in .json/.yaml/.yml is a config file whose
    entries act as flags placed before the remaining arguments, so the command line overrides the file."""
    dataclass_types = (ModelArguments, DataTrainingArguments, LLQRSAMTrainingArguments)
    return recipe_utils.parse_args(dataclass_types, RECIPE_DEFAULTS, argv)


def load_accuracy(source: str) -> Callable[..., dict[str, float]]:
    """The accuracy metric as `compute(predictions=, references=)`; numpy when evaluate cannot load the module."""

    def numpy_accuracy(predictions: Any, references: Any) -> dict[str, float]:
        # The same expression as recipes/metrics/accuracy, so every source gives the same number.
        return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}

    return recipe_utils.load_metric(logger, source, LOCAL_METRIC, "accuracy", numpy_accuracy)


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments) -> DatasetDict:
    """The hub dataset, the imagefolder(s), or the embedded digits."""
    if data_args.dataset_name is not None:
        return recipe_utils.load_hub_dataset(data_args, model_args, "digits")
    if data_args.train_dir or data_args.validation_dir or data_args.test_dir:
        data_files = {
            split: os.path.join(folder, "**")
            for split, folder in [
                ("train", data_args.train_dir),
                ("validation", data_args.validation_dir),
                ("test", data_args.test_dir),
            ]
            if folder is not None
        }
        return load_dataset("imagefolder", data_files=data_files, cache_dir=model_args.cache_dir)
    return load_digits_dataset()


def check_columns(dataset: DatasetDict, data_args: DataTrainingArguments) -> None:
    for flag, column in [
        ("--image_column_name", data_args.image_column_name),
        ("--label_column_name", data_args.label_column_name),
    ]:
        for split, ds in dataset.items():
            if column not in ds.column_names:
                raise ValueError(
                    f"{flag} {column!r} not found in the {split!r} split, whose columns are "
                    f"{', '.join(ds.column_names)}. Pass {flag} to name the right column."
                )


def augment(pixels: torch.Tensor, padding: int, flip: bool, cutout: int) -> torch.Tensor:
    """Plain-torch CIFAR-style augmentation of one `(C, H, W)` image: reflect-pad + random crop, h-flip, Cutout."""
    if padding > 0:
        height, width = pixels.shape[-2:]
        padded = F.pad(pixels[None], (padding, padding, padding, padding), mode="reflect")[0]
        top, left = torch.randint(0, 2 * padding + 1, (2,)).tolist()
        pixels = padded[:, top : top + height, left : left + width]
    if flip and torch.rand(()) < 0.5:
        pixels = pixels.flip(-1)
    if cutout > 0 and torch.rand(()) < 0.5:  # Cutout (arXiv 1708.04552) with p = 0.5, as in the reference presets
        height, width = pixels.shape[-2:]
        top = torch.randint(0, height, ()).item() - cutout // 2
        left = torch.randint(0, width, ()).item() - cutout // 2
        pixels = pixels.clone()
        pixels[:, max(0, top) : top + cutout, max(0, left) : left + cutout] = 0
    return pixels


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }


def build_model(
    model_args: ModelArguments, labels: list[str]
) -> tuple[transformers.PreTrainedModel, transformers.BaseImageProcessor]:
    label2id = {label: i for i, label in enumerate(labels)}
    id2label = dict(enumerate(labels))
    if model_args.model_name_or_path is None:
        config = ViTConfig(
            image_size=model_args.image_size,
            patch_size=model_args.patch_size,
            num_channels=3,
            hidden_size=model_args.hidden_size,
            num_hidden_layers=model_args.num_hidden_layers,
            num_attention_heads=model_args.num_attention_heads,
            intermediate_size=model_args.intermediate_size,
            hidden_dropout_prob=model_args.hidden_dropout_prob,
            attention_probs_dropout_prob=model_args.attention_probs_dropout_prob,
            num_labels=len(labels),
            label2id=label2id,
            id2label=id2label,
        )
        size = {"height": model_args.image_size, "width": model_args.image_size}
        processor = ViTImageProcessorPil(size=size, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        return ViTForImageClassification(config), processor
    hub_kwargs = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}
    try:
        config = AutoConfig.from_pretrained(
            model_args.config_name or model_args.model_name_or_path,
            num_labels=len(labels),
            label2id=label2id,
            id2label=id2label,
            finetuning_task="image-classification",
            **hub_kwargs,
        )
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            **hub_kwargs,
        )
        processor = AutoImageProcessor.from_pretrained(
            model_args.image_processor_name or model_args.model_name_or_path, **hub_kwargs
        )
    except OSError as err:
        raise SystemExit(
            f"error: could not load --model_name_or_path {model_args.model_name_or_path!r}: {err}"
        ) from None
    return model, processor


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the recipe on `argv` (default `sys.argv[1:]`) and return the metrics written to all_results.json."""
    model_args, data_args, training_args = parse_args(argv)

    recipe_utils.setup_logging(logger, training_args)
    if training_args.remove_unused_columns:
        raise ValueError("--remove_unused_columns must be false: the transforms read the image column on the fly.")

    # A run pointed at an output_dir with checkpoints resumes from the newest (said at WARNING); --fresh starts over.
    last_checkpoint = recipe_utils.last_checkpoint(logger, training_args, fresh=data_args.fresh)

    set_seed(training_args.seed)

    dataset = load_raw_datasets(data_args, model_args)
    check_columns(dataset, data_args)
    embedded = data_args.dataset_name is None and not (
        data_args.train_dir or data_args.validation_dir or data_args.test_dir
    )
    if embedded and data_args.max_train_samples is None:
        data_args.max_train_samples = DIGITS_MAX_TRAIN_SAMPLES
    if "validation" not in dataset and "train" in dataset and data_args.train_val_split > 0:
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=training_args.seed)
        dataset["train"], dataset["validation"] = split["train"], split["test"]

    label_column = data_args.label_column_name
    reference_split = "train" if "train" in dataset else next(iter(dataset))
    if not isinstance(dataset[reference_split].features[label_column], ClassLabel):
        dataset = dataset.class_encode_column(label_column)
    labels = dataset[reference_split].features[label_column].names

    model, image_processor = build_model(model_args, labels)
    image_column = data_args.image_column_name

    def preprocess(batch: dict[str, list[Any]], train: bool) -> dict[str, list[Any]]:
        images = [image.convert("RGB") for image in batch[image_column]]
        pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
        if train:
            pixel_values = [
                augment(p, data_args.random_crop_padding, data_args.horizontal_flip, data_args.cutout_size)
                for p in pixel_values
            ]
        return {"pixel_values": list(pixel_values), "labels": batch[label_column]}

    def select(split: str, flag: str, max_samples: int | None) -> datasets.Dataset:
        if split not in dataset:
            raise ValueError(f"{flag} needs a {split!r} split; the data has {', '.join(dataset)}.")
        ds = dataset[split]
        if max_samples is not None:
            ds = ds.shuffle(seed=training_args.seed).select(range(min(max_samples, len(ds))))
        return ds.with_transform(lambda batch: preprocess(batch, train=split == "train"))

    train_dataset = select("train", "--do_train", data_args.max_train_samples) if training_args.do_train else None
    eval_dataset = select("validation", "--do_eval", data_args.max_eval_samples) if training_args.do_eval else None
    test_dataset = select("test", "--do_predict", data_args.max_predict_samples) if training_args.do_predict else None

    accuracy = load_accuracy(data_args.metric_source)

    def compute_metrics(p: EvalPrediction) -> dict[str, float]:
        return accuracy(predictions=np.argmax(p.predictions, axis=1), references=p.label_ids)

    trainer = LLQRSAMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        data_collator=collate_fn,
    )

    results: dict[str, float] = {}
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        # A checkpoint at the end of training would "train" 0 steps and write train_loss 0 over the saved results.
        if recipe_utils.nothing_left_to_train(logger, trainer, checkpoint):
            return recipe_utils.saved_results(training_args.output_dir)
        results.update(recipe_utils.train(trainer, checkpoint, len(train_dataset)))  # saves the model, metrics, state

    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)

    if training_args.do_predict:
        metrics = trainer.predict(test_dataset, metric_key_prefix="test").metrics
        trainer.log_metrics("test", metrics)
        trainer.save_metrics("test", metrics)
        results.update(metrics)

    # Model card (README.md in output_dir), written whether or not the model is pushed.
    tags = ["image-classification", "vision"]  # the trainer adds hf-llqrsam, the SAM mode and llqr
    kwargs: dict[str, Any] = {"finetuned_from": model_args.model_name_or_path, "tasks": "image-classification"}
    kwargs["dataset"] = data_args.dataset_name or ("imagefolder" if data_args.train_dir else "sklearn digits")
    if data_args.dataset_config_name is not None:
        kwargs["dataset_args"] = data_args.dataset_config_name
    if training_args.push_to_hub:
        trainer.push_to_hub(tags=tags, **kwargs)
    trainer.create_model_card(tags=tags, **kwargs)
    if trainer.is_world_process_zero():  # base model or "trained from scratch", test metrics, the optimizer's args
        complete_model_card(training_args.output_dir, training_args)
    return results


if __name__ == "__main__":
    with launch_errors_exit():  # a refused launch: one line from rank 0, no traceback per rank
        main()
