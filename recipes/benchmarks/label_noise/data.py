"""The label-noise tasks and models: digits and a synthetic task with a fixed split and a fixed, recorded symmetric
noise draw on the training labels, and the MLP, the small CNN and the image recipe's ViT trained on them."""

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SPLIT_SEED = 0  # the stratified train/val/test split
NOISE_SEED = 12345  # the label-noise draw: fixed, recorded, independent of every training seed


class MLP(nn.Module):
    """in → 256 → 256 → classes, ReLU. `forward(x)` gives logits; with `labels`, a dict with the mean CE loss."""

    def __init__(self, d_in: int = 64, classes: int = 10, width: int = 256) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(d_in, width), nn.Linear(width, width), nn.Linear(width, classes)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Any:
        logits = self.out(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))
        return logits if labels is None else {"loss": F.cross_entropy(logits, labels), "logits": logits}


class SmallCNN(nn.Module):
    """8×8×1 → conv3×3(8) → ReLU → conv3×3(16) → ReLU → maxpool 2 → linear(256 → classes)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.out = nn.Linear(16 * 4 * 4, classes)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Any:
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x.view(-1, 1, 8, 8))))), 2)
        logits = self.out(h.flatten(1))
        return logits if labels is None else {"loss": F.cross_entropy(logits, labels), "logits": logits}


class RecipeViT(nn.Module):
    """The image recipe's default model, `ViTForImageClassification` from the recipe's own `ModelArguments` defaults
    (16×16 input, patch 4, width 64, 4 layers, 4 heads, MLP 128, no dropout), built by the recipe's `build_model`.

    Input: the 64 digits pixels / 16. As in the recipe's preprocessing (`digits.py`, the processor's normalisation
    with mean and std 0.5), the 8×8 image is upsampled bilinearly to 16×16, copied to 3 channels and mapped to
    [−1, 1]; here with `F.interpolate` on the float pixels instead of PIL on 8-bit ones (a rounding difference).
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        from recipes.image_classification.run_image_classification import ModelArguments, build_model

        self.args = ModelArguments()
        self.vit = build_model(self.args, [str(i) for i in range(classes)])[0]

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Any:
        side = self.args.image_size
        img = F.interpolate(x.view(-1, 1, 8, 8), size=(side, side), mode="bilinear", align_corners=False)
        logits = self.vit(pixel_values=(img.expand(-1, 3, -1, -1) - 0.5) / 0.5).logits
        return logits if labels is None else {"loss": F.cross_entropy(logits, labels), "logits": logits}


@dataclass
class TaskData:
    x_train: Tensor
    y_train_clean: Tensor
    y_train: Tensor  # the noisy labels actually trained on
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: int
    record: dict = field(default_factory=dict)


def _digest(t: Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


def symmetric_noise(labels: Tensor, classes: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Exactly round(fraction·n) training labels, chosen uniformly, each replaced by a uniformly drawn *other* class
    (symmetric noise). Returns (noisy labels, flipped indices); a pure function of `seed`."""
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    flipped = torch.randperm(n, generator=gen)[: round(fraction * n)].sort().values
    shift = torch.randint(1, classes, (len(flipped),), generator=gen)
    noisy = labels.clone()
    noisy[flipped] = (labels[flipped] + shift) % classes
    return noisy, flipped


@functools.lru_cache(maxsize=8)
def load_task(task: str, noise: float) -> TaskData:
    """The task's fixed stratified 60/20/20 split (seed 0) and its noise draw (seed 12345) on the train split only."""
    from sklearn.datasets import load_digits, make_classification
    from sklearn.model_selection import train_test_split

    if task.startswith("digits"):
        d = load_digits()
        x, y, classes = d.data / 16.0, d.target, 10
        source = "sklearn.datasets.load_digits (1797 8x8 images, pixels / 16)"
    elif task == "synthetic":
        x, y = make_classification(
            n_samples=1500,
            n_features=20,
            n_informative=10,
            n_redundant=4,
            n_classes=4,
            n_clusters_per_class=2,
            class_sep=1.0,
            random_state=0,
        )
        x = (x - x.mean(0)) / x.std(0)
        classes = 4
        source = (
            "sklearn.datasets.make_classification(n_samples=1500, n_features=20, n_informative=10, "
            "n_redundant=4, n_classes=4, n_clusters_per_class=2, random_state=0), standardised"
        )
    else:
        raise ValueError(f"unknown task {task!r}")
    idx = list(range(len(y)))
    tr, rest = train_test_split(idx, test_size=0.4, stratify=y, random_state=SPLIT_SEED)
    va, te = train_test_split(rest, test_size=0.5, stratify=[y[i] for i in rest], random_state=SPLIT_SEED)
    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.long)
    tr_t, va_t, te_t = (torch.tensor(sorted(s)) for s in (tr, va, te))
    y_clean = yt[tr_t]
    noisy, flipped = symmetric_noise(y_clean, classes, noise, NOISE_SEED)
    record = {
        "source": source,
        "split_seed": SPLIT_SEED,
        "sizes": {"train": len(tr), "val": len(va), "test": len(te)},
        "split_sha": _digest(torch.cat([tr_t, va_t, te_t])),
        "train_idx_head": tr_t[:10].tolist(),
        "noise": noise,
        "noise_seed": NOISE_SEED,
        "flipped": len(flipped),
        "flipped_fraction": len(flipped) / len(tr),
        "noisy_labels_sha": _digest(noisy),
        "flipped_idx_head": flipped[:10].tolist(),
    }
    return TaskData(xt[tr_t], y_clean, noisy, xt[va_t], yt[va_t], xt[te_t], yt[te_t], classes, record)


MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "digits": lambda d, c: MLP(d, c),
    "digits_cnn": lambda d, c: SmallCNN(c),
    "digits_vit": lambda d, c: RecipeViT(c),
    "synthetic": lambda d, c: MLP(d, c),
}
ARCH = {
    "digits": "MLP 64-256-256-10",
    "digits_cnn": "CNN conv8-conv16-pool-linear",
    "digits_vit": "the image recipe's ViT: 16x16, patch 4, width 64, 4 layers",
    "synthetic": "MLP 20-256-256-4",
}
