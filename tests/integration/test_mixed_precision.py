"""bf16 on CPU, and the fp16 GradScaler logic with `torch.amp.GradScaler("cpu")` (docs/integration.md I17, I18).

Trainer-level fp16 creates no scaler on CPU (Accelerate), so the scaler tests install a CPU GradScaler on the
accelerator before training: backward, step and skip then go through exactly the code paths a GPU fp16 run uses.
"""

import pytest
import torch

from tests.integration.test_trainer_equivalence import PoisonNet, _Snapshots
from tests.utils import SequentialTrainer, image_dataset, make_args, max_abs_diff, params_of, tiny_vit


@pytest.mark.parametrize("mode", ["sam", "fsam"])
def test_bf16_cpu_runs_close_to_fp32_with_fp32_state(tmp_path, mode):
    ds = image_dataset(16)
    fp32, bf16 = tiny_vit(), tiny_vit()
    SequentialTrainer(model=fp32, args=make_args(tmp_path, sam_mode=mode), train_dataset=ds).train()
    trainer = SequentialTrainer(model=bf16, args=make_args(tmp_path, sam_mode=mode, bf16=True), train_dataset=ds)
    trainer.train()
    assert all(torch.isfinite(p).all() for p in bf16.parameters())
    assert all(p.dtype == torch.float32 for p in bf16.parameters())  # AMP keeps fp32 master weights
    assert 0 < max_abs_diff(params_of(fp32), params_of(bf16)) < 2e-2  # bf16 really ran, and stayed close
    for buffers in trainer.sam_state.buffers.values():
        assert all(t.dtype == torch.float32 for t in buffers.values())


def _with_cpu_scaler(trainer, init_scale=2.0**10):
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    trainer.accelerator.scaler = scaler  # read by accelerator.backward and by the prepared optimizer
    return scaler


SCALER_CASES = [
    ("sam", {}),
    ("sam", {"sam_norm": "matrix"}),
    ("asam", {"sam_rho": 0.5}),
    ("fsam", {}),
    ("fisher_sam", {}),
    ("fisher_sam", {"fisher_sam_form": "paper"}),
    ("gsam", {"gsam_alpha": 0.8}),
    ("vasso", {}),
    ("infosam", {}),
    ("infosam", {"infosam_variance": "ema"}),
    ("sam", {"llqr": True, "llqr_update_interval": 2}),
    ("fsam", {"llqr": True, "llqr_update_interval": 2}),
]


@pytest.mark.parametrize(
    ("mode", "extra"), SCALER_CASES, ids=[f"{m}-{'-'.join(map(str, e.values()))}" for m, e in SCALER_CASES]
)
def test_scaled_gradients_give_the_unscaled_step(tmp_path, mode, extra):
    """Every mode under a CPU GradScaler (S = 1024) equals fp32 within 1e-6; its state too; pass 1 never unscales.

    GSAM used to subtract an unscaled clean gradient from the scaled pass-2 gradient (a correction of α/S): the
    `gsam_alpha=0.8` case is 1e-2 away from α = 0 here, so that bug cannot pass this test.
    """
    ds = image_dataset(16)
    plain, scaled = tiny_vit(), tiny_vit()
    ref = SequentialTrainer(model=plain, args=make_args(tmp_path, sam_mode=mode, **extra), train_dataset=ds)
    ref.train()
    trainer = SequentialTrainer(model=scaled, args=make_args(tmp_path, sam_mode=mode, **extra), train_dataset=ds)
    scaler = _with_cpu_scaler(trainer)
    unscale_calls = []
    original_unscale = scaler.unscale_
    scaler.unscale_ = lambda opt: (unscale_calls.append(trainer.engine.current is None), original_unscale(opt))[1]
    trainer.train()
    # once per optimizer step, inside scaler.step(), never from within an optimizer step's training_step calls
    assert unscale_calls == [True, True, True]
    assert max_abs_diff(params_of(plain), params_of(scaled)) < 1e-6
    for kind, buffers in ref.sam_state.buffers.items():
        for name, t in buffers.items():
            torch.testing.assert_close(trainer.sam_state.buffers[kind][name], t, rtol=1e-5, atol=1e-8)
    if mode == "gsam":  # the correction really acts: α = 0 lands elsewhere
        no_corr = tiny_vit()
        SequentialTrainer(
            model=no_corr, args=make_args(tmp_path, sam_mode="gsam", gsam_alpha=0.0), train_dataset=ds
        ).train()
        assert max_abs_diff(params_of(no_corr), params_of(scaled)) > 1e-4


def test_scaler_overflow_in_pass1_skips_ascent_and_step(tmp_path):
    ds = image_dataset(16)
    model = PoisonNet({3}, float("inf"))  # step 2, pass 1
    snaps = _Snapshots(model)
    trainer = SequentialTrainer(
        model=model, args=make_args(tmp_path, sam_mode="fsam", max_steps=2), train_dataset=ds, callbacks=[snaps]
    )
    scaler = _with_cpu_scaler(trainer)
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(snaps.begin[1], params_of(model), strict=True))
    assert scaler.get_scale() == 2.0**9  # the scaler saw the injected inf, skipped and backed off
    assert trainer.sam_state.skipped_ascent == 1 and trainer.sam_state.ascents == 1
    log = trainer.state.log_history[1]
    assert log["sam/skipped_ascent"] == 1 and log["sam/skipped"] == 1


def test_llqrsam_trainer_fp16_on_cpu_is_the_fp32_run(tmp_path):
    """`fp16=True` on CPU: Accelerate makes no scaler and no fp16 autocast, so the run is the fp32 run, bit for bit
    (as for the stock Trainer), and SAM still steps."""
    ds = image_dataset(8)
    try:
        args = make_args(tmp_path, sam_mode="sam", fp16=True, max_steps=2)
    except ValueError as err:  # some versions refuse fp16 on CPU outright
        pytest.skip(str(err))
    fp16, fp32 = tiny_vit(), tiny_vit()
    trainer = SequentialTrainer(model=fp16, args=args, train_dataset=ds)
    trainer.train()
    assert trainer.accelerator.scaler is None and trainer.state.global_step == 2
    SequentialTrainer(model=fp32, args=make_args(tmp_path, sam_mode="sam", max_steps=2), train_dataset=ds).train()
    assert all(torch.equal(a, b) for a, b in zip(params_of(fp16), params_of(fp32), strict=True))
    assert max_abs_diff(params_of(fp16), params_of(tiny_vit())) > 1e-3  # it trained
