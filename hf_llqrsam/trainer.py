"""[`LLQRSAMTrainer`]: two-pass SAM (and LLQR) inside `training_step`, glue only (`integration.md` §3).

The Trainer keeps its loop, clipping, optimizer step, scheduler, logging and saving. This module decides *when*
(window position, sync, cadence) and moves tensors; every formula lives in `sam.py` and `llqr/`.
"""

import contextlib
import os
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any, cast

import datasets
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, Seq2SeqTrainer, Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging

from .args import LLQRSAMFields, LLQRSAMTrainingArguments
from .card import method_card_section
from .checkpoint import load_state, save_state
from .compat import llqrsam_active, validate_setup_model
from .config import SAMConfig
from .data import curvature_indices
from .distributed import any_rank, grad_sync, unwrap
from .sam import (
    Perturbation,
    SAMState,
    apply_perturbation_,
    batchnorm_buffers,
    compute_perturbation,
    gsam_descent_,
    restore_,
    total_norm,
)
from .schedules import rho_at

logger = logging.get_logger(__name__)

# Logged keys that are counts (summed over a logging interval); every other key is averaged.
_COUNTERS = ("sam/skipped", "sam/skipped_ascent", "llqr/nonfinite_ugrad")
_GEOMETRY_MODES = ("sam", "fsam")


def _rng_state() -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


# mypy sees the mixin as a Trainer (it is only ever mixed into one); at run time it is a plain object.
if TYPE_CHECKING:
    _MixinBase = Trainer
else:
    _MixinBase = object


class LLQRSAMTrainerMixin(_MixinBase):
    """Turns [`~transformers.Trainer`] into a two-pass SAM / LLQR+SAM trainer, driven by `sam_*` / `llqr_*` args.

    Per optimizer step (window mode, `algorithm.md` §8.5): refresh U on schedule; pass 1 on every micro-batch
    gives g; ε = ρ·Cv/ν(v); pass 2 re-runs the window at θ + ε; θ is restored by copy; the descent gradient P·g̃
    (GSAM: g̃ − α g⊥) is left in `p.grad` for the Trainer's clip and optimizer step. `sam_mode="none"` with `llqr`
    off calls the stock `training_step` and nothing else.

    Example:

    ```python
    >>> from hf_llqrsam import LLQRSAMTrainer, LLQRSAMTrainingArguments
    >>> args = LLQRSAMTrainingArguments(output_dir="out", sam_mode="sam", sam_rho=0.05)
    >>> trainer = LLQRSAMTrainer(model=model, args=args, train_dataset=train_dataset)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    ```
    """

    args: LLQRSAMTrainingArguments  # or the Seq2Seq variant: both carry LLQRSAMFields (checked in __init__)
    model: nn.Module

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, LLQRSAMFields):
            raise TypeError(
                f"Invalid args of type {type(self.args).__name__}: use LLQRSAMTrainingArguments or "
                "LLQRSAMSeq2SeqTrainingArguments."
            )
        validate_setup_model(self.args, self.model, self.train_dataset)
        self.llqrsam_enabled = llqrsam_active(self.args)
        self.sam_config = SAMConfig.from_args(self.args)
        self.sam_state = SAMState()
        self.preconditioner: Any = None  # LLQRPreconditioner, built lazily on the first step
        self._llqrsam_metrics: dict[str, list[float]] = defaultdict(list)
        self._named_params: list[tuple[str, nn.Parameter]] | None = None
        self._pending_state: dict[str, Any] | None = None
        self._window_inputs: list[dict[str, Any]] = []
        self._window_rng: list[tuple[Tensor, Tensor | None]] = []
        self._window_pos = 0
        self._step_is_sam = False
        self._bn_backup: list[Tensor] | None = None
        self._perturbation: Perturbation | None = None
        self._drop_step = False
        self._clean_loss: Tensor | float = 0.0
        self._perturbed_loss: Tensor | float = 0.0
        self._pre_step_params: list[Tensor] = []

    # ------------------------------------------------------------------ the loop override

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        if not self.llqrsam_enabled:
            return super().training_step(model, inputs, num_items_in_batch)
        if self._window_pos == 0:
            self._begin_step(model)
        self._window_pos += 1
        last = self.accelerator.sync_gradients
        if not self._step_is_sam:
            loss = super().training_step(model, inputs, num_items_in_batch)
        elif self.sam_config.accumulation == "window":
            loss = self._window_call(model, inputs, num_items_in_batch, last)
        else:
            loss = self._micro_call(model, inputs, num_items_in_batch)
        if last:
            self._finish_step()
            self._window_pos = 0
        return loss

    def _begin_step(self, model: nn.Module) -> None:
        self._resolve_params()
        if self._pending_state is not None:
            self._load_llqrsam_state(self._pending_state)
            self._pending_state = None
        self._maybe_refresh_preconditioner(model)
        cfg, step = self.sam_config, self.state.global_step
        self._step_is_sam = (
            cfg.mode != "none" and step >= cfg.start_step and (step - cfg.start_step) % cfg.interval == 0
        )
        self._window_inputs, self._window_rng = [], []
        self._perturbation, self._drop_step = None, False
        self._clean_loss, self._perturbed_loss = 0.0, 0.0

    def _window_call(self, model: nn.Module, inputs: dict[str, Any], nitems: Any, last: bool) -> Tensor:
        """Pass 1 on this micro-batch; on the window's last call, one ε from the window gradient and the replays."""
        cfg = self.sam_config
        if self._window_pos == 1 and cfg.bn_stats == "second":
            self._bn_backup = [b.clone() for b in batchnorm_buffers(model)]
        self._window_inputs.append(inputs)
        if cfg.same_dropout:
            self._window_rng.append(_rng_state())
        # GA = 1 runs under the Trainer's nullcontext: "local" would silently become global without this.
        sync_ctx = grad_sync(model, False) if last and cfg.scope == "local" else contextlib.nullcontext()
        with sync_ctx:
            loss = super().training_step(model, inputs, nitems)
        self._clean_loss += loss
        if last:
            self._ascend_and_replay(model, self._window_inputs, self._window_rng, nitems, micro=False)
        return loss

    def _micro_call(self, model: nn.Module, inputs: dict[str, Any], nitems: Any) -> Tensor:
        """One ε per micro-batch: pass 1 on its own gradient, then pass 2 accumulates onto the window's sum."""
        cfg = self.sam_config
        grads = [p.grad for _, p in self._named_params if p.grad is not None]  # type: ignore[union-attr]
        stash = {id(g): g.clone() for g in grads} if grads else None
        if grads:
            torch._foreach_zero_(grads)
        if cfg.bn_stats == "second":
            self._bn_backup = [b.clone() for b in batchnorm_buffers(model)]
        rng = [_rng_state()] if cfg.same_dropout else []
        with grad_sync(model, cfg.scope == "global"):  # set before the forward (davda54/sam#78)
            loss = super().training_step(model, inputs, nitems)
        self._clean_loss += loss
        self._ascend_and_replay(model, [inputs], rng, nitems, micro=True, stash=stash)
        return loss

    def _ascend_and_replay(
        self,
        model: nn.Module,
        replays: list[dict[str, Any]],
        rng: list[tuple[Tensor, Tensor | None]],
        nitems: Any,
        micro: bool,
        stash: dict[int, Tensor] | None = None,
    ) -> None:
        """ε from the gradient in `p.grad`, pass 2 at θ + ε on `replays`, exact restore (`integration.md` §3.3).

        Window mode replays the whole window, synchronising only the last replay; micro mode runs one pass 2 under
        the Trainer's own sync context, accumulating onto `stash` (earlier micro-batches' pass-2 sum, if any).
        """
        cfg = self.sam_config
        names, params, grads = self._live_grads()
        scale = self._grad_scale()
        rho = rho_at(
            cfg.rho_schedule, self.state.global_step, cfg.rho, cfg.rho_min,
            lr=self._get_learning_rate(), lr_max=self.args.learning_rate,
        )  # fmt: skip
        pert = compute_perturbation(cfg, self.sam_state, names, params, grads, rho, self._geometry(), scale)
        finite = pert.finite
        if cfg.scope == "local":
            finite = not any_rank(not finite, self.args.device)
        self._perturbation = pert if finite else None
        if not finite:
            self._drop_step = True
            self._record("sam/skipped_ascent", 1.0)
        else:
            self._record_perturbation(pert, rho)

        # pass 2 accumulates from zero (window) or onto earlier micro-batches' pass 2 (micro)
        stashed = stash or {}
        restored = [g for g in grads if id(g) in stashed]
        if restored:
            torch._foreach_copy_(restored, [stashed[id(g)] for g in restored])
        zeroed = [g for g in grads if id(g) not in stashed]
        if zeroed:
            torch._foreach_zero_(zeroed)
        bn = batchnorm_buffers(model)
        if cfg.bn_stats == "second" and self._bn_backup is not None and bn:
            torch._foreach_copy_(bn, self._bn_backup)
        bn_first = [b.clone() for b in bn] if cfg.bn_stats == "first" else None
        post_pass1_rng = _rng_state() if cfg.same_dropout else None
        backups = apply_perturbation_(params, pert.eps) if finite else None
        try:
            for j, inputs in enumerate(replays):
                if cfg.same_dropout:
                    _set_rng_state(rng[j])
                # Window replays: no sync until the last; micro: the Trainer's own context decides.
                last = j == len(replays) - 1
                ctx = contextlib.nullcontext() if micro else grad_sync(model, last)
                with ctx:
                    self._perturbed_loss += super().training_step(model, inputs, nitems)
        finally:
            if backups is not None:
                restore_(params, backups)
            if post_pass1_rng is not None:
                _set_rng_state(post_pass1_rng)
            if bn_first:
                torch._foreach_copy_(bn, bn_first)
            self._bn_backup = None

    def _finish_step(self) -> None:
        """At the sync micro-batch: GSAM correction, P = U, finiteness guard and metrics; once per optimizer step."""
        names, params, grads = self._live_grads()
        pert = self._perturbation
        if pert is not None and self.sam_config.mode == "gsam":
            gsam_descent_(grads, pert.clean_grads, self.sam_config.gsam_alpha)
        if self.preconditioner is not None and self.args.llqr_on_update and self.args.llqr_apply == "gradient":
            self.preconditioner.apply_(names, grads)
        nonfinite = not bool(torch.isfinite(total_norm(grads)))
        if self._drop_step or nonfinite:
            self._record("sam/skipped", 1.0)
            scaler = self.accelerator.scaler
            if scaler is not None and scaler.is_enabled():
                if grads and not nonfinite:
                    grads[0].view(-1)[0] = float("inf")  # the scaler skips the step and backs off
            else:
                for p in params:  # no scaler: no grads means the optimizer leaves these weights untouched
                    p.grad = None
        if self._step_is_sam:
            clean, perturbed = float(self._clean_loss), float(self._perturbed_loss)
            self._record("sam/loss_perturbed", perturbed)
            if pert is not None:
                self._record("sam/sharpness", perturbed - clean)

    # ------------------------------------------------------------------ helpers

    def _resolve_params(self) -> None:
        # Resolved lazily, after `accelerator.prepare` (FSDP2 swaps params for DTensors there).
        if self._named_params is None:
            self._named_params = [(n, p) for n, p in unwrap(self.model).named_parameters() if p.requires_grad]

    def _live_grads(self) -> tuple[list[str], list[nn.Parameter], list[Tensor]]:
        names, params, grads = [], [], []
        for n, p in self._named_params or []:
            if p.grad is not None:
                names.append(n)
                params.append(p)
                grads.append(p.grad)
        return names, params, grads

    def _grad_scale(self) -> float:
        scaler = self.accelerator.scaler
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def _geometry(self) -> Any:
        if self.preconditioner is not None and self.args.llqr_in_perturbation and self.sam_config.mode in (
            _GEOMETRY_MODES
        ):
            return self.preconditioner
        return None

    def _record(self, key: str, value: float) -> None:
        self._llqrsam_metrics[key].append(value)

    def _record_perturbation(self, pert: Perturbation, rho: float) -> None:
        self._record("sam/grad_norm", pert.grad_norm)
        self._record("sam/perturbation_norm", pert.perturbation_norm)
        self._record("sam/rho", rho)
        if self.sam_config.mode in ("fsam", "vasso"):
            self._record("sam/probe_norm", pert.probe_norm)

    # ------------------------------------------------------------------ LLQR

    def _maybe_refresh_preconditioner(self, model: nn.Module) -> None:
        """Refresh U at global steps 0, E, 2E, … before `llqr_update_until` (`algorithm.md` §5.4)."""
        if not self.args.llqr:
            return
        from .llqr import LLQRConfig, LLQRPreconditioner, make_update_probe

        module = unwrap(model)
        if self.preconditioner is None:
            self.preconditioner = LLQRPreconditioner(module, LLQRConfig.from_args(self.args))
        step = self.state.global_step
        if not self.preconditioner.is_due(step) or self.preconditioner.last_update_step == step:
            return
        probe = None
        if self.args.llqr_apply == "update":
            probe = make_update_probe(self._inner_optimizer(), module)
        batch = self._curvature_batch(step)
        start = time.perf_counter()
        metrics = self.preconditioner.update(
            module, batch, step=step, extractor=self.llqr_logits_and_targets, update_probe=probe
        )
        self.preconditioner.broadcast_(0)  # identical U on every rank, free of floating-point drift
        metrics["llqr/update_seconds"] = time.perf_counter() - start
        for key, value in metrics.items():
            self._record(key, value)

    def llqr_logits_and_targets(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """`(logits[rows, C], targets[rows], row_mask[rows])` of the curvature batch (`integration.md` §5.3).

        Override for heads the default does not know. The default handles classification heads, encoder–decoder
        LMs and causal LMs (labels shifted by one); labels are popped, so the model computes no loss of its own.
        """
        from .llqr import logits_and_targets

        causal = type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        return logits_and_targets(model, batch, shift_labels=causal)

    def _curvature_batch(self, step: int) -> dict[str, Any]:
        """`llqr_batch_size` examples drawn as a pure function of (seed, step), through the training collator.

        Transforms run under a forked RNG, so the training stream is untouched and resume needs no extra state
        (`algorithm.md` §5.5). Uses the Trainer's column filtering, as `get_train_dataloader` does (5.23). With
        `llqr_curvature_sharding="sharded"` each rank takes every W-th example; the partial sums are all-reduced.
        """
        dataset, collator = self.train_dataset, self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        indices = curvature_indices(self.args.seed, step, len(dataset), self.args.llqr_batch_size)  # type: ignore[arg-type]
        if self.args.llqr_curvature_sharding == "sharded" and self.args.world_size > 1:
            indices = indices[self.args.process_index :: self.args.world_size]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.args.seed + step)
            batch = collator([dataset[i] for i in indices])  # type: ignore[index]
        return self._prepare_inputs(batch)

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        # Accelerate wraps the torch optimizer in an AcceleratedOptimizer once the Trainer prepared it
        return cast(torch.optim.Optimizer, getattr(self.optimizer, "optimizer", self.optimizer))

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The base optimizer; with `llqr_apply="update"`, step hooks rewrite θ ← θ_old + U(θ − θ_old).

        The hooks sit on the torch optimizer itself, so they fire only on steps that really happen (not on steps the
        fp16 scaler skips), and act on the full update: LR, momentum/Adam normalisation and weight decay included
        (`algorithm.md` §7.3).
        """
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if self.args.llqr and self.args.llqr_apply == "update":
            if type(optimizer) not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
                raise ValueError(
                    f"Invalid llqr_apply='update' with optimizer {type(optimizer).__name__} (optim="
                    f"{self.args.optim!r}): it needs the closed-form dry-run update of SGD, Adam or AdamW. Use "
                    "--optim sgd, adamw_torch or adam, or llqr_apply='gradient'."
                )
            optimizer.register_step_pre_hook(self._snapshot_before_step)
            optimizer.register_step_post_hook(self._precondition_update)
        return optimizer

    def _snapshot_before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._pre_step_params = [p.detach().clone() for _, p in self._named_params or []]

    def _precondition_update(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.preconditioner is None or self._named_params is None:
            return
        names = [n for n, _ in self._named_params]
        params = [p.detach() for _, p in self._named_params]
        with torch.no_grad():
            delta = list(torch._foreach_sub(params, self._pre_step_params))
            self.preconditioner.apply_(names, delta)
            torch._foreach_copy_(params, torch._foreach_add(self._pre_step_params, delta))
        self._pre_step_params = []

    # ------------------------------------------------------------------ other Trainer overrides

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """Both passes are counted on SAM steps (the Trainer calls this once per `training_step`)."""
        flops = super().floating_point_ops(inputs)
        return 2 * flops if self.llqrsam_enabled and self._step_is_sam else flops

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Merge the `sam/*` and `llqr/*` metrics into training logs: counters summed, the rest averaged."""
        if self._llqrsam_metrics and "loss" in logs:
            for key, values in self._llqrsam_metrics.items():
                logs[key] = sum(values) if key in _COUNTERS else sum(values) / len(values)
            self._llqrsam_metrics.clear()
        super().log(logs, start_time)

    def _llqrsam_state_dict(self) -> dict[str, Any]:
        return {
            "sam": self.sam_state.state_dict(),
            "llqr": self.preconditioner.state_dict() if self.preconditioner is not None else None,
            "config": {"sam_mode": self.args.sam_mode, "llqr": self.args.llqr, "structure": self.args.llqr_structure},
        }

    def _load_llqrsam_state(self, state: dict[str, Any]) -> None:
        config = state["config"]
        if config["sam_mode"] != self.args.sam_mode or config["llqr"] != self.args.llqr:
            raise ValueError(
                f"Invalid resume: the checkpoint was trained with sam_mode={config['sam_mode']!r}, "
                f"llqr={config['llqr']}, but this run has sam_mode={self.args.sam_mode!r}, llqr={self.args.llqr}."
            )
        self.sam_state.load_state_dict(state["sam"], device=self.args.device)
        if state["llqr"] is not None:
            from .llqr import LLQRConfig, LLQRPreconditioner

            if self.preconditioner is None:
                self.preconditioner = LLQRPreconditioner(unwrap(self.model), LLQRConfig.from_args(self.args))
            self.preconditioner.load_state_dict(state["llqr"])

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.llqrsam_enabled and self.args.should_save:
            save_state(output_dir, self._llqrsam_state_dict())

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not self.llqrsam_enabled:
            return
        state = load_state(checkpoint)
        if state is None:
            if self.args.llqr or self.sam_config.mode in ("fsam", "vasso", "infosam"):
                logger.warning(f"No llqrsam_state.pt in {checkpoint}: starting with U = I and empty SAM state.")
            return
        self._pending_state = state  # materialised on the first training_step, after prepare

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Work around huggingface/transformers#43701 (5.x): resume silently drops renamed weights (e.g. ViT).

        `load_state_dict(strict=False)` skips checkpoint keys that 5.x `save_pretrained` wrote under their legacy
        names; `from_pretrained` applies the renames. The canary test `test_vit_resume_canary_43701` fails once
        upstream fixes it, and then this override can go.
        """
        target = self.model if model is None else model
        weights = os.path.join(resume_from_checkpoint, "model.safetensors")
        if (
            isinstance(target, PreTrainedModel)
            and os.path.isfile(weights)
            and not (self.is_fsdp_enabled or self.is_deepspeed_enabled)
        ):
            dtype = next(target.parameters()).dtype
            loaded = type(target).from_pretrained(resume_from_checkpoint, config=target.config, dtype=dtype)
            target.load_state_dict(loaded.state_dict(), strict=True)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """The stock card, tagged `hf-llqrsam`, the SAM mode and `llqr` (`integration.md` §9), plus a section naming
        the method and its hf_llqrsam hyperparameters ([`~hf_llqrsam.card.method_card_section`])."""
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        ours = ["hf-llqrsam"] + ([self.args.sam_mode] if self.args.sam_mode != "none" else [])
        ours += ["llqr"] if self.args.llqr else []
        super().create_model_card(
            language=language, license=license, tags=tags + [t for t in ours if t not in tags],
            model_name=model_name, finetuned_from=finetuned_from, tasks=tasks, dataset_tags=dataset_tags,
            dataset=dataset, dataset_args=dataset_args,
        )
        if self.is_world_process_zero():
            with open(os.path.join(str(self.args.output_dir), "README.md"), "a", encoding="utf-8") as f:
                f.write(method_card_section(self.args))


class LLQRSAMTrainer(LLQRSAMTrainerMixin, Trainer):
    """[`~transformers.Trainer`] with SAM-family and LLQR steps; see [`LLQRSAMTrainerMixin`]."""


class LLQRSAMSeq2SeqTrainer(LLQRSAMTrainerMixin, Seq2SeqTrainer):
    """[`~transformers.Seq2SeqTrainer`] with SAM-family and LLQR steps; see [`LLQRSAMTrainerMixin`]."""
