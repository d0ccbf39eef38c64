"""Does LookSAM train the image recipe's ViT? `pytorch_optimizer`'s own LookSAM and SAM, in a plain loop, on the same
model, data and seed as the recipe's embedded digits run.

    python recipes/benchmarks/looksam_peer_check.py --output_dir runs/looksam_peer_check

The recipe's digits ViT (its `build_model`, `load_raw_datasets` and `augment`: 500 training images, reflect-pad 1 and
crop back, as the recipe's default) is trained
for `--steps` steps of batch 32 with AdamW (lr 1e-3, constant, no weight decay) as the base optimizer of
`pytorch_optimizer.LookSAM` (k = 5, α = 0.7, Liu et al., CVPR 2022) and of `pytorch_optimizer.SAM` (Foret et al.,
arXiv 2010.01412), ρ = 0.05, and with AdamW alone; each arm from the same initial weights and batch order. It prints
and writes (`<output_dir>/looksam_peer_check.json`) the mean training loss over each window of 40 steps. This is an
independent implementation of the check that hf_llqrsam's `sam_mode looksam` stalls on this model (README, Results).
"""

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.image_classification.run_image_classification import (  # noqa: E402
    augment,
    build_model,
    collate_fn,
    load_raw_datasets,
)
from recipes.image_classification.run_image_classification import parse_args as recipe_args  # noqa: E402


def recipe_model_and_batches(
    seed: int, steps: int, batch_size: int, padding: int
) -> tuple[torch.nn.Module, list[dict]]:
    """The recipe's default model and the first `steps` training batches (its embedded digits, 500 images), each
    image augmented as the recipe does by default (reflect-pad by `padding` and crop back; 0: off)."""
    model_args, data_args, _ = recipe_args(["--output_dir", "/tmp/unused", "--seed", str(seed)])
    torch.manual_seed(seed)
    dataset = load_raw_datasets(data_args, model_args)
    labels = dataset["train"].features[data_args.label_column_name].names
    model, processor = build_model(model_args, labels)
    train = dataset["train"].shuffle(seed=seed).select(range(500))
    pixels = processor([im.convert("RGB") for im in train[data_args.image_column_name]], return_tensors="pt")
    targets = train[data_args.label_column_name]
    examples = [{"pixel_values": p, "labels": y} for p, y in zip(pixels["pixel_values"], targets, strict=True)]
    g = torch.Generator().manual_seed(seed)
    batches = []
    while len(batches) < steps:
        order = torch.randperm(len(examples), generator=g).tolist()
        for s in range(0, len(order) - batch_size + 1, batch_size):
            chosen = [examples[i] for i in order[s : s + batch_size]]
            batches.append(
                collate_fn([{**e, "pixel_values": augment(e["pixel_values"], padding, False, 0)} for e in chosen])
            )
    return model, batches[:steps]


def train(model: torch.nn.Module, batches: list[dict], arm: str, rho: float, lr: float) -> list[float]:
    """Training losses (at θ, before each step) of one arm."""
    from pytorch_optimizer import SAM, LookSAM

    model = copy.deepcopy(model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if arm == "looksam":
        opt = LookSAM(params, torch.optim.AdamW, rho=rho, k=5, alpha=0.7, lr=lr, weight_decay=0.0)
    elif arm == "sam":
        opt = SAM(params, torch.optim.AdamW, rho=rho, lr=lr, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    torch.manual_seed(0)  # dropout masks
    losses = []
    for batch in batches:

        def closure(batch: dict = batch) -> torch.Tensor:
            opt.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            return loss

        losses.append(float(closure().detach()))
        if arm == "adamw":
            opt.step()
        else:
            opt.step(closure)  # the SAM optimizers recompute the gradient at θ + ε through the closure
    return losses


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--window", type=int, default=40)
    parser.add_argument("--random_crop_padding", type=int, default=1, help="the recipe's default augmentation; 0: off")
    args = parser.parse_args(argv)
    model, batches = recipe_model_and_batches(args.seed, args.steps, 32, args.random_crop_padding)
    report = {
        "steps": args.steps,
        "seed": args.seed,
        "rho": args.rho,
        "lr": args.lr,
        "window": args.window,
        "random_crop_padding": args.random_crop_padding,
        "mean_loss_per_window": {},
    }
    for arm in ("adamw", "sam", "looksam"):
        losses = train(model, batches, arm, args.rho, args.lr)
        means = [
            sum(losses[i : i + args.window]) / len(losses[i : i + args.window])
            for i in range(0, len(losses), args.window)
        ]
        report["mean_loss_per_window"][arm] = means
        print(f"{arm:8s} " + " ".join(f"{m:.3f}" for m in means), flush=True)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "looksam_peer_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
