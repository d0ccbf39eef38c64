"""U diagnostics and `llqr_apply="update"` inside the Trainer (issue 12, items 2 and 4): the logged keys, the
per-tensor `llqr_u_summary.json` next to checkpoints, U moving in update mode, and the deferral past LR 0."""

import json

import pytest
import torch

from hf_llqrsam import LLQRSAMTrainer
from hf_llqrsam.llqr.diagnostics import u_diagnostics
from hf_llqrsam.trainer_support import U_SUMMARY_FILE
from tests.utils import image_dataset, make_args, params_of, tiny_vit

LLQR_FAST = dict(llqr=True, llqr_batch_size=8, llqr_inner_steps=5, llqr_inner_lr=1e-3)


def test_summary_file_next_to_checkpoints_equals_u(tmp_path):
    trainer = LLQRSAMTrainer(model=tiny_vit(), args=make_args(tmp_path, max_steps=3, sam_mode="sam",
                             save_strategy="steps", save_steps=3, llqr_update_interval=2, **LLQR_FAST),
                             train_dataset=image_dataset(16))  # fmt: skip
    trainer.train()
    logged = [h for h in trainer.state.log_history if "llqr/updates" in h]
    keys = ("llqr/u_rms_displacement", "llqr/u_at_floor", "llqr/objective_ratio")
    assert logged and all(k in logged[0] for k in keys)
    with open(tmp_path / "checkpoint-3" / U_SUMMARY_FILE) as f:
        summary = json.load(f)
    pre = trainer.preconditioner
    assert summary["structure"] == "diagonal" and summary["last_update_step"] == 2 and summary["num_updates"] == 2
    assert set(summary["modules"]) == set(pre.names)
    for layout, blk in zip(pre.structure.layouts, pre.structure.blocks, strict=True):
        d, row = blk["d"].double(), summary["modules"][layout.name]
        assert row["entries"] == d.numel() and row["last_update_step"] == 2
        assert row["min"] == float(d.min()) and row["max"] == float(d.max())
        assert row["mean"] == pytest.approx(float(d.mean()), rel=1e-12)
        assert row["rms_displacement"] == pytest.approx(float(((d - 1) ** 2).mean().sqrt()), rel=1e-12, abs=1e-15)
        assert row["at_floor"] == 0.0


def _displacement(tmp_path, apply: str, scale: str = "gradient_norm") -> float:
    """U's RMS displacement after the step-0 refresh of the same AdamW run (lr 1e-3, constant)."""
    trainer = LLQRSAMTrainer(model=tiny_vit(), args=make_args(tmp_path / f"{apply}-{scale}", max_steps=1,
                             optim="adamw_torch", learning_rate=1e-3, llqr_apply=apply, llqr_update_probe_scale=scale,
                             **LLQR_FAST), train_dataset=image_dataset(16))  # fmt: skip
    trainer.train()
    assert trainer.preconditioner.num_updates == 1
    return u_diagnostics(trainer.preconditioner.structure, 1e-8)["llqr/u_rms_displacement"]


def test_update_mode_moves_u_like_gradient_mode(tmp_path):
    """The raw AdamW update has the size of the LR, so U barely moves (`none`); rescaled to ‖g‖ it moves by the
    gradient mode's order (measured: gradient 1.15e-4, update 2.9e-5, none 7e-9 on this problem)."""
    gradient = _displacement(tmp_path, "gradient")
    update = _displacement(tmp_path, "update")
    raw = _displacement(tmp_path, "update", "none")
    assert gradient / 5 < update < gradient * 5
    assert raw < 1e-3 * gradient


def test_update_mode_first_refresh_waits_for_lr_above_zero(tmp_path):
    """Linear warm-up from LR 0: the step-0 probe would be zero, so the first refresh runs at step 1; the grid
    keeps its cadence (E = 2: steps 1, 2, 4). Gradient mode keeps step 0."""
    common = dict(max_steps=5, optim="adamw_torch", learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=2,
                  llqr_update_interval=2, **LLQR_FAST)  # fmt: skip
    steps = {}
    for apply in ("update", "gradient"):
        trainer = LLQRSAMTrainer(model=tiny_vit(), args=make_args(tmp_path / apply, llqr_apply=apply, **common),
                                 train_dataset=image_dataset(24))  # fmt: skip
        seen: list[int] = []
        real = LLQRSAMTrainer._maybe_refresh

        def spy(self, engine, model, _seen=seen, _real=real):
            before = engine.learned.num_updates
            _real(self, engine, model)
            if engine.learned.num_updates != before:
                _seen.append(self.state.global_step)

        trainer._maybe_refresh = spy.__get__(trainer)
        trainer.train()
        steps[apply] = seen
    assert steps["update"] == [1, 2, 4]
    assert steps["gradient"] == [0, 2, 4]


def test_update_mode_with_deferred_refresh_resumes_bit_exact(tmp_path):
    """The deferral is decided from the step and the LR schedule: a run resumed at step 3 refreshes where the
    uninterrupted one does (1, 2, 4) and ends bit-identical, U included."""
    ds = image_dataset(20)
    kw = dict(
        optim="adamw_torch",
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        warmup_steps=2,
        max_steps=5,
        save_steps=3,
        save_strategy="steps",
        seed=7,
        llqr_apply="update",
        llqr_update_interval=2,
        **LLQR_FAST,
    )
    full = LLQRSAMTrainer(model=tiny_vit(), args=make_args(tmp_path / "full", **kw), train_dataset=ds)
    full.train()
    assert full.preconditioner.num_updates == 3 and full.preconditioner.last_update_step == 4
    resumed = LLQRSAMTrainer(model=tiny_vit(seed=9), args=make_args(tmp_path / "res", **kw), train_dataset=ds)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed.preconditioner.num_updates == 3 and resumed.preconditioner.last_update_step == 4
    assert all(torch.equal(a, b) for a, b in zip(params_of(full.model), params_of(resumed.model), strict=True))
    u_full, u_res = full.preconditioner.state_dict()["blocks"], resumed.preconditioner.state_dict()["blocks"]
    assert all(torch.equal(u_full[n][k], u_res[n][k]) for n in u_full for k in u_full[n])
