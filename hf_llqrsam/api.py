"""[`SAM`]: the SAM family and LLQR+SAM for your own training loop (plain PyTorch, `accelerate`, Lightning).

The same [`~hf_llqrsam.engine.SAMEngine`] the Trainer drives: one ε per optimizer step from the gradient in `p.grad`
(the whole accumulation window's), θ restored by copy, the mode's descent, the skip rule for non-finite steps, the
BatchNorm policy, fp16 loss scales, and U learned on its cadence.

```python
sam = hf_llqrsam.SAM(model, optimizer, mode="sam", rho=0.05)  # + llqr=LLQRConfig(...), curvature_batch=fn
loss = compute_loss(model, batch)
loss.backward()
with sam.perturbed():  # θ ← θ + ε from p.grad; on exit θ restored, the descent gradient in p.grad
    compute_loss(model, batch).backward()
optimizer.step()
optimizer.zero_grad()
```

Modes whose steps do not all take two passes (LookSAM, past-FSAM, `start_step` / `interval` schedules, LLQR alone)
use [`SAM.step`] with a closure instead, which runs exactly the passes the step needs.
"""

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import FORMAT_VERSION, LLQRSAMStateError
from .config import SAMConfig
from .distributed import accelerate_broadcast, any_rank, grad_sync, unwrap
from .engine import SAMEngine, refresh_progress, step_kind
from .llqr import LLQRConfig
from .modes import SAM_MODE_NAMES
from .sam import Preconditioner
from .schedules import rho_at
from .step import rng_state, set_rng_state

__all__ = ["SAM"]

logger = logging.getLogger(__name__)


class SAM:
    """A SAM-family optimizer step around your own `optimizer`, for a loop you write.

    Args:
        model (`nn.Module`): the model (a DDP or `torch.compile` wrapper is looked through; an FSDP2 model as it is).
            Its parameters with `requires_grad` are perturbed.
        optimizer (`torch.optim.Optimizer`): the base optimizer, stepped by you (or by [`step`]) on the descent
            gradient the block leaves in `p.grad`.
        mode (`str`, *optional*, defaults to `"sam"`): one of `hf_llqrsam.modes.SAM_MODE_NAMES`. `none` takes plain
            steps through [`step`] (the same loop as a baseline; with `llqr` or a fixed U, U on the descent).
        rho (`float`, *optional*, defaults to `0.05`): the radius ρ.
        llqr (`LLQRConfig`, *optional*): learn U with LLQR (LLQR+SAM with `mode="sam"`); needs `curvature_batch`.
        curvature_batch (`Callable[[int], Mapping]`, *optional*): `step -> batch` of model inputs plus `labels`, called
            when U is refreshed (before step 0, E, 2E, …). Draw it as a function of the step for a bit-exact resume.
        scaler (`torch.amp.GradScaler`, *optional*): the fp16 loss scaler your backward uses (Accelerate's
            `accelerator.scaler` too); a skipped step is then marked for the scaler, which skips it and backs off.
        preconditioner (`Preconditioner`, *optional*): a fixed U for C and P (without `llqr`).
        config (`SAMConfig`, *optional*): every SAM setting at once, instead of `mode`, `rho` and `options`.
        extractor (`Callable`, *optional*): `(model, batch) -> (logits, targets, row_mask)` for the curvature, for
            heads the default ([`~hf_llqrsam.llqr.logits_and_targets`]) does not know.
        u_in_perturbation / u_on_update (`bool`, *optional*): whether U enters the perturbation C and the descent P;
            by default from `llqr` (`in_perturbation`; `on_update` with `apply="gradient"`), and both for a fixed U.
        options: other [`~hf_llqrsam.config.SAMConfig`] fields (`fsam_beta=0.9`, `norm="matrix"`, `bn_stats`, …).

    BatchNorm: the statistics before a step's pass 1 are taken at the end of the step before it (at construction for
    the first), so run no training-mode forward between steps outside the step's passes.

    Gradient accumulation: run pass 1's backward on every micro-batch of the window, then pass 2's on every
    micro-batch inside one [`perturbed`] block (one ε per window). Under DDP the gradients are synchronised as usual
    (set `require_backward_grad_sync` before the forward with [`sync`], not `no_sync()` around the backward alone).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        mode: str = "sam",
        rho: float = 0.05,
        *,
        llqr: LLQRConfig | None = None,
        curvature_batch: Callable[[int], Mapping[str, Any]] | None = None,
        scaler: Any = None,
        preconditioner: Preconditioner | None = None,
        config: SAMConfig | None = None,
        extractor: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None,
        u_in_perturbation: bool | None = None,
        u_on_update: bool | None = None,
        **options: Any,
    ) -> None:
        if config is None:
            allowed = {f.name for f in dataclasses.fields(SAMConfig)} - {"mode", "rho"}
            unknown = sorted(set(options) - allowed)
            if unknown:
                raise TypeError(f"Invalid SAM option(s) {unknown}. Allowed: {', '.join(sorted(allowed))}.")
            config = SAMConfig(mode=mode, rho=rho, **options)  # type: ignore[arg-type]
        elif options:
            raise TypeError(f"Pass either config= or SAM options, not both (got {sorted(options)}).")
        _validate(config, llqr, curvature_batch)
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.curvature_batch = curvature_batch
        self.extractor = extractor
        self.engine = SAMEngine(
            unwrap(model),
            config if config.mode != "none" else None,
            llqr=llqr,
            preconditioner=preconditioner,
            device=next(model.parameters()).device,
            agree=lambda flag: any_rank(flag, next(model.parameters()).device),
            u_in_perturbation=u_in_perturbation,
            u_on_update=u_on_update,
        )
        self.engine.scaler = scaler
        self.engine.attach(getattr(optimizer, "optimizer", optimizer))  # Accelerate's wrapper: the torch optimizer
        self.step_count = 0
        self._skipped = 0
        # BatchNorm statistics before the next step's pass 1: `perturbed()` is entered after it
        self._bn_before = self.engine.batchnorm_snapshot()
        self._lr_max = max(float(g["lr"]) for g in optimizer.param_groups)

    # ------------------------------------------------------------------ the loop

    @property
    def kind(self) -> str:
        """What the next optimizer step runs: `plain`, `two`, `one` or `reuse` ([`~hf_llqrsam.engine.step_kind`])."""
        return step_kind(self.engine.config, self.step_count)

    @property
    def two_pass(self) -> bool:
        """Whether every step of this run takes two passes, so [`perturbed`] can drive it (else use [`step`])."""
        return self._not_two_pass() is None

    @contextmanager
    def perturbed(self) -> Iterator[None]:
        """One two-pass step, after pass 1's backward: θ ← θ + ε (from `p.grad`) inside the block, θ restored by copy
        on exit, and the descent gradient (P·g̃, the mode's correction) left in `p.grad` for `optimizer.step()`.

        A non-finite step is skipped: `p.grad` is cleared (or marked for the scaler), the weights, BatchNorm
        statistics, mode state and U stay as they were, and `sam.skipped` counts it.
        """
        problem = self._not_two_pass()
        if problem is not None:  # refused at the first call, not at the first step of another shape
            raise RuntimeError(
                f"SAM.perturbed() runs two-pass steps only, and {problem}. Use sam.step(closure), which runs exactly "
                "the passes each step needs."
            )
        engine = self._begin()
        engine.ascend(self._rho())
        with engine.perturbed(bn_before=engine._current().bn_at_begin):
            yield
        self._finish(record_losses=False)

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """One whole optimizer step: the passes the step needs, the descent, and `optimizer.step()`.

        Args:
            closure (`Callable[[], Tensor]`): computes the loss and calls `backward()` on it (no `zero_grad`), e.g.
                `lambda: (loss := model(**batch).loss).backward() or loss`; with gradient accumulation, one closure
                call runs the whole window. Returns the loss.

        Returns:
            The loss of the first pass (of the one pass at θ + ε for past-FSAM).
        """
        self.optimizer.zero_grad(set_to_none=True)
        engine = self._begin()
        st = engine._current()
        if st.kind == "one":
            engine.ascend(self._rho())
            with engine.perturbed(zero_grads=False):
                loss = st.perturbed_loss = closure()
        else:
            rng = rng_state() if self.config.same_dropout else None
            loss = st.clean_loss = closure()
            if st.kind == "two":
                engine.ascend(self._rho())
                with engine.perturbed(bn_before=st.bn_at_begin):
                    if rng is not None:
                        set_rng_state(rng)
                    st.perturbed_loss = closure()
        st.clean_loss, st.perturbed_loss = _item(st.clean_loss), _item(st.perturbed_loss)
        self._finish(record_losses=True)
        scaler = self.engine.scaler
        if scaler is not None and scaler.is_enabled():
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach() if isinstance(loss, Tensor) else loss

    @contextmanager
    def sync(self, enabled: bool) -> Iterator[None]:
        """Force (`True`) or disable gradient reduction for the forward+backward inside the block (DDP, FSDP2).

        DDP decides at forward time, so `no_sync()` around the backward alone does nothing (davda54/sam#78).
        """
        with grad_sync(self.model, enabled):
            yield

    # ------------------------------------------------------------------ what happened

    @property
    def skipped(self) -> int:
        """Steps skipped so far (a non-finite ε, g̃, descent term or state)."""
        return self._skipped

    def metrics(self) -> dict[str, float]:
        """`sam/*` and `llqr/*` values since the last call (counters summed, the rest averaged), and a reset."""
        return self.engine.metrics.drain()

    @property
    def preconditioner(self) -> Preconditioner | None:
        """U (the learned LLQR preconditioner, or the fixed one), or `None`."""
        return self.engine.preconditioner

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The SAM state, U and the step count: tensors and primitives only (loads with `weights_only=True`)."""
        return {**self.engine.state_dict(), "format_version": FORMAT_VERSION, "step": self.step_count}

    def load_state_dict(self, state: Mapping[str, Any], source: str = "SAM.load_state_dict") -> None:
        """Restore [`state_dict`], validated as the Trainer validates its `llqrsam_state.pt`.

        Raises:
            [`~hf_llqrsam.checkpoint.LLQRSAMStateError`]: naming `source` and what does not match this run.
        """
        from .checkpoint import _validated

        checked = _validated(dict(state), source)
        step = state.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise LLQRSAMStateError(f"Invalid {source}: 'step' must be a non-negative int, got {step!r}.")
        self.engine.load_state_dict(checked, source=source)
        self.step_count = step

    # ------------------------------------------------------------------ internals

    def _not_two_pass(self) -> str | None:
        """Why not every step of this schedule is a two-pass step (`perturbed()` needs that), or `None`."""
        cfg, spec = self.config, self.engine.spec
        if spec is None:
            return "mode='none' takes plain steps"
        if spec.passes != "two":
            return f"mode={cfg.mode!r} has steps of other shapes (its passes: {spec.passes!r})"
        if cfg.start_step > 0 or cfg.interval > 1 or cfg.end_step is not None:
            return "start_step / interval / end_step make some steps plain ones"
        if cfg.same_dropout:
            return "same_dropout needs the RNG state before pass 1"
        return None

    def _begin(self) -> SAMEngine:
        engine = self.engine
        if engine.current is not None:  # a block that raised: drop that step
            engine.abort()
        if engine.refresh_due(self.step_count):
            if self.curvature_batch is None:
                raise ValueError("SAM(llqr=...) needs curvature_batch=step -> batch to refresh U.")
            kwargs: dict[str, Any] = {} if self.extractor is None else {"extractor": self.extractor}
            if engine.llqr is not None and engine.llqr.apply == "update":
                from .llqr import make_update_probe

                kwargs["update_probe"] = make_update_probe(
                    getattr(self.optimizer, "optimizer", self.optimizer), engine.module
                )
            if engine.learned is not None and engine.learned.num_updates == 0:
                logger.info(f"LLQR: fitting U before step {self.step_count} (a pause of seconds to minutes).")
            metrics = engine.refresh(
                self.step_count,
                self.curvature_batch(self.step_count),
                broadcast=accelerate_broadcast,
                progress=refresh_progress(logger, self.step_count),
                **kwargs,
            )
            logger.info(
                f"LLQR refresh {metrics.get('llqr/updates', 0):.0f} at step {self.step_count}: "
                f"{metrics['llqr/update_seconds']:.2f} s (J {metrics.get('llqr/objective_start', float('nan')):.4g} "
                f"-> {metrics.get('llqr/objective_end', float('nan')):.4g})"
            )
        engine.begin(self.step_count, bn_at_begin=self._bn_before)
        return engine

    def _rho(self) -> float:
        cfg = self.config
        lr = float(self.optimizer.param_groups[0]["lr"])
        return rho_at(cfg.rho_schedule, self.step_count, cfg.rho, cfg.rho_min, lr=lr, lr_max=self._lr_max)

    def _finish(self, record_losses: bool) -> None:
        engine = self.engine
        if not engine.descend():
            self._skipped += 1
        engine.end(record_losses=record_losses)
        self.step_count += 1
        self._bn_before = engine.batchnorm_snapshot()


def _item(x: Any) -> float:
    return float(x.detach()) if isinstance(x, Tensor) else float(x)


def _validate(config: SAMConfig, llqr: LLQRConfig | None, curvature_batch: Any) -> None:
    """The Trainer's checks of the SAM settings (`hf_llqrsam.args.validate_llqrsam_fields`), on the config's fields,
    plus what the plain API does not support. Raises a `ValueError` naming the field."""
    if config.mode not in SAM_MODE_NAMES:
        raise ValueError(f"Invalid mode={config.mode!r}. Must be one of {', '.join(SAM_MODE_NAMES)}.")
    if config.accumulation != "window":
        raise ValueError(
            f"Invalid accumulation={config.accumulation!r} for SAM(...): the plain API builds one ε per optimizer "
            "step from the window gradient in p.grad; use accumulation='window'."
        )
    if llqr is not None and curvature_batch is None:
        raise ValueError("Invalid llqr=... without curvature_batch: U is refreshed on curvature_batch(step).")
    from .args import LLQRSAMFields, validate_llqrsam_fields

    flat = {f.name: f.default for f in dataclasses.fields(LLQRSAMFields) if f.default is not dataclasses.MISSING}
    for f in dataclasses.fields(SAMConfig):
        key = f"sam_{f.name}" if f"sam_{f.name}" in flat else f.name
        if key in flat:
            flat[key] = getattr(config, f.name)
    flat["llqr"] = False
    try:
        validate_llqrsam_fields(SimpleNamespace(**flat))
    except ValueError as err:  # name the config field, not the CLI flag
        text = str(err)
        for f in dataclasses.fields(SAMConfig):
            text = text.replace(f"sam_{f.name}", f.name)
        raise ValueError(text) from err
