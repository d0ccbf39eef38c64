"""hf_llqrsam.card: the optimizer the card names is the one the Trainer builds, and `complete_model_card` fixes the
stock card's base-model sentence, results and optimizer line, idempotently.

The recipes' cards (scratch ViT, LoRA on a local checkpoint, the shipped GGUF) are checked in tests/recipes.
"""

import json

import pytest

from hf_llqrsam import LLQRSAMTrainer
from hf_llqrsam.card import complete_model_card, optimizer_description
from tests.utils import image_dataset, make_args, tiny_vit

CASES = [
    {"optim": "sgd"},
    {"optim": "sgd", "optim_args": "momentum=0.9,nesterov=True", "weight_decay": 0.05},
    {"optim": "adamw_torch", "adam_beta2": 0.98, "weight_decay": 0.01},
]


@pytest.mark.parametrize("overrides", CASES, ids=lambda o: "-".join(map(str, o.values())))
def test_optimizer_description_is_the_optimizer_the_trainer_builds(tmp_path, overrides):
    """The oracle: the optimizer's own `defaults` and the decayed group's weight decay, after `create_optimizer`."""
    args = make_args(tmp_path, sam_mode="sam", **overrides)
    trainer = LLQRSAMTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(8))
    optimizer = trainer.create_optimizer()
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper, if any
    described = optimizer_description(args)
    name, _, shown = described.partition("(")
    assert name == f"torch.optim.{type(optimizer).__name__}"
    values = dict(item.split("=", 1) for item in shown.rstrip(")").replace(", ", ",").split(",") if "=" in item)
    for key, value in values.items():
        if key == "weight_decay":
            assert max(group["weight_decay"] for group in optimizer.param_groups) == float(value)
        elif key != "betas":
            assert str(optimizer.defaults[key]) == value, key
    if "betas" in optimizer.defaults:
        assert f"betas={optimizer.defaults['betas']}" in described
    assert "momentum" in values or overrides["optim"] != "sgd"


STOCK = """---
library_name: peft
base_model: {base}
tags:
- base_model:adapter:{base}
- base_model:adapter:/site-packages/a_gguf_folder
- lora
---

# run

This model is a fine-tuned version of [{name}](https://huggingface.co/{name}) on the digits dataset.
It achieves the following results on the evaluation set:
- Loss: 0.5

## Training procedure

The following hyperparameters were used during training:
- learning_rate: 0.1
- optimizer: Use OptimizerNames.SGD and the args are:
No additional optimizer arguments
- lr_scheduler_type: constant

### Framework versions

- PEFT 0.22.0
## Training method (hf_llqrsam)

Trained with `hf_llqrsam`: **an older section**.
"""


@pytest.mark.parametrize("name", ["", "LOCAL", "org/model"])
def test_complete_model_card(tmp_path, name):
    local = tmp_path / "base"
    local.mkdir()
    name = str(local) if name == "LOCAL" else name
    out = tmp_path / "run"
    out.mkdir()
    (out / "README.md").write_text(STOCK.format(base=name or "org/other", name=name))
    (out / "test_results.json").write_text(json.dumps({"test_loss": 0.123456, "test_runtime": 1.0, "epoch": 1.0}))
    (out / "eval_results.json").write_text(json.dumps({"eval_loss": 0.5, "eval_exact_match": 0.25}))
    args = make_args(out, sam_mode="sam")
    complete_model_card(str(out), args)
    card = (out / "README.md").read_text()
    complete_model_card(str(out), args)
    assert (out / "README.md").read_text() == card  # idempotent
    assert "https://huggingface.co/)" not in card and "Use OptimizerNames" not in card
    assert "a_gguf_folder" not in card and "- lora\n" in card  # an absolute path is no Hub repository
    assert "an older section" not in card and card.count("## Training method (hf_llqrsam)") == 1
    if name == "":
        assert "This model was trained from scratch on the digits dataset." in card
    elif name == str(local):
        assert f"fine-tuned version of the local checkpoint `{local}`" in card and "base_model" not in card
    else:
        assert f"[{name}](https://huggingface.co/{name})" in card and f"base_model: {name}" in card
        assert f"- base_model:adapter:{name}\n" in card
    results = "It achieves the following results on the evaluation set:\n- eval_loss: 0.5\n- eval_exact_match: 0.25"
    results += "\n\nIt achieves the following results on the test set:\n- test_loss: 0.1235\n\n## Training"
    assert results in card and "Loss: 0.5" not in card and "runtime" not in card
    line = f"- optimizer: {optimizer_description(args)}\n- lr_scheduler_type: constant"
    assert line in card and "momentum=0" in line and "\n- PEFT 0.22.0\n\n## Training method" in card


def test_optimizer_description_without_a_model_for_galore(tmp_path):
    """GaLore needs the model to build: the card falls back to the name and `optim_args` instead of failing."""
    args = make_args(tmp_path)
    args.optim = "galore_adamw"
    assert optimizer_description(args).startswith("galore_adamw with optim_args=")


def test_complete_model_card_without_metadata_or_card(tmp_path):
    """A card without a metadata block stays without one; without a card, the method section is the card."""
    args = make_args(tmp_path, sam_mode="sam")
    (tmp_path / "README.md").write_text(
        "# run\n\nThis model is a fine-tuned version of [a/b](https://huggingface.co/a/b).\n"
    )
    complete_model_card(str(tmp_path), args)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("# run\n") and card.count("## Training method (hf_llqrsam)") == 1
    (tmp_path / "README.md").unlink()
    complete_model_card(str(tmp_path), args)
    assert (tmp_path / "README.md").read_text().startswith("## Training method (hf_llqrsam)\n")
