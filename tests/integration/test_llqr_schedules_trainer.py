"""The LLQR schedules, milestones, solvers and constrained structures inside the Trainer: the refresh grid, the logged
η and β against the schedule formulas, and resume bit for bit (issue 10, LLQR side)."""

import math

import pytest
import torch

from hf_llqrsam import LLQRSAMTrainer
from hf_llqrsam.checkpoint import STATE_FILE
from tests.utils import image_dataset, make_args, params_of, tiny_vit

FAST = dict(llqr=True, llqr_batch_size=8, llqr_inner_steps=3)


def test_milestones_and_schedules_in_the_trainer(tmp_path):
    """E = 3, then 2 from step 4: refreshes before steps 0, 3, 4, 6, 8; each refresh logs the η and β of its step
    (η cosine 0.05 → 0.01 over 8 steps, β warmup 0.2 → 0.9 over 6 steps, computed here by hand)."""
    trainer = LLQRSAMTrainer(
        model=tiny_vit(),
        args=make_args(
            tmp_path,
            max_steps=9,
            llqr_update_interval=3,
            llqr_update_interval_milestones="4:2",
            llqr_inner_solver="adam",
            llqr_inner_lr=0.05,
            llqr_inner_lr_schedule="cosine",
            llqr_inner_lr_schedule_value=0.01,
            llqr_inner_lr_schedule_steps=8,
            llqr_ema_decay=0.9,
            llqr_ema_schedule="warmup",
            llqr_ema_schedule_value=0.2,
            llqr_ema_schedule_steps=6,
            **FAST,
        ),
        train_dataset=image_dataset(40),
    )
    trainer.train()
    refreshes = [0, 3, 4, 6, 8]
    assert trainer.preconditioner.num_updates == len(refreshes) and trainer.preconditioner.last_update_step == 8
    logs = [h for h in trainer.state.log_history if "llqr/ema_decay" in h]
    assert [h["step"] for h in logs] == [k + 1 for k in refreshes]  # logged with the step that follows the refresh
    for k, h in zip(refreshes, logs, strict=True):
        lr = 0.01 + 0.04 * 0.5 * (1 + math.cos(math.pi * min(k, 8) / 8))
        beta = 0.2 + 0.7 * min(k / 6, 1)
        assert math.isclose(h["llqr/inner_lr"], lr, rel_tol=1e-12) and math.isclose(
            h["llqr/ema_decay"], beta, rel_tol=1e-12
        )


@pytest.mark.parametrize(("structure", "solver"), [("psd_ekfac", "cg"), ("diag_kfac", "adam")])
def test_resume_with_schedules_and_milestones_is_bit_exact(tmp_path, structure, solver):
    """Saved after step 3 and resumed: the refreshes at 4 and 5 (E = 1 from step 4) use the same η, β and U."""
    ds = image_dataset(20)
    kw = dict(
        optim="adamw_torch",
        learning_rate=1e-2,
        max_steps=6,
        save_steps=3,
        save_strategy="steps",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        seed=7,
        sam_mode="sam",
        llqr_structure=structure,
        llqr_inner_solver=solver,
        llqr_update_interval=2,
        llqr_update_interval_milestones="4:1",
        llqr_ema_decay=0.5,
        llqr_ema_schedule="cosine",
        llqr_ema_schedule_value=0.9,
        llqr_ema_schedule_steps=6,
        **FAST,
    )
    if solver != "cg":
        kw.update(llqr_inner_lr=0.05, llqr_inner_lr_schedule="warmup", llqr_inner_lr_schedule_steps=5)
    full = LLQRSAMTrainer(model=tiny_vit(dropout=0.1), args=make_args(tmp_path / "full", **kw), train_dataset=ds)
    full.train()
    state = torch.load(tmp_path / "full" / "checkpoint-3" / STATE_FILE, weights_only=True)
    assert state["llqr"]["num_updates"] == 2 and state["llqr"]["last_update_step"] == 2  # steps 0 and 2
    resumed = LLQRSAMTrainer(
        model=tiny_vit(seed=9, dropout=0.1), args=make_args(tmp_path / "res", **kw), train_dataset=ds
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed.preconditioner.num_updates == full.preconditioner.num_updates == 4  # 0, 2, 4, 5
    assert all(torch.equal(a, b) for a, b in zip(params_of(full.model), params_of(resumed.model), strict=True))
    u_full, u_res = full.preconditioner.state_dict()["blocks"], resumed.preconditioner.state_dict()["blocks"]
    assert all(torch.equal(u_full[n][k], u_res[n][k]) for n in u_full for k in u_full[n])
    eye = full.preconditioner.structure.identity().state_dict()
    assert any(not torch.equal(u_full[n][k], eye[n][k]) for n in u_full for k in u_full[n])  # U really moved
