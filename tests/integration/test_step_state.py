"""The per-step state: out-of-memory retries, BatchNorm on skipped steps, and the stock resume path."""

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_llqrsam import LLQRSAMTrainer, LLQRSAMTrainingArguments
from tests.integration.test_trainer_equivalence import _Snapshots
from tests.utils import SequentialTrainer, image_dataset, make_args, params_of, tiny_vit

OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes."  # accelerate retries on this


class OOMOnce(SequentialTrainer):
    """Raises a CPU out-of-memory error once, on the `fail_at`-th `compute_loss` call (1-based)."""

    fail_at = 0

    def compute_loss(self, *args, **kwargs):
        self.loss_calls = getattr(self, "loss_calls", 0) + 1
        if self.loss_calls == self.fail_at:
            raise RuntimeError(OOM)
        return super().compute_loss(*args, **kwargs)


@pytest.mark.parametrize(
    ("mode", "extra"),
    [
        ("fsam", {"llqr": True, "llqr_update_interval": 2}),
        ("sam", {"sam_accumulation": "micro"}),
        ("infosam", {}),
    ],
)
def test_oom_retry_in_pass2_equals_a_clean_run_at_the_smaller_batch(tmp_path, mode, extra):
    """`auto_find_batch_size`: an OOM in pass 2 of step 0 (GA 2, batch 8 → 7) leaves nothing behind.

    Before the step state, the retry replayed the failed attempt's window (the descent gradient summed two batches)
    and kept its SAM state (ḡ) and U. Now the retried run equals a fresh run at the smaller batch: weights, state
    and U.
    """
    ds = image_dataset(48)
    common = dict(sam_mode=mode, gradient_accumulation_steps=2, max_steps=3, **extra)
    model = tiny_vit()
    retried = OOMOnce(
        model=model,
        args=make_args(tmp_path / "oom", per_device_train_batch_size=8, auto_find_batch_size=True, **common),
        train_dataset=ds,
    )
    retried.fail_at = 3  # window mode: calls 1-2 are pass 1, call 3 is the first replay
    if extra.get("sam_accumulation") == "micro":
        retried.fail_at = 4  # micro: pass 1, pass 2, pass 1, then the second micro-batch's pass 2
    retried.train()
    smaller = retried._train_batch_size  # accelerate shrinks the batch by 10 %: 8 → 7
    assert smaller < 8 and retried.state.global_step == 3

    clean_model = tiny_vit()
    clean_args = make_args(tmp_path / "clean", per_device_train_batch_size=smaller, **common)
    clean = SequentialTrainer(model=clean_model, args=clean_args, train_dataset=ds)
    clean.train()
    assert all(torch.equal(a, b) for a, b in zip(params_of(clean_model), params_of(model), strict=True))
    for kind, buffers in clean.sam_state.buffers.items():
        assert all(torch.equal(t, retried.sam_state.buffers[kind][n]) for n, t in buffers.items())
    assert retried.sam_state.ascents == clean.sam_state.ascents > 0
    if extra.get("llqr"):
        ref_u, got_u = clean.preconditioner.state_dict()["blocks"], retried.preconditioner.state_dict()["blocks"]
        assert retried.preconditioner.num_updates == clean.preconditioner.num_updates == 2
        assert all(torch.equal(ref_u[n][k], got_u[n][k]) for n in ref_u for k in ref_u[n])


class PoisonedBatchNormNet(nn.Module):
    """Linear → BatchNorm → Linear; the loss of chosen forward calls (1-based) is multiplied by `value`."""

    def __init__(self, poison_calls: set[int], value: float = float("inf")):
        super().__init__()
        torch.manual_seed(0)
        self.lin1, self.bn, self.lin2 = nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        self.poison_calls, self.value, self.calls = poison_calls, value, 0

    def forward(self, pixel_values, labels):
        self.calls += 1
        loss = nn.functional.cross_entropy(self.lin2(self.bn(self.lin1(pixel_values.flatten(1)))), labels)
        return {"loss": loss * self.value if self.calls in self.poison_calls else loss}


class _BufferSnapshots(_Snapshots):
    def __init__(self, model):
        super().__init__(model)
        self.buffers = []

    def on_step_begin(self, args, state, control, **kwargs):
        super().on_step_begin(args, state, control, **kwargs)
        self.buffers.append([b.clone() for b in self.model.buffers()])


@pytest.mark.parametrize("policy", ["first", "second"])
@pytest.mark.parametrize(("which", "poisoned"), [("pass1", {3}), ("pass2", {4}), ("plain", {2})])
def test_batchnorm_buffers_bit_identical_after_a_skipped_step(tmp_path, policy, which, poisoned):
    """A skipped step (non-finite pass 1, pass 2, or a plain step's gradient) leaves the BN buffers as they were.

    Without the restore, an overflowing pass 2 leaves `running_var = inf` and the eval model predicts one class.
    """
    ds = image_dataset(16)
    model = PoisonedBatchNormNet(poisoned)
    snaps = _BufferSnapshots(model)
    extra = {"sam_start_step": 2} if which == "plain" else {}  # steps 0, 1 are then plain one-pass steps
    trainer = SequentialTrainer(
        model=model,
        args=make_args(tmp_path, sam_mode="sam", max_steps=2, sam_bn_stats=policy, **extra),
        train_dataset=ds,
        callbacks=[snaps],
    )
    trainer.train()
    assert trainer.state.log_history[1]["sam/skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(snaps.buffers[1], model.buffers(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(snaps.begin[1], params_of(model), strict=True))
    assert torch.isfinite(model.bn.running_var).all() and int(model.bn.num_batches_tracked) == 1


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin1, self.drop, self.lin2 = nn.Linear(64, 16), nn.Dropout(0.3), nn.Linear(16, 3)

    def forward(self, pixel_values, labels):
        return {"loss": nn.functional.cross_entropy(self.lin2(self.drop(self.lin1(pixel_values.flatten(1)))), labels)}


def _resume_args(tmp_path, cls, **kw):
    common = dict(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        seed=5,
        disable_tqdm=True,
        optim="adamw_torch",
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=3,
        max_steps=6,
    )
    common.update(kw)
    return cls(**common)


def test_sam_mode_none_resume_is_stock_bit_for_bit(tmp_path):
    """sam_mode='none', llqr off: 6 steps with a checkpoint at 3, then a resume from it, equals the stock Trainer
    doing the same, and equals the uninterrupted run (dropout, random sampler, AdamW with a linear schedule, GA 2)."""
    ds = image_dataset(24)
    results = {}
    for name, trainer_cls, args_cls in (
        ("stock", Trainer, TrainingArguments),
        ("ours", LLQRSAMTrainer, LLQRSAMTrainingArguments),
    ):
        full = DropoutNet()
        trainer_cls(model=full, args=_resume_args(tmp_path / name, args_cls), train_dataset=ds).train()
        resumed = DropoutNet()
        torch.manual_seed(123)  # the resumed run must not depend on the RNG it starts with
        t = trainer_cls(model=resumed, args=_resume_args(tmp_path / f"{name}-resumed", args_cls), train_dataset=ds)
        t.train(resume_from_checkpoint=str(tmp_path / name / "checkpoint-3"))
        assert t.state.global_step == 6
        results[name] = (params_of(full), params_of(resumed))
    for full, resumed in results.values():
        assert all(torch.equal(a, b) for a, b in zip(full, resumed, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(results["stock"][1], results["ours"][1], strict=True))
    assert not (tmp_path / "ours" / "checkpoint-3" / "llqrsam_state.pt").exists()


def test_oom_retry_after_step_0_keeps_sam_state_and_u_with_the_weights(tmp_path):
    """`auto_find_batch_size`, OOM in pass 2 of step 2 (batch 8 → 7): one clock. The retry restarts the Trainer's step
    counter at 0 and keeps the weights (stock), and the SAM state and U carry on with them: the ascents of the two
    finished steps count on, and U's refreshes of the failed attempt (steps 0 and 2, the second before the OOM) are
    kept while the retry adds its own (steps 0 and 2). The docs' checkpoints guide states the same."""
    ds = image_dataset(48)
    common = dict(sam_mode="fsam", max_steps=3, llqr=True, llqr_update_interval=2, llqr_batch_size=8)
    model = tiny_vit()
    retried = OOMOnce(
        model=model,
        args=make_args(tmp_path / "oom", per_device_train_batch_size=8, auto_find_batch_size=True, **common),
        train_dataset=ds,
    )
    retried.fail_at = 6  # GA 1: calls 1-4 are steps 0 and 1, call 5 is step 2's pass 1, call 6 its pass 2
    retried.train()
    assert retried._train_batch_size < 8 and retried.state.global_step == 3
    assert retried.sam_state.ascents == 2 + 3  # two steps of the failed attempt, three of the retry
    assert retried.preconditioner.num_updates == 2 + 2
    fresh = SequentialTrainer(
        model=tiny_vit(), args=make_args(tmp_path / "fresh", per_device_train_batch_size=7, **common), train_dataset=ds
    )
    fresh.train()
    assert fresh.sam_state.ascents == 3 and fresh.preconditioner.num_updates == 2  # what a reset would have given
    assert all(torch.isfinite(p).all() for p in model.parameters())
