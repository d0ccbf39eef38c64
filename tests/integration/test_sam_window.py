"""SAM phase windows (issue 19 item 2): every SAM-family mode runs only inside [sam_start_step, sam_end_step).

The step kinds at both edges of the window, for a two-pass, a cadence (LookSAM) and a one-pass (past-FSAM) mode;
the argument check naming the flag; the number of ascents a windowed run takes; and a resume from a checkpoint
saved at the window's start, inside it, at its end and after it, each bit-exact with the uninterrupted run.
"""

import pytest
import torch

from hf_llqrsam import LLQRSAMTrainer
from hf_llqrsam.config import SAMConfig
from hf_llqrsam.engine import step_kind
from tests.utils import image_dataset, make_args, params_of, tiny_vit


@pytest.mark.parametrize(
    ("mode", "inside"),
    [
        ("sam", "two"),
        ("fsam", "two"),
        ("past_fsam", "one"),
        ("looksam", "two"),
        ("flat_lora", "one"),
        ("bi_lora", "one"),
    ],
)
def test_step_kind_at_the_window_edges(mode, inside):
    cfg = SAMConfig(mode=mode, start_step=3, end_step=9, looksam_interval=2)
    assert step_kind(cfg, 2) == "plain"  # start − 1
    assert step_kind(cfg, 3) == inside  # start
    assert step_kind(cfg, 8) != "plain"  # end − 1 (LookSAM: its reuse step between full steps)
    assert step_kind(cfg, 9) == "plain"  # end
    assert step_kind(cfg, 100) == "plain"
    assert [step_kind(cfg, s) for s in range(3, 9)] == [
        step_kind(SAMConfig(mode=mode, start_step=3, looksam_interval=2), s) for s in range(3, 9)
    ]  # inside the window, the schedule is the one without an end


def test_step_kind_end_minus_one_is_sam_and_end_is_plain():
    cfg = SAMConfig(mode="sam", start_step=0, end_step=4)
    assert [step_kind(cfg, s) for s in range(6)] == ["two"] * 4 + ["plain"] * 2
    looksam = SAMConfig(mode="looksam", end_step=4, looksam_interval=3)
    assert [step_kind(looksam, s) for s in range(6)] == ["two", "reuse", "reuse", "two", "plain", "plain"]
    past = SAMConfig(mode="past_fsam", start_step=1, end_step=3)
    assert [step_kind(past, s) for s in range(4)] == ["plain", "one", "one", "plain"]


@pytest.mark.parametrize(
    ("start", "end", "match"),
    [
        (0, 0, r"Invalid sam_end_step=0\. Must be >= 1 \(or None\), and > sam_start_step"),
        (0, -1, r"Invalid sam_end_step=-1\. Must be >= 1"),
        (3, 3, r"Invalid sam_end_step=3\. Must be None or > sam_start_step=3"),
        (3, 2, r"Invalid sam_end_step=2\. Must be None or > sam_start_step=3"),
    ],
)
def test_sam_end_step_must_follow_sam_start_step(tmp_path, start, end, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, sam_mode="sam", sam_start_step=start, sam_end_step=end)


def test_sam_end_step_reaches_the_config(tmp_path):
    args = make_args(tmp_path, sam_mode="sam", sam_start_step=1, sam_end_step=5)
    assert args.to_sam_config().end_step == 5
    assert make_args(tmp_path, sam_mode="sam").to_sam_config().end_step is None


def _args(tmp_path, **overrides):
    base = dict(
        optim="adamw_torch",
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        max_steps=6,
        save_steps=1,
        save_strategy="steps",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        seed=7,
        sam_mode="fsam",
        sam_start_step=2,
        sam_end_step=4,
        logging_steps=1,
    )
    return make_args(tmp_path, **{**base, **overrides})


@pytest.fixture(scope="module")
def windowed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    trainer = LLQRSAMTrainer(model=tiny_vit(dropout=0.1), args=_args(out), train_dataset=image_dataset(24))
    trainer.train()
    return out, trainer


def test_sam_runs_only_inside_the_window(windowed_run):
    _, trainer = windowed_run
    assert trainer.sam_state.ascents == 2  # steps 2 and 3
    logged = {e["step"]: e for e in trainer.state.log_history if "loss" in e}
    assert sorted(s for s, e in logged.items() if "sam/rho" in e) == [3, 4]  # the log of step k is at k + 1


@pytest.mark.parametrize("checkpoint", [2, 3, 4, 5], ids=["at-start", "inside", "at-end", "after"])
def test_resume_across_the_window_edges_is_bit_exact(tmp_path, windowed_run, checkpoint):
    full_dir, full = windowed_run
    resumed = LLQRSAMTrainer(
        model=tiny_vit(seed=99, dropout=0.1), args=_args(tmp_path, save_strategy="no"), train_dataset=image_dataset(24)
    )
    resumed.train(resume_from_checkpoint=str(full_dir / f"checkpoint-{checkpoint}"))
    assert all(torch.equal(a, b) for a, b in zip(params_of(full.model), params_of(resumed.model), strict=True))
    assert resumed.sam_state.ascents == full.sam_state.ascents == 2
    for kind, buffers in full.sam_state.buffers.items():
        assert all(torch.equal(t, resumed.sam_state.buffers[kind][n]) for n, t in buffers.items())
