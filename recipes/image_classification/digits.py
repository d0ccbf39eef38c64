"""The embedded image data set: scikit-learn's 8x8 handwritten digits as a `datasets.DatasetDict`.

`load_digits` ships inside scikit-learn (1797 images of 10 classes, UCI ML hand-written digits), so the recipe runs
with no download. The 8x8 grey levels (0-16) are rescaled to 0-255 and upsampled (bilinear) to `image_size`. The
train/validation/test split is a fixed permutation (`seed`), independent of the training seed, so every run and every
optimizer sees the same three sets.
"""

import datasets
import numpy as np
from PIL import Image

DIGITS_NUM_VALIDATION = 300
DIGITS_NUM_TEST = 400


def load_digits_dataset(image_size: int = 32, seed: int = 0) -> datasets.DatasetDict:
    """Build the digits `DatasetDict` with `train` (1097), `validation` (300) and `test` (400) splits.

    Args:
        image_size (`int`, *optional*, defaults to 32):
            Side of the stored square images (mode `"L"`).
        seed (`int`, *optional*, defaults to 0):
            Seed of the split permutation.

    Returns:
        `datasets.DatasetDict`: columns `image` (`datasets.Image`) and `label` (`ClassLabel` with names "0".."9").
    """
    from sklearn.datasets import load_digits  # here, not at the top: only the embedded run needs scikit-learn

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = [Image.fromarray(p).resize((image_size, image_size), Image.Resampling.BILINEAR) for p in pixels]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    order = np.random.default_rng(seed).permutation(len(images))
    test, validation = order[:DIGITS_NUM_TEST], order[DIGITS_NUM_TEST : DIGITS_NUM_TEST + DIGITS_NUM_VALIDATION]
    train = order[DIGITS_NUM_TEST + DIGITS_NUM_VALIDATION :]

    def split(indices: np.ndarray) -> datasets.Dataset:
        data = {"image": [images[i] for i in indices], "label": [int(digits.target[i]) for i in indices]}
        return datasets.Dataset.from_dict(data, features=features)

    return datasets.DatasetDict({"train": split(train), "validation": split(validation), "test": split(test)})
