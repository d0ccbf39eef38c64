"""[`LLQRSAMTrainer`]: SAM-family and LLQR steps inside `training_step`, glue only (`docs/integration.md` §3).

The Trainer keeps its loop, clipping, optimizer step, scheduler, logging and saving. This module decides *when*
(window position, gradient sync) and moves tensors; the step itself is [`~hf_llqrsam.engine.SAMEngine`]'s, and every
formula lives in `sam.py` and `llqr/`.
"""

import contextlib
import inspect
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn
from transformers import Seq2SeqTrainer, Trainer
from transformers.utils import logging

from .args import (
    LLQRSAMFields,
    LLQRSAMSeq2SeqTrainingArguments,
    LLQRSAMTrainingArguments,
    validate_llqrsam_args,
)
from .card import complete_model_card
from .checkpoint import last_complete_checkpoint
from .compat import llqrsam_active, validate_fsdp_plugin, validate_launch, validate_setup_model
from .distributed import (
    accelerate_all_reduce,
    accelerate_broadcast,
    any_rank,
    grad_sync,
    sharded_update_probe,
    unsharded_view,
    unwrap,
)
from .engine import SAMEngine, refresh_progress
from .modes import MODES
from .sam import Preconditioner, SAMState
from .schedules import rho_at
from .step import StepState, rng_state, set_rng_state
from .trainer_support import (
    curvature_batch,
    flag_names,
    load_renamed_weights,
    pad_token_id,
    read_llqrsam_checkpoint,
    save_llqrsam_files,
    scheduled_lr,
)

logger = logging.get_logger(__name__)


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

    Every override passes its arguments through to whatever base class the mixin is combined with.

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

    def _where_u_enters(self) -> None:  # C = U, P = U; attributes a subclass may change before train()
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
            with flag_names():
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
        pending, self._pending_state = self._pending_state, None
        with flag_names():
            if pending is not None:
                engine.load_state_dict(pending[1], source=pending[0])
            self._maybe_refresh(engine, model)
        return engine.begin(self.state.global_step)

    def _rho(self, step: int) -> float:  # the live LR for lr_proportional (the peak before an optimizer exists)
        cfg, peak = self.sam_config, self.args.learning_rate
        lr = float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else peak
        return rho_at(cfg.rho_schedule, step, cfg.rho, cfg.rho_min, lr=lr, lr_max=peak)

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

    def _maybe_refresh(self, engine: SAMEngine, model: nn.Module) -> None:
        """Refresh U at global steps 0, E, 2E, … before `llqr_update_until` (`docs/algorithm.md` §5.4)."""
        llqr, step = self.llqr_config, self.state.global_step
        lr_at = (lambda s: scheduled_lr(self, s)) if llqr is not None and llqr.apply == "update" else None
        pre = engine.learned
        if llqr is None or pre is None or not engine.refresh_due(step, lr_at=lr_at):
            return
        if self.train_dataset is None:  # a bare training_step, outside train(): no curvature batch to draw
            logger.warning_once("LLQR: no train_dataset to draw the curvature batch from; U is not refreshed.")
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
            step, curvature_batch(self, step), model=unsharded_view(module) if fsdp2 else module,
            broadcast=accelerate_broadcast, extractor=self.llqr_logits_and_targets, update_probe=probe,
            pad_token_id=pad_token_id(module) if llqr.include_pad_rows else None, all_reduce=accelerate_all_reduce,
            progress=refresh_progress(logger, step),
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

    def _load_from_checkpoint(self, resume_from_checkpoint: str, *args: Any, **kwargs: Any) -> None:
        """The stock load, with the transformers#43701 workaround (`trainer_support.load_renamed_weights`)."""
        model = args[0] if args else kwargs.get("model")
        if not load_renamed_weights(self, resume_from_checkpoint, self.model if model is None else model):
            super()._load_from_checkpoint(resume_from_checkpoint, *args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        save_llqrsam_files(self, output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        self._pending_state = read_llqrsam_checkpoint(self, checkpoint)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The base class's card, tagged `hf-llqrsam`, the SAM mode and `llqr` (`docs/integration.md` §9), completed
        by [`~hf_llqrsam.card.complete_model_card`]: the real base model (or "trained from scratch"), the saved eval
        and test metrics, the optimizer's real arguments and a section naming the method and its hyperparameters.

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
        if self.is_world_process_zero():  # the real base model, the test metrics, the method section
            complete_model_card(str(self.args.output_dir), self.args)


class LLQRSAMTrainer(LLQRSAMTrainerMixin, Trainer):
    """[`~transformers.Trainer`] with SAM-family and LLQR steps; see [`LLQRSAMTrainerMixin`]."""


class LLQRSAMSeq2SeqTrainer(LLQRSAMTrainerMixin, Seq2SeqTrainer):
    """[`~transformers.Seq2SeqTrainer`] with SAM-family and LLQR steps; see [`LLQRSAMTrainerMixin`]."""

    args_class = LLQRSAMSeq2SeqTrainingArguments
