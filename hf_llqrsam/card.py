"""The model card: the section that names the training method and its hf_llqrsam hyperparameters, and the fixes to
the stock card that [`complete_model_card`] makes (base model, test metrics, the optimizer's real arguments)."""

import inspect
import json
import os
import re
from typing import Any

from .modes import MODES

METHOD_HEADER = "## Training method (hf_llqrsam)"
_STOCK_OPTIMIZER = re.compile(r"^- optimizer: Use .*(?:\n(?!- |\n|#).*)*", re.MULTILINE)
_STOCK_BASE = re.compile(
    r"This model is a fine-tuned version of \[(?P<name>[^\]]*)\]\(https://huggingface\.co/[^)]*\)"
)
_STOCK_RESULTS = re.compile(r"\n+It achieves the following results on the (?:evaluation|test) set:(?:\n- [^\n]*)*")
# The speed entries that the stock card leaves out of its results too (transformers.modelcard.parse_log_history).
_SPEED = ("_runtime", "_samples_per_second", "_steps_per_second", "epoch")


def optimizer_description(args: Any) -> str:
    """The optimizer the Trainer builds from `args`, with every argument it gets, e.g.
    `torch.optim.SGD(lr=0.1, momentum=0.9, dampening=0, weight_decay=0.0, nesterov=True)`.

    The class and keyword arguments are the Trainer's own ([`~transformers.Trainer.get_optimizer_cls_and_kwargs`]:
    `learning_rate`, `optim_args`, the Adam betas and epsilon); the other arguments are the class's defaults, which
    the stock card leaves out (it reads "Use OptimizerNames.SGD and the args are:" with nothing but `optim_args`).
    `weight_decay` is the Trainer's: applied to every weight but biases and normalization weights.

    Args:
        args ([`~transformers.TrainingArguments`]):
            The run's arguments (`optim`, `optim_args`, `learning_rate`, `weight_decay`, the Adam fields).

    Returns:
        `str`: `module.Class(name=value, ...)`, or `optim` and `optim_args` where the class cannot be built from the
        arguments alone (e.g. GaLore, which needs the model).
    """
    from transformers import Trainer

    try:
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    except (ImportError, ValueError, TypeError):  # e.g. GaLore needs the model, bitsandbytes is not installed
        return f"{getattr(args.optim, 'value', args.optim)} with optim_args={args.optim_args!r}"
    values: dict[str, Any] = {}
    try:
        parameters = list(inspect.signature(optimizer_cls).parameters.values())
    except (TypeError, ValueError):  # no signature to read: the Trainer's arguments only
        parameters = []
    for parameter in parameters:
        if parameter.kind is parameter.POSITIONAL_OR_KEYWORD and parameter.name != "params":
            values[parameter.name] = parameter.default
    values.update(kwargs)
    values["weight_decay"] = args.weight_decay
    module = optimizer_cls.__module__
    module = "torch.optim" if module.startswith("torch.optim.") else module  # torch.optim.sgd.SGD is torch.optim.SGD
    shown = ", ".join(f"{k}={v}" for k, v in values.items() if v is not inspect.Parameter.empty)
    return f"{module}.{optimizer_cls.__qualname__}({shown})"


def method_card_section(args: Any) -> str:
    """Markdown naming the method (e.g. LLQR+SAM over AdamW), the optimizer with its real arguments
    ([`optimizer_description`]) and every `sam_*`/per-mode/`llqr_*` value it used.

    The stock card lists no hf_llqrsam field, so [`LLQRSAMTrainer.create_model_card`] appends this section; a card
    pushed with `push_to_hub` therefore carries it too.
    """
    optim = str(getattr(args.optim, "value", args.optim))
    if args.sam_mode == "none":
        method = f"{optim} with LLQR preconditioning" if args.llqr else f"{optim} (no SAM)"
    else:
        method = f"{'LLQR+' if args.llqr else ''}{args.sam_mode.upper()} (rho={args.sam_rho}) over {optim}"
    prefixes = ["llqr"] if args.llqr else []
    borrowed: tuple[str, ...] = ()
    if args.sam_mode != "none":
        prefixes += ["sam_", f"{args.sam_mode}_"]
        borrowed = MODES[args.sam_mode].borrows  # e.g. past-FSAM reads fsam_beta, fsam_sigma, fsam_ema
    values = {
        k: v for k, v in args.to_dict().items() if k == "sam_mode" or k.startswith(tuple(prefixes)) or k in borrowed
    }
    lines = "\n".join(f"- {k}: {v}" for k, v in values.items())
    return (
        f"\n{METHOD_HEADER}\n\nTrained with `hf_llqrsam`: **{method}**.\n\n"
        f"Optimizer: `{optimizer_description(args)}`.\n\n"
        f"The following hf_llqrsam hyperparameters were used:\n{lines}\n"
    )


def _is_local(name: Any) -> bool:
    """Whether a base model's name is a local folder, which the card's `base_model` (a Hub repository) cannot be."""
    return isinstance(name, str) and bool(name) and (os.path.isabs(name) or os.path.isdir(name))


def _saved_metrics(output_dir: str, split: str) -> dict[str, Any]:
    """`<output_dir>/<split>_results.json` as `Trainer.save_metrics` wrote it, less the speed entries; {} if none."""
    path = os.path.join(output_dir, f"{split}_results.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        metrics = json.load(f)
    return {k: v for k, v in metrics.items() if not k.endswith(_SPEED)}


def _results_block(name: str, metrics: dict[str, Any]) -> str:
    lines = "\n".join(f"- {k}: {round(v, 4) if isinstance(v, float) else v}" for k, v in metrics.items())
    return f"\nIt achieves the following results on the {name} set:\n{lines}\n"


def complete_model_card(output_dir: str, args: Any) -> None:
    """Complete the card `<output_dir>/README.md` that the stock `create_model_card` (and peft's
    `create_or_update_model_card`) wrote, in place. Idempotent: a second call gives the same card.

    - **Base model.** The stock card reads "fine-tuned version of [](https://huggingface.co/)" for a model built
      from a config (its `_name_or_path` is empty): that becomes "trained from scratch". A local folder as the base
      model (e.g. a GGUF file's directory) is named as a local checkpoint, and dropped from the `base_model`
      metadata and its tags, which must name a Hub repository.
    - **Results.** The final evaluation and test metrics that the run saved with `Trainer.save_metrics`
      (`eval_results.json`, `test_results.json`), speed entries left out. The stock card shows the last logged
      evaluation only, without metrics a script adds after `evaluate` (e.g. exact match) and without the test set.
    - **Optimizer.** The stock "Use OptimizerNames.SGD and the args are: ..." line names the optimizer with its
      real arguments ([`optimizer_description`]).
    - **Method.** The [`method_card_section`] at the end, replacing an earlier one.

    Without a card, the method section alone is written; a card without a metadata block keeps none.

    Args:
        output_dir (`str`):
            The folder holding `README.md` and the `*_results.json` files.
        args ([`~transformers.TrainingArguments`]):
            The run's arguments, with the hf_llqrsam fields.
    """
    from huggingface_hub import ModelCard

    path = os.path.join(output_dir, "README.md")
    if not os.path.isfile(path):  # no card written (a base class without one): the method section alone
        with open(path, "w", encoding="utf-8") as f:
            f.write(method_card_section(args).lstrip("\n"))
        return
    card = ModelCard.load(path)
    text = card.text.split(f"\n{METHOD_HEADER}\n")[0].rstrip("\n") + "\n"

    def base(match: re.Match[str]) -> str:
        name = match["name"]
        if not name:
            return "This model was trained from scratch"
        if _is_local(name):
            return f"This model is a fine-tuned version of the local checkpoint `{name}`"
        return match[0]

    text = _STOCK_BASE.sub(base, text)
    if _is_local(card.data.get("base_model")):
        card.data.base_model = None
    if card.data.tags:  # peft's `base_model:adapter:<path>`
        card.data.tags = [
            t for t in card.data.tags if not (t.startswith("base_model:") and _is_local(t.split(":")[-1]))
        ]
    results = ""
    for split, name in [("eval", "evaluation"), ("test", "test")]:
        metrics = _saved_metrics(output_dir, split)
        if metrics:
            results += _results_block(name, metrics)
    if results:
        text = _STOCK_RESULTS.sub("", text)
        text = re.sub(r"^(This model .*)$", lambda m: m[1] + "\n" + results.strip("\n"), text, count=1, flags=re.M)
    text = _STOCK_OPTIMIZER.sub(lambda _: f"- optimizer: {optimizer_description(args)}", text)
    card.text = text + method_card_section(args)
    with open(path, "w", encoding="utf-8") as f:  # no empty `{}` metadata block for a card that had none
        f.write(str(card) if card.data.to_dict() else card.text)
