"""The trainer against simpler, trusted code: the stock Trainer, a hand-written SAM loop, and itself at other GA."""

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_llqrsam import LLQRSAMTrainer, LLQRSAMTrainingArguments
from tests.oracles.sam_loop import OracleSAM, averaged_sam_step
from tests.utils import (
    SequentialTrainer,
    batches,
    image_dataset,
    make_args,
    max_abs_diff,
    params_of,
    tiny_vit,
)

TOL = 1e-6  # fp32 parameters (docs/integration.md §14.2)


def test_off_path_is_stock_trainer_bitwise(tmp_path):
    """sam_mode=none, llqr off: same params and RNG as the stock Trainer (dropout, random sampler, AdamW, GA 2)."""
    ds = image_dataset(24)
    common = dict(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        seed=3,
        disable_tqdm=True,
        optim="adamw_torch",
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
    )
    stock_model = tiny_vit(dropout=0.2)
    Trainer(model=stock_model, args=TrainingArguments(**common), train_dataset=ds).train()
    stock_rng = torch.get_rng_state()
    ours_model = tiny_vit(dropout=0.2)
    LLQRSAMTrainer(model=ours_model, args=LLQRSAMTrainingArguments(**common), train_dataset=ds).train()
    assert all(torch.equal(a, b) for a, b in zip(params_of(stock_model), params_of(ours_model), strict=True))
    assert torch.equal(stock_rng, torch.get_rng_state())


MODES = [
    ("sam", {}),
    ("sam", {"sam_norm": "matrix"}),
    ("asam", {"sam_rho": 0.5}),
    ("fsam", {}),
    ("fisher_sam", {}),
    ("fisher_sam", {"fisher_sam_form": "paper"}),
    ("gsam", {}),
    ("vasso", {}),
    ("infosam", {}),
]


@pytest.mark.parametrize(("mode", "extra"), MODES, ids=[m + "-" + "-".join(map(str, e.values())) for m, e in MODES])
def test_mode_matches_hand_written_loop(tmp_path, mode, extra):
    ds = image_dataset(16)
    model = tiny_vit()
    ref = tiny_vit()
    args = make_args(
        tmp_path,
        sam_mode=mode,
        sam_rho=extra.get("sam_rho", 0.05),
        max_steps=4,
        **{k: v for k, v in extra.items() if k != "sam_rho"},
    )
    SequentialTrainer(model=model, args=args, train_dataset=ds).train()

    oracle_kwargs = {
        "norm": extra.get("sam_norm", "euclidean"),
        "fisher_form": extra.get("fisher_sam_form", "reference"),
    }
    if mode == "fisher_sam" and oracle_kwargs["fisher_form"] == "paper":
        oracle_kwargs["fisher_eta"] = 1.0
    oracle = OracleSAM(mode, args.sam_rho, args.learning_rate, **oracle_kwargs)
    for batch in batches(ds, 4):
        oracle.step(ref, batch)
    assert max_abs_diff(params_of(model), params_of(ref)) < TOL


def test_window_ga2_equals_ga1_with_double_batch(tmp_path):
    ds = image_dataset(16)
    m_ga, m_big = tiny_vit(), tiny_vit()
    SequentialTrainer(
        model=m_ga,
        args=make_args(
            tmp_path, sam_mode="sam", per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4
        ),
        train_dataset=ds,
    ).train()
    SequentialTrainer(
        model=m_big,
        args=make_args(tmp_path, sam_mode="sam", per_device_train_batch_size=4, max_steps=4),
        train_dataset=ds,
    ).train()
    assert max_abs_diff(params_of(m_ga), params_of(m_big)) < TOL


def test_window_ga4_matches_full_window_loop(tmp_path):
    ds = image_dataset(16)
    model, ref = tiny_vit(), tiny_vit()
    SequentialTrainer(
        model=model,
        args=make_args(
            tmp_path, sam_mode="fsam", per_device_train_batch_size=1, gradient_accumulation_steps=4, max_steps=4
        ),
        train_dataset=ds,
    ).train()
    oracle = OracleSAM("fsam", 0.1, 0.1)
    for batch in batches(ds, 4):  # one ε from the whole 4-example window
        oracle.step(ref, batch)
    assert max_abs_diff(params_of(model), params_of(ref)) < TOL


def test_micro_mode_one_perturbation_per_micro_batch(tmp_path):
    """Micro GA=2: descent = mean over micro-batches of ∇L_j(θ + ε_j), ε_j from micro-batch j alone."""
    ds = image_dataset(16)
    model, ref = tiny_vit(), tiny_vit()
    SequentialTrainer(
        model=model,
        args=make_args(
            tmp_path,
            sam_mode="sam",
            sam_accumulation="micro",
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=4,
        ),
        train_dataset=ds,
    ).train()
    micro = batches(ds, 2)
    for step in range(4):
        averaged_sam_step(ref, micro[2 * step : 2 * step + 2], rho=0.1, lr=0.1)
    assert max_abs_diff(params_of(model), params_of(ref)) < TOL
    # and it is a different method from window mode
    win = tiny_vit()
    SequentialTrainer(
        model=win,
        args=make_args(
            tmp_path, sam_mode="sam", per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4
        ),
        train_dataset=ds,
    ).train()
    assert max_abs_diff(params_of(model), params_of(win)) > 1e-5


class _Snapshots(TrainerCallback):
    def __init__(self, model):
        self.model, self.begin, self.pre = model, [], []

    def on_step_begin(self, args, state, control, **kw):
        self.begin.append(params_of(self.model))

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.pre.append(params_of(self.model))


@pytest.mark.parametrize("accumulation", ["window", "micro"])
def test_weights_restored_exactly_before_optimizer_step(tmp_path, accumulation):
    ds = image_dataset(16)
    model = tiny_vit(dropout=0.1)
    snaps = _Snapshots(model)
    trainer = LLQRSAMTrainer(
        model=model,
        args=make_args(
            tmp_path,
            sam_mode="sam",
            sam_rho=0.5,
            sam_accumulation=accumulation,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            optim="adamw_torch",
        ),
        train_dataset=ds,
        callbacks=[snaps],
    )
    trainer.train()
    assert len(snaps.begin) == len(snaps.pre) == 3
    for a, b in zip(snaps.begin, snaps.pre, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class PoisonNet(nn.Module):
    """A linear classifier whose loss is multiplied by `value` on chosen forward calls (1-based)."""

    def __init__(self, poison_calls: set[int], value: float):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 3)
        self.poison_calls, self.value, self.calls = poison_calls, value, 0

    def forward(self, pixel_values, labels):
        self.calls += 1
        loss = nn.functional.cross_entropy(self.lin(pixel_values.flatten(1)), labels)
        if self.calls in self.poison_calls:
            loss = loss * self.value
        return {"loss": loss}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize(("which", "poisoned"), [("pass1", {3}), ("pass2", {4})])
def test_nonfinite_pass_skips_step_and_leaves_weights(tmp_path, value, which, poisoned):
    """Step 2 (calls 3 and 4) is poisoned in one pass: weights stay as after step 1 and a skip is counted."""
    ds = image_dataset(16)
    model = PoisonNet(poisoned, value)
    snaps = _Snapshots(model)
    trainer = SequentialTrainer(
        model=model,
        args=make_args(tmp_path, sam_mode="sam", max_steps=2, optim="adamw_torch"),
        train_dataset=ds,
        callbacks=[snaps],
    )
    trainer.train()
    final = params_of(model)
    assert all(torch.isfinite(p).all() for p in final)
    assert all(torch.equal(x, y) for x, y in zip(snaps.begin[1], final, strict=True))
    logs = trainer.state.log_history
    assert logs[1]["sam/skipped"] == 1 and "sam/skipped" not in logs[0]
    assert ("sam/skipped_ascent" in logs[1]) == (which == "pass1")


def test_floating_point_ops_count_both_passes(tmp_path):
    ds = image_dataset(16)
    flos = {}
    for mode in ("none", "sam"):
        trainer = LLQRSAMTrainer(model=tiny_vit(), args=make_args(tmp_path, sam_mode=mode), train_dataset=ds)
        trainer.train()
        flos[mode] = trainer.state.total_flos
    assert flos["sam"] == 2 * flos["none"] > 0


def test_logged_sam_metrics(tmp_path):
    ds = image_dataset(16)
    trainer = LLQRSAMTrainer(
        model=tiny_vit(), args=make_args(tmp_path, sam_mode="fsam", sam_rho=0.05), train_dataset=ds
    )
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["sam/perturbation_norm"] == pytest.approx(0.05, rel=1e-5)
    assert log["sam/rho"] == 0.05
    assert log["sam/sharpness"] == pytest.approx(log["sam/loss_perturbed"] - log["loss"], abs=1e-3)
    assert log["sam/probe_norm"] == pytest.approx(log["sam/grad_norm"], rel=1e-6)  # step 0: ḡ = 0, so v = g
    later = trainer.state.log_history[1]
    assert later["sam/probe_norm"] != pytest.approx(later["sam/grad_norm"], rel=1e-3)  # then v = g − σḡ ≠ g


class FixedDiagonalU:
    """A fixed positive diagonal U, standing in for a learned LLQR preconditioner (the Preconditioner protocol)."""

    def __init__(self, model, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.d = {n: torch.rand(p.shape, generator=g) + 0.5 for n, p in model.named_parameters()}
        self.calls = 0

    def flat(self, model):
        return torch.cat([self.d[n].reshape(-1) for n, _ in model.named_parameters()])

    def apply(self, names, tensors):
        return [t * self.d[n] for n, t in zip(names, tensors, strict=True)]

    def apply_(self, names, tensors):
        self.calls += 1
        for n, t in zip(names, tensors, strict=True):
            t.mul_(self.d[n])


@pytest.mark.parametrize(("mode", "in_perturbation"), [("sam", True), ("fsam", True), ("sam", False)])
def test_fixed_u_enters_perturbation_and_descent_once_per_step(tmp_path, mode, in_perturbation):
    """LLQR+SAM / LLQR+FSAM with a fixed U at GA = 2: C = U (or I), P = U applied once per optimizer step."""
    ds = image_dataset(16)
    model, ref = tiny_vit(), tiny_vit()
    trainer = SequentialTrainer(
        model=model,
        args=make_args(
            tmp_path, sam_mode=mode, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4
        ),
        train_dataset=ds,
    )
    u = FixedDiagonalU(model)
    trainer.preconditioner = u  # llqr=False: U is fixed, never refreshed
    trainer.u_in_perturbation = in_perturbation
    trainer.train()
    assert u.calls == 4
    oracle = OracleSAM(mode, 0.1, 0.1, u=u.flat(ref), u_in_perturbation=in_perturbation)
    for batch in batches(ds, 4):
        oracle.step(ref, batch)
    assert max_abs_diff(params_of(model), params_of(ref)) < TOL


def test_gradient_checkpointing_with_sam_matches_plain(tmp_path):
    ds = image_dataset(16)
    plain, ckpt = tiny_vit(), tiny_vit()
    SequentialTrainer(model=plain, args=make_args(tmp_path, sam_mode="sam"), train_dataset=ds).train()
    SequentialTrainer(
        model=ckpt, args=make_args(tmp_path, sam_mode="sam", activation_checkpointing=True), train_dataset=ds
    ).train()
    assert ckpt.is_activation_checkpointing and not plain.is_activation_checkpointing
    assert max_abs_diff(params_of(plain), params_of(ckpt)) < TOL


class BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin1, self.bn, self.lin2 = nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, pixel_values, labels):
        return {"loss": nn.functional.cross_entropy(self.lin2(self.bn(self.lin1(pixel_values.flatten(1)))), labels)}


@pytest.mark.parametrize("policy", ["first", "second"])
def test_batchnorm_stats_kept_from_one_pass(tmp_path, policy):
    """sam_bn_stats: exactly one pass's running-stat update survives; `first` is the clean pass's."""
    ds = image_dataset(16)
    model = BatchNormNet()
    SequentialTrainer(
        model=model,
        args=make_args(tmp_path, sam_mode="sam", sam_rho=0.5, max_steps=1, sam_bn_stats=policy),
        train_dataset=ds,
    ).train()
    clean = BatchNormNet().train()
    with torch.no_grad():
        clean(**batches(ds, 4)[0])  # one train-mode forward at θ₀ from the initial buffers
    assert int(model.bn.num_batches_tracked) == 1
    same = torch.allclose(model.bn.running_mean, clean.bn.running_mean, rtol=0, atol=1e-7) and torch.allclose(
        model.bn.running_var, clean.bn.running_var, rtol=0, atol=1e-7
    )
    assert same == (policy == "first")  # `second` keeps the perturbed pass's statistics (the reference)
