"""[`LLQRSAMTrainer`]: SAM-family and LLQR steps inside `training_step`, glue only (`docs/integration.md` §3).

The Trainer keeps its loop, clipping, optimizer step, scheduler, logging and saving. This module decides *when*
(window position, gradient sync) and moves tensors; the step itself is [`~hf_llqrsam.engine.SAMEngine`]'s, and every
formula lives in `sam.py` and `llqr/`.
"""

import contextlib
import inspect
import json
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, Seq2SeqTrainer, Trainer
from transformers.utils import logging

from .args import (
    LLQRSAMFields,
    LLQRSAMSeq2SeqTrainingArguments,
    LLQRSAMTrainingArguments,
    validate_llqrsam_args,
)
from .card import method_card_section
from .checkpoint import STATE_FILE, last_complete_checkpoint, load_state, save_state
from .compat import llqrsam_active, validate_fsdp_plugin, validate_launch, validate_setup_model
from .data import curvature_indices
from .distributed import (
    accelerate_all_reduce,
    accelerate_broadcast,
    any_rank,
    grad_sync,
    is_fsdp2,
    sharded_update_probe,
    unsharded_view,
    unwrap,
)
from .engine import SAMEngine
from .modes import MODES
from .sam import Preconditioner, SAMState
from .schedules import rho_at
from .step import StepState, rng_state, set_rng_state

logger = logging.get_logger(__name__)

U_SUMMARY_FILE = "llqr_u_summary.json"
"""The per-tensor summary of U written next to each checkpoint (`_save_llqrsam_state`)."""


# mypy sees the mixin as a Trainer (it is only ever mixed into one); at run time it is a plain object.
if TYPE_CHECKING:
    _MixinBase = Trainer
else:
    _MixinBase = object


class LLQRSAMTrainerMixin(_MixinBase):
    """Turns [`~transformers.Trainer`] into a SAM-family / LLQR+SAM trainer, driven by `sam_*` / `llqr_*` args.

    Per optimizer step (window mode, `docs/algorithm.md` §8.5): refresh U on schedule; pass 1 on every micro-batch
    gives g; ε = ρ·Cv/ν(v) (the mode's [`~hf_llqrsam.modes.ModeSpec`]); pass 2 re-runs the window at θ + ε; θ is
    restored by copy; the descent gradient is left in `p.grad` for the Trainer's clip and optimizer step. The step
    is [`~hf_llqrsam.engine.SAMEngine`]'s (one per `train()` call, built at its first step); this class only runs the
    passes. `sam_mode="none"` with `llqr` off calls the stock `training_step` and nothing else.

    Every Trainer-method override passes its arguments through to whatever base class the mixin is combined with.

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

    args_class: type = LLQRSAMTrainingArguments
    """The arguments class built when `args=None` (as the stock trainer builds its own)."""
    default_output_suffix: str | None = None
    """`None`: `args=None` writes to `tmp_trainer` (stock Trainer); TRL's trainers name it `<model>-<suffix>`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = inspect.signature(super().__init__).bind_partial(*args, **kwargs)
        if bound.arguments.get("args") is None:  # as stock: default arguments, of our class
            bound.arguments["args"] = self._default_args(bound.arguments.get("model"))
        super().__init__(*bound.args, **bound.kwargs)
        if not isinstance(self.args, LLQRSAMFields):
            raise TypeError(
                f"Invalid args of type {type(self.args).__name__}: use LLQRSAMTrainingArguments or "
                "LLQRSAMSeq2SeqTrainingArguments."
            )
        validate_launch(self.args)
        validate_fsdp_plugin(self.args, getattr(self.accelerator.state, "fsdp_plugin", None))
        self.engine: SAMEngine | None = None  # the step engine of the current train() call
        self._fixed_preconditioner: Preconditioner | None = None
        self._pending_state: tuple[str, dict[str, Any]] | None = None  # (path, contents) of a checkpoint's state
        self._llqr_shift: bool | None = None  # llqr_shift_labels, resolved at the first curvature batch
        self._configure()
        self._where_u_enters()

    def _where_u_enters(self) -> None:
        # C = U and P = U from the LLQR config; a fixed U set as `trainer.preconditioner` enters both. Attributes,
        # so a test or a subclass may change them before train().
        llqr = self.llqr_config
        self.u_in_perturbation = llqr.in_perturbation if llqr is not None else True
        self.u_on_update = llqr.on_update and llqr.apply == "gradient" if llqr is not None else True

    def _default_args(self, model: Any) -> Any:
        output_dir = "tmp_trainer"  # the stock Trainer's own default
        if self.default_output_suffix is not None:  # TRL: f"{model name}-SFT"
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            output_dir = f"{str(name).split('/')[-1]}-{self.default_output_suffix}"
        logger.info(f"No `TrainingArguments` passed, using `output_dir={output_dir}`.")
        return self.args_class(output_dir=output_dir)

    def _configure(self) -> None:
        """(Re)validate `args` and (re)build the typed configs: at construction, at each `train()`, and after a
        `hyperparameter_search` trial set its values, so a field changed after construction is refused too."""
        validate_llqrsam_args(self.args, warn=False)
        if self.model is not None:
            validate_setup_model(self.args, self.model, self.train_dataset)
        self.llqrsam_enabled = llqrsam_active(self.args)
        self.sam_config = self.args.to_sam_config()
        self.llqr_config = self.args.to_llqr_config()
        self.mode_spec = MODES.get(self.sam_config.mode)
        one_pass = self.mode_spec is not None and self.mode_spec.passes == "one"
        if one_pass and self.sam_config.past_fsam_overlap > 0 and self.args.world_size > 1:
            raise ValueError(
                f"Invalid past_fsam_overlap={self.sam_config.past_fsam_overlap!r} with world_size="
                f"{self.args.world_size}: the overlap window keeps each rank's own recent batches, and a checkpoint "
                "holds rank 0's only, so it is single-process. Use past_fsam_overlap=0 with several processes."
            )

    # ------------------------------------------------------------------ the engine's state, as attributes

    @property
    def sam_state(self) -> SAMState:
        """The SAM-family mode state of the current run (FSAM ḡ, VaSSO d, …)."""
        return self.engine.state if self.engine is not None else SAMState()

    @property
    def preconditioner(self) -> Any:
        """U: the learned LLQR preconditioner, or a fixed [`~hf_llqrsam.sam.Preconditioner`] set before `train()`."""
        return self.engine.preconditioner if self.engine is not None else self._fixed_preconditioner

    @preconditioner.setter
    def preconditioner(self, value: Preconditioner | None) -> None:
        self._fixed_preconditioner = value
        if self.engine is not None and self.llqr_config is None:
            self.engine.preconditioner = value

    @property
    def llqrsam_perturbed_pass(self) -> bool:
        """True while a pass at θ + ε runs: a `compute_loss` that records metrics can skip them there."""
        return self.engine is not None and self.engine.in_perturbed_pass

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """[`~transformers.Trainer.train`] with a fresh SAM state and U (`model_init` may build a fresh model).

        Settings are validated again here. `resume_from_checkpoint=True` resumes from the newest *complete*
        checkpoint ([`~hf_llqrsam.checkpoint.last_complete_checkpoint`]: a save killed half-way is skipped, with a
        warning naming it). Under `auto_find_batch_size`, an out-of-memory retry keeps the SAM state and U as the
        failed attempt left them, as it keeps the weights; only the failed step is dropped.
        """
        self._configure()
        self.engine = None
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(str(self.args.output_dir))
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _hp_search_setup(self, trial: Any) -> None:
        super()._hp_search_setup(trial)  # sets the trial's values on args: the configs follow them
        if trial is not None:
            self._configure()
            self._where_u_enters()

    # ------------------------------------------------------------------ the loop override

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        if not self.llqrsam_enabled:
            return super().training_step(model, inputs, num_items_in_batch)
        engine = self._engine_ready()
        st = engine.current or self._begin_step(engine, model)
        st.calls += 1
        engine.last_call_passes = 2 if st.kind == "two" else 1
        last = self.accelerator.sync_gradients
        try:
            if st.kind == "one":
                loss = self._one_pass_call(engine, st, model, inputs, num_items_in_batch, last)
            elif st.kind != "two":
                loss = super().training_step(model, inputs, num_items_in_batch)
            elif self.sam_config.accumulation == "window":
                loss = self._window_call(engine, st, model, inputs, num_items_in_batch, last)
            else:
                loss = self._micro_call(engine, st, model, inputs, num_items_in_batch)
            if last:
                engine.descend()
        except BaseException:
            engine.abort()  # nothing of a failed call (e.g. out of memory) is left behind
            raise
        if last:
            engine.end()
        return loss

    def _engine_ready(self) -> SAMEngine:
        if self.engine is None:  # built after `accelerator.prepare` (FSDP2 swaps the parameters there)
            sam = self.sam_config if self.mode_spec is not None else None
            with _flag_names():
                self.engine = SAMEngine(
                    unwrap(self.model), sam, llqr=self.llqr_config, preconditioner=self._fixed_preconditioner,
                    device=self.accelerator.device, agree=lambda flag: any_rank(flag, self.args.device),
                    u_in_perturbation=self.u_in_perturbation, u_on_update=self.u_on_update,
                )  # fmt: skip
        self.engine.scaler = self.accelerator.scaler
        if self.optimizer is not None:
            self.engine.attach(self._inner_optimizer())
        return self.engine

    def _begin_step(self, engine: SAMEngine, model: nn.Module) -> StepState:
        if self._pending_state is not None:
            path, state = self._pending_state
            self._pending_state = None
            with _flag_names():
                engine.load_state_dict(state, source=path)
        with _flag_names():
            self._maybe_refresh(engine, model)
        return engine.begin(self.state.global_step)

    def _rho(self, step: int) -> float:
        cfg = self.sam_config
        optimizer = self.optimizer
        lr = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else self.args.learning_rate
        return rho_at(cfg.rho_schedule, step, cfg.rho, cfg.rho_min, lr=lr, lr_max=self.args.learning_rate)

    def _one_pass_call(
        self, engine: SAMEngine, st: StepState, model: nn.Module, inputs: dict[str, Any], nitems: Any, last: bool
    ) -> Tensor:
        """past-FSAM: one pass at θ + ε on this micro-batch, ε built once per step from the state alone.

        The reference (`lqr_optimizer/_src/utils/sam_mode_handlers.py:_build_past_fsam_train_step`) runs no pass at
        θ. With `past_fsam_overlap` f the last call also runs the stored micro-batches of the K − 1 previous steps
        at θ + ε (the reference's overlapping batch windows, `utils.py:prepare_dataloader`); the engine averages.
        """
        if st.calls == 1:
            st.num_items = nitems
            engine.ascend(self._rho(st.step))
        st.inputs.append(inputs)
        passes: list[tuple[dict[str, Any], Any]] = [(inputs, nitems)]
        if last:
            stored = engine.overlap_window()
            st.extra_passes = len(stored)
            passes += [(mb, entry["num_items"]) for entry in stored for mb in entry["inputs"]]
        with engine.perturbed(zero_grads=False):
            for j, (batch, n) in enumerate(passes):
                # one pass: the Trainer's own sync context; with stored batches, sync only the very last backward
                ctx = contextlib.nullcontext() if len(passes) == 1 else grad_sync(model, j == len(passes) - 1)
                with ctx:
                    loss_j = super().training_step(model, batch, n)
                if j == 0:
                    loss = loss_j
                    st.perturbed_loss += loss_j
        engine.last_call_passes = len(passes)
        return loss

    def _window_call(
        self, engine: SAMEngine, st: StepState, model: nn.Module, inputs: dict[str, Any], nitems: Any, last: bool
    ) -> Tensor:
        """Pass 1 on this micro-batch; on the window's last call, one ε from the window gradient and the replays."""
        cfg = self.sam_config
        st.inputs.append(inputs)
        if cfg.same_dropout:
            st.rng.append(rng_state())
        # GA = 1 runs under the Trainer's nullcontext: "local" would silently become global without this.
        sync_ctx = grad_sync(model, False) if last and cfg.scope == "local" else contextlib.nullcontext()
        with sync_ctx:
            loss = super().training_step(model, inputs, nitems)
        st.clean_loss += loss
        if last:
            engine.ascend(self._rho(st.step))
            with engine.perturbed(bn_before=st.bn_at_begin):
                self._replay(st, model, st.inputs, st.rng, nitems, micro=False)
        return loss

    def _micro_call(
        self, engine: SAMEngine, st: StepState, model: nn.Module, inputs: dict[str, Any], nitems: Any
    ) -> Tensor:
        """One ε per micro-batch: pass 1 on its own gradient, then pass 2 accumulates onto the window's sum."""
        cfg = self.sam_config
        stash = engine.stash_grads()
        bn_before = engine.batchnorm_snapshot() if cfg.bn_stats == "second" else None
        rng = [rng_state()] if cfg.same_dropout else []
        with grad_sync(model, cfg.scope == "global"):  # set before the forward (davda54/sam#78)
            loss = super().training_step(model, inputs, nitems)
        st.clean_loss += loss
        engine.ascend(self._rho(st.step))
        with engine.perturbed(stash=stash, bn_before=bn_before):
            self._replay(st, model, [inputs], rng, nitems, micro=True)
        return loss

    def _replay(
        self, st: StepState, model: nn.Module, replays: list[dict[str, Any]], rng: list[Any], nitems: Any, micro: bool
    ) -> None:
        """Pass 2 on `replays` (`docs/integration.md` §3.3–3.5), inside the engine's perturbed block.

        Window mode replays the whole window, synchronising only the last replay; micro mode runs one pass 2 under
        the Trainer's own sync context, except under FSDP2, where every pass 2 syncs: unsynced FSDP2 grads stay
        unsharded, and the next micro-batch's forced pass-1 sync would reduce-scatter them together with its own
        (`docs/integration.md` §7.4).
        """
        for j, inputs in enumerate(replays):
            if self.sam_config.same_dropout:
                set_rng_state(rng[j])
            if micro:
                ctx = (
                    grad_sync(model, True)
                    if self.engine is not None and self.engine.sharded
                    else contextlib.nullcontext()
                )
            else:
                ctx = grad_sync(model, j == len(replays) - 1)
            with ctx:
                st.perturbed_loss += super().training_step(model, inputs, nitems)

    # ------------------------------------------------------------------ LLQR

    def _maybe_refresh(self, engine: SAMEngine, model: nn.Module) -> None:
        """Refresh U at global steps 0, E, 2E, … before `llqr_update_until` (`docs/algorithm.md` §5.4)."""
        llqr, step = self.llqr_config, self.state.global_step
        lr_at = self._scheduled_lr if llqr is not None and llqr.apply == "update" else None
        pre = engine.learned
        if llqr is None or pre is None or not engine.refresh_due(step, lr_at=lr_at):
            return
        from .llqr import make_update_probe

        if pre.num_updates == 0:
            logger.info(f"LLQR: fitting U on {llqr.batch_size} curvature examples before step {step} (a pause).")
        module, fsdp2 = unwrap(model), engine.sharded
        probe = None
        if llqr.apply == "update":
            probe = make_update_probe(self._inner_optimizer(), module)
            if fsdp2:  # Δ_opt(g) from the sharded optimizer state, gathered for the inner loop
                probe = sharded_update_probe(probe, dict(module.named_parameters()))
        # FSDP2: the curvature runs on a hook-free unsharded view (through FSDP2's hooks every product is zero)
        metrics = engine.refresh(
            step, self._curvature_batch(step), model=unsharded_view(module) if fsdp2 else module,
            broadcast=accelerate_broadcast, extractor=self.llqr_logits_and_targets, update_probe=probe,
            pad_token_id=_pad_token_id(module) if llqr.include_pad_rows else None, all_reduce=accelerate_all_reduce,
        )  # fmt: skip
        logger.info(
            f"LLQR refresh {pre.num_updates} at step {step}: {metrics['llqr/update_seconds']:.2f} s "
            f"(J {metrics.get('llqr/objective_start', float('nan')):.4g} -> "
            f"{metrics.get('llqr/objective_end', float('nan')):.4g})"
        )

    def llqr_logits_and_targets(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """`(logits[rows, C], targets[rows], row_mask[rows])` of the curvature batch (`docs/integration.md` §5.3).

        Override for heads the default does not know. The default handles classification heads, encoder–decoder
        LMs and causal LMs; labels are popped, so the model computes no loss of its own. Causal LMs pair the logits
        at t with the label at t + 1, as decided once, at the first call, by `llqr_shift_labels`
        ([`~hf_llqrsam.causal.resolve_shift_labels`]: `auto` looks through PEFT / compile / DDP wrappers to the
        model's config and class, and raises a `ValueError` naming the flag when it cannot tell).
        """
        from .llqr import logits_and_targets

        if self._llqr_shift is None:
            from .causal import resolve_shift_labels

            labels = batch.get("labels")
            labels = labels if isinstance(labels, Tensor) else None
            self._llqr_shift, why = resolve_shift_labels(self.args.llqr_shift_labels, model, labels)
            logger.info(f"LLQR curvature rows: {'shifted' if self._llqr_shift else 'unshifted'} labels ({why})")
        return logits_and_targets(model, batch, shift_labels=self._llqr_shift)

    def _curvature_batch(self, step: int) -> dict[str, Any]:
        """`llqr_batch_size` examples drawn as a pure function of (seed, step), through the training collator.

        Transforms run under a forked RNG, so the training stream is untouched and resume needs no extra state
        (`docs/algorithm.md` §5.5). Uses the Trainer's column filtering, as `get_train_dataloader` does. With
        `llqr_curvature_sharding="sharded"` each rank takes every W-th example; the partial sums are all-reduced.
        """
        import datasets

        llqr = cast(Any, self.llqr_config)
        dataset, collator = self.train_dataset, self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        indices = curvature_indices(self.args.seed, step, len(dataset), llqr.batch_size)  # type: ignore[arg-type]
        if llqr.curvature_sharding == "sharded" and self.args.world_size > 1:
            indices = indices[self.args.process_index :: self.args.world_size]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.args.seed + step)
            batch = collator([dataset[i] for i in indices])  # type: ignore[index]
        return self._prepare_inputs(batch)

    def _scheduled_lr(self, step: int) -> float:
        """The base optimizer's largest learning rate at optimizer step `step`, a pure function of the step.

        From the LR scheduler's multiplier (`LambdaLR`: every schedule of `get_scheduler` but
        `reduce_lr_on_plateau`): max over param groups of base_lr · λ(step). Other schedulers, or none yet, give the
        optimizer's current LR at the current step and treat earlier steps as LR > 0 (a refresh at an LR-0 grid step
        is then skipped, not deferred). Used by `llqr_apply="update"` to defer refreshes past LR 0
        ([`~hf_llqrsam.llqr.LLQRPreconditioner.is_due`]).
        """
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return max(
                float(base) * float(fn(step))
                for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
            )
        if step != self.state.global_step:
            return 1.0
        return max(float(group["lr"]) for group in self._inner_optimizer().param_groups)

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        # Accelerate wraps the torch optimizer in an AcceleratedOptimizer once the Trainer prepared it
        return cast(torch.optim.Optimizer, getattr(self.optimizer, "optimizer", self.optimizer))

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """The base optimizer; `llqr_apply="update"` needs one whose dry-run update is known in closed form."""
        optimizer = super().create_optimizer(*args, **kwargs)
        llqr = self.llqr_config
        closed_form = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
        if llqr is not None and llqr.apply == "update" and type(optimizer) not in closed_form:
            raise ValueError(
                f"Invalid llqr_apply='update' with optimizer {type(optimizer).__name__} (optim={self.args.optim!r}): "
                "it needs the closed-form dry-run update of SGD, Adam or AdamW. Use --optim sgd, adamw_torch or adam, "
                "or llqr_apply='gradient'."
            )
        return optimizer

    # ------------------------------------------------------------------ other Trainer overrides

    def floating_point_ops(self, *args: Any, **kwargs: Any) -> int:
        """Every pass is counted: two on SAM steps, one on LookSAM's reuse steps, one (plus the stored batches of the
        overlap window) on past-FSAM's (the Trainer calls this once per `training_step`)."""
        flops = super().floating_point_ops(*args, **kwargs)
        engine = self.engine
        return engine.last_call_passes * flops if self.llqrsam_enabled and engine is not None else flops

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Merge the `sam/*` and `llqr/*` metrics into training logs: counters summed, the rest averaged."""
        if self.engine is not None and self.engine.metrics and "loss" in logs:
            logs.update(self.engine.metrics.drain())
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ checkpoints

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        self._save_llqrsam_state(output_dir)

    def _save_llqrsam_state(self, output_dir: str) -> None:
        """`llqrsam_state.pt` (rank 0) next to the optimizer state; under FSDP2 also every rank's shards of U and of
        the SAM buffers, with DCP in `llqrsam_dcp/` (`hf_llqrsam/sharded_state.py`; the Trainer saves on all ranks).

        With LLQR, also `llqr_u_summary.json` (written by the saving rank, read by nothing): per tensor of U its
        structure, entries, min, max, mean, RMS displacement from I, fraction at `llqr_min_diag` and the step of
        the last refresh ([`~hf_llqrsam.llqr.LLQRPreconditioner.u_summary`]).
        """
        if not self.llqrsam_enabled or self.engine is None:
            return
        from .sharded_state import save_sharded, split_dtensors

        state, shards = split_dtensors(self.engine.state_dict())
        if shards:
            save_sharded(output_dir, shards)  # a collective
        summary = self.preconditioner.u_summary() if self.preconditioner is not None else None  # FSDP2: a collective
        if self.args.should_save:
            save_state(output_dir, state, sharded=bool(shards))
            if summary is not None:
                with open(os.path.join(output_dir, U_SUMMARY_FILE), "w") as f:
                    json.dump(summary, f, indent=1, allow_nan=True)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        self._load_llqrsam_checkpoint(checkpoint)

    def _load_llqrsam_checkpoint(self, checkpoint: str | None) -> None:
        """Read `llqrsam_state.pt` of a checkpoint; it is materialised on the first `training_step`, after prepare."""
        if checkpoint is None:
            return
        if not self.llqrsam_enabled:
            if os.path.isfile(os.path.join(checkpoint, STATE_FILE)):
                logger.warning(
                    f"{os.path.join(checkpoint, STATE_FILE)} holds SAM/LLQR state, but this run has sam_mode='none' "
                    "and llqr=False: it is not used."
                )
            return
        state = load_state(checkpoint)
        if state is None:
            if self.llqr_config is not None or (self.mode_spec is not None and self.mode_spec.state):
                logger.warning(f"No {STATE_FILE} in {checkpoint}: starting with U = I and empty SAM state.")
            return
        # materialised on the first training_step, after prepare (FSDP2 swaps the parameters there)
        self._pending_state = (os.path.join(checkpoint, STATE_FILE), state)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, *args: Any, **kwargs: Any) -> None:
        """Work around huggingface/transformers#43701 (5.x): resume silently drops renamed weights (e.g. ViT).

        `load_state_dict(strict=False)` skips checkpoint keys that 5.x `save_pretrained` wrote under their legacy
        names; `from_pretrained` applies the renames. The workaround runs only where the bug bites: transformers 5.x,
        a plain `PreTrainedModel` (no FSDP/DeepSpeed), and a checkpoint whose tensor names differ from the model's.
        The canary test `test_vit_resume_canary_43701` fails once upstream fixes it.
        """
        model = args[0] if args else kwargs.get("model")
        target = self.model if model is None else model
        weights = os.path.join(resume_from_checkpoint, "model.safetensors")
        if (
            _TRANSFORMERS_MAJOR >= 5
            and isinstance(target, PreTrainedModel)
            and os.path.isfile(weights)
            and not (self.is_fsdp_enabled or self.is_deepspeed_enabled or is_fsdp2(target))
            and _renamed_keys(weights, target)
        ):
            dtype = next(target.parameters()).dtype
            loaded = type(target).from_pretrained(resume_from_checkpoint, config=target.config, dtype=dtype)
            target.load_state_dict(loaded.state_dict(), strict=True)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, *args, **kwargs)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The base class's card, tagged `hf-llqrsam`, the SAM mode and `llqr` (`docs/integration.md` §9), plus a
        section naming the method and its hyperparameters ([`~hf_llqrsam.card.method_card_section`]).

        The arguments are passed through to whatever `create_model_card` the base class has (the stock Trainer's,
        or TRL's `(model_name, dataset_name, tags)`); only `tags` is extended.
        """
        bound = inspect.signature(super().create_model_card).bind_partial(*args, **kwargs)
        tags = bound.arguments.get("tags")
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        ours = ["hf-llqrsam"] + ([self.sam_config.mode] if self.sam_config.mode != "none" else [])
        ours += ["llqr"] if self.llqr_config is not None else []
        bound.arguments["tags"] = tags + [t for t in ours if t not in tags]
        super().create_model_card(*bound.args, **bound.kwargs)
        if self.is_world_process_zero():
            with open(os.path.join(str(self.args.output_dir), "README.md"), "a", encoding="utf-8") as f:
                f.write(method_card_section(self.args))


@contextlib.contextmanager
def _flag_names() -> Iterator[None]:
    """Errors of the math and the engine name config fields (`LLQRConfig.inner_lr`); the Trainer's user sets flags
    (`llqr_inner_lr`), so a `ValueError` that names a field is raised again naming the flag."""
    try:
        yield
    except ValueError as err:
        text = re.sub(r"\bLLQRConfig\.(\w+)", r"llqr_\1", str(err))
        if text == str(err):
            raise
        raise type(err)(text) from err


_TRANSFORMERS_MAJOR = int(__import__("transformers").__version__.split(".")[0])


def _renamed_keys(weights: str, model: nn.Module) -> bool:
    """Whether a checkpoint's tensor names differ from the model's own (the #43701 symptom)."""
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as f:
        saved = set(f.keys())
    return bool(saved - set(model.state_dict()))


def _pad_token_id(model: nn.Module) -> int | None:
    """The target of pad rows with `llqr_include_pad_rows` (the reference's "predict pad"), from the model config."""
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    return pad if isinstance(pad, int) else None


class LLQRSAMTrainer(LLQRSAMTrainerMixin, Trainer):
    """[`~transformers.Trainer`] with SAM-family and LLQR steps; see [`LLQRSAMTrainerMixin`]."""


class LLQRSAMSeq2SeqTrainer(LLQRSAMTrainerMixin, Seq2SeqTrainer):
    """[`~transformers.Seq2SeqTrainer`] with SAM-family and LLQR steps; see [`LLQRSAMTrainerMixin`]."""

    args_class = LLQRSAMSeq2SeqTrainingArguments
