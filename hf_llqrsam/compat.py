"""The support matrix in code (`docs/integration.md` §10): unsupported setups raise at construction, naming the
flag."""

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .modes import MODES

_SEE = "See the support matrix in the hf_llqrsam README."


def llqrsam_active(args: Any) -> bool:
    """True when the run deviates from the stock Trainer path (SAM or LLQR on)."""
    return bool(args.sam_mode != "none" or args.llqr)


def _fsdp_version(args: Any) -> int | None:
    if not args.fsdp:
        return None
    config = args.fsdp_config if isinstance(args.fsdp_config, dict) else {}
    return int(config.get("version", 2))


def validate_deepspeed_args(args: Any) -> None:
    """Reject DeepSpeed with SAM/LLQR. A no-op when both are off.

    It needs only the raw `deepspeed` field, so the argument classes run it *before*
    [`~transformers.TrainingArguments`] loads the DeepSpeed config (which needs `deepspeed` installed): the user gets
    this message, not an import error.

    Raises:
        `ValueError`: naming `deepspeed`.
    """
    if llqrsam_active(args) and args.deepspeed:
        raise ValueError(
            f"Invalid deepspeed={_short(args.deepspeed)} with sam_mode/llqr: DeepSpeed runs engine.step() inside "
            "backward and partitions grads and params, so the two-pass step cannot be built on it. Drop --deepspeed "
            f"(use DDP or FSDP2), or turn SAM and LLQR off. {_SEE}"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class LaunchError(ValueError):
    """A multi-process launch that would silently run something else ([`validate_launch`]). A `ValueError`, so code
    that catches those still does; a script turns it into one line on rank 0 with [`launch_errors_exit`]."""


@contextlib.contextmanager
def launch_errors_exit() -> Iterator[None]:
    """Turn a [`LaunchError`] into one line, `<script>: error: <message>` on stderr, printed by the process of global
    rank 0 only, and exit code 2 on every process, instead of one traceback per rank inside the launcher's report.

    Wrap a script's entry point; every process of the launch raises the error at trainer init, and none waits for
    another, so each exits on its own and rank 0 speaks for them (the rank is the launcher's `RANK`).

    Raises:
        `SystemExit`: code 2, on a [`LaunchError`]; any other exception passes through.

    Example:

    ```python
    >>> if __name__ == "__main__":  # doctest: +SKIP
    ...     with launch_errors_exit():
    ...         main()
    ```
    """
    try:
        yield
    except LaunchError as err:
        if int(os.environ.get("RANK", "0") or "0") == 0:
            sys.stderr.write(f"{os.path.basename(sys.argv[0])}: error: {err}\n")
        raise SystemExit(2) from None


def validate_launch(args: Any) -> None:
    """Refuse a multi-process launch that would run as independent, non-DDP trainings (`docs/integration.md` §14.1).

    `torchrun --nproc_per_node 2` (or `accelerate launch --multi_gpu`, even with `use_cpu: true` in its config) on a
    machine without GPUs starts W processes and a gloo process group, but without `use_cpu=True` the Trainer runs
    each process as its own single-device training (`parallel_mode` is not `DISTRIBUTED`): W unsynchronised runs on
    the full dataset, writing to the same `output_dir`, while the launch exits 0. Detected from the environment
    (`WORLD_SIZE` > 1) or an initialised process group with more than one rank, whatever `sam_mode` is.

    Raises:
        [`LaunchError`]: naming `--use_cpu`.
    """
    from transformers.training_args import ParallelMode

    launched = int(os.environ.get("WORLD_SIZE", "1") or "1")
    group = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    processes = max(launched, group)
    mode = args.parallel_mode
    if processes > 1 and mode in (ParallelMode.NOT_PARALLEL, ParallelMode.NOT_DISTRIBUTED):
        raise LaunchError(
            f"Invalid launch: {processes} processes were started (WORLD_SIZE={launched}, process group of {group}), "
            f"but the Trainer runs each as an independent, non-DDP training (parallel_mode={mode.value}, device="
            f"{args.device}), all writing to {args.output_dir!r}. On a machine without GPUs pass --use_cpu "
            "(use_cpu=True) so that the processes join one gloo DDP run; with GPUs, check that each process sees one. "
            f"{_SEE}"
        )


def validate_setup_args(args: Any) -> None:
    """Reject, from the arguments alone, the setups SAM/LLQR cannot run on. A no-op when both are off.

    Also warns about plain SGD under SAM ([`warn_sgd_without_momentum`]). Covers the rows of the README's support
    matrix that the arguments decide: DeepSpeed, LOMO/AdaLOMO, layerwise
    optimizers, `ddp_static_graph`, `parallelism_config` (TP/CP), FSDP on CPU, FSDP1, and under FSDP2 local scope
    and Kronecker U ([`validate_fsdp2`]). The model- and data-level rows are checked by [`validate_setup_model`].

    Raises:
        `ValueError`: naming the offending flag and what to use instead.
    """
    if not llqrsam_active(args):
        return
    validate_deepspeed_args(args)
    warn_sgd_without_momentum(args)
    optim = str(getattr(args.optim, "value", args.optim))
    if optim in ("lomo", "adalomo"):
        raise ValueError(
            f"Invalid optim={optim!r} with sam_mode/llqr: LOMO updates weights inside backward, during pass 1. Use an "
            f"optimizer that steps after backward (e.g. adamw_torch, sgd). {_SEE}"
        )
    if optim.endswith("_layerwise"):
        raise ValueError(
            f"Invalid optim={optim!r} with sam_mode/llqr: layerwise optimizers step in post-accumulate-grad hooks, "
            f"which would update the weights during pass 1. Use the non-layerwise variant. {_SEE}"
        )
    if args.ddp_static_graph:
        raise ValueError(
            "Invalid ddp_static_graph=True with sam_mode/llqr: static graphs crash with no_sync "
            f"(pytorch/pytorch#143580) and then silently stop syncing (pytorch/pytorch#187732). Leave it False. {_SEE}"
        )
    if args.parallelism_config is not None:
        raise ValueError(
            "Invalid parallelism_config with sam_mode/llqr: tensor/context/sequence parallelism adds a gradient "
            f"sync path our sync control does not cover. Leave it unset (use DDP or FSDP2). {_SEE}"
        )
    version = _fsdp_version(args)
    if version is None:
        return
    if args.use_cpu:
        raise ValueError(
            f"Invalid fsdp={args.fsdp!r} with use_cpu=True: Accelerate would silently fall back to DDP. Drop --fsdp "
            f"on CPU, or run FSDP2 on GPUs. {_SEE}"
        )
    if version == 1:
        raise ValueError(
            f"Invalid fsdp_config version=1 with sam_mode/llqr: FSDP1 is not supported. Use version 2. {_SEE}"
        )
    validate_fsdp2(args, "with fsdp")


_WARNED: set[str] = set()  # the once-per-process warnings already given


def warn_sgd_without_momentum(args: Any) -> None:
    """Warn when `optim="sgd"` runs with zero momentum under a SAM mode: transformers' `sgd` is `torch.optim.SGD` with
    its default `momentum=0` unless `optim_args` says otherwise, while the SAM paper trains with SGD and momentum
    0.9 (Foret et al. 2021, §3.1 and Appendix C). The run is allowed (plain SGD is a valid choice); the warning
    names the flag that adds momentum. `optim_args` is read as the Trainer reads it
    ([`~transformers.Trainer.get_optimizer_cls_and_kwargs`]).

    Once per process and message: the arguments are checked when built and again by the trainer, and Python's own
    once-per-place filter is reset whenever any library changes the warning filters.

    Args:
        args ([`~transformers.TrainingArguments`]):
            The run's arguments (`sam_mode`, `optim`, `optim_args`).
    """
    if args.sam_mode == "none" or str(getattr(args.optim, "value", args.optim)) != "sgd":
        return
    from transformers import Trainer

    _, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    message = (
        f"optim='sgd' with sam_mode={args.sam_mode!r} runs torch.optim.SGD with momentum=0 (its default): SAM is "
        'usually trained with momentum 0.9. Pass --optim_args "momentum=0.9" (optim_args="momentum=0.9") to use it.'
    )
    if float(kwargs.get("momentum", 0.0)) == 0.0 and message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, UserWarning, stacklevel=2)


def validate_fsdp_plugin(args: Any, plugin: Any) -> None:
    """The FSDP rules when FSDP comes from Accelerate's config (`accelerate launch --config_file fsdp2.yaml`), which
    the Trainer reads into `accelerator.state.fsdp_plugin` without any `--fsdp` argument. A no-op without a plugin,
    or with SAM and LLQR off.

    Raises:
        `ValueError`: FSDP1 (`fsdp_version: 1`), or a setup [`validate_fsdp2`] rejects.
    """
    if plugin is None or not llqrsam_active(args):
        return
    version = getattr(plugin, "fsdp_version", 1)
    if version != 2:
        raise ValueError(
            f"Invalid fsdp_version={version} in the Accelerate config with sam_mode/llqr: FSDP1 is not supported. Set "
            f"fsdp_version: 2 (recipes/accelerate_configs/fsdp2.yaml). {_SEE}"
        )
    validate_fsdp2(args, "under Accelerate's FSDP2")


def validate_fsdp2(args: Any, where: str) -> None:
    """The rules of SAM/LLQR under FSDP2 (`docs/integration.md` §7.4–7.5), for `fsdp` arguments and for models the
    user shards with `fully_shard` before building the Trainer; `where` names the setup in the message.

    Supported: every `sam_mode` in window and micro mode (micro syncs every pass 2), global scope, and LLQR with
    `diagonal` or `scalar` U. Rejected: local scope and Kronecker structures.

    Raises:
        `ValueError`: naming the flag, why it cannot work under FSDP2, and what to use instead.
    """
    if args.sam_mode != "none" and args.sam_scope == "local":
        raise ValueError(
            f"Invalid sam_scope='local' {where}: FSDP2 shards every parameter across the ranks and all-gathers one θ "
            "for each forward, so a rank cannot be perturbed along its own gradient (a rank-local ε needs each rank's "
            "whole unsynced gradient and its own copy of θ + ε). Use sam_scope='global' (ε from the all-reduced "
            f"gradient), or DDP for m-sharpness. {_SEE}"
        )
    spec = MODES.get(args.sam_mode)
    if spec is not None and spec.acts_on_lora:
        raise ValueError(
            f"Invalid sam_mode={args.sam_mode!r} {where}: it perturbs each LoRA layer's whole merged weight W + sBA, "
            f"which FSDP2 shards by rows, so no rank holds a whole row to filter the noise by. Use DDP. {_SEE}"
        )
    if args.llqr and args.llqr_structure not in ("diagonal", "scalar"):
        raise ValueError(
            f"Invalid llqr_structure={args.llqr_structure!r} {where}: Kronecker factors act on both sides of each "
            "kernel (U(X) = A X Bᵀ), while FSDP2 shards kernels by rows, so U·g would need each kernel's whole "
            "gradient on every rank (an all-gather per kernel and step) and factors that cannot be sharded like the "
            f"parameter. Use llqr_structure='diagonal' or 'scalar' under FSDP2, or DDP. {_SEE}"
        )


def validate_setup_model(args: Any, model: nn.Module, train_dataset: Any) -> None:
    """Reject the model- and data-level setups SAM/LLQR cannot run on (`docs/integration.md` §10), including a model
    the user already sharded with FSDP2's `fully_shard` ([`validate_fsdp2`])."""
    if llqrsam_active(args):
        from .distributed import is_fsdp2, unwrap

        if is_fsdp2(model):
            validate_fsdp2(args, "on an FSDP2 (fully_shard) model")
        spec = MODES.get(args.sam_mode)
        if spec is not None and spec.acts_on_lora:  # no LoRA layer, a quantized base, LoRA on a non-linear layer
            from .lora_sam import lora_layers

            lora_layers(unwrap(model), args.sam_mode)
    if not args.llqr:
        return
    trainable = [p for p in model.parameters() if p.requires_grad]
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in trainable):
        raise ValueError(
            "Invalid llqr=True with half-precision trainable parameters: the curvature problem is validated in fp32 "
            f"only. Load the model in float32 and use --bf16 for mixed precision. {_SEE}"
        )
    config = getattr(model, "config", None)
    attn = str(getattr(config, "_attn_implementation", "") or "")
    if attn.startswith("flash"):
        raise ValueError(
            f"Invalid llqr=True with attn_implementation={attn!r}: flash attention has no double backward. "
            f"Use 'sdpa' or 'eager'. {_SEE}"
        )
    problem_type = getattr(config, "problem_type", None)
    if problem_type in ("regression", "multi_label_classification"):
        raise ValueError(
            f"Invalid llqr=True with problem_type={problem_type!r}: the curvature is defined for categorical "
            f"outputs only. {_SEE}"
        )
    if isinstance(train_dataset, torch.utils.data.IterableDataset) or type(train_dataset).__name__ == (
        "IterableDataset"
    ):
        raise ValueError(
            f"Invalid llqr=True with an IterableDataset: the curvature batch must be drawn by index. {_SEE}"
        )
