"""The plain PyTorch API `hf_llqrsam.SAM`, against a hand-written SAM loop, against `LLQRSAMTrainer` on the same model,
data and seed (every mode, with and without LLQR), and the skip rule, LayerDrop, AMP, accelerate and state_dict."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

import hf_llqrsam
from hf_llqrsam import SAM, LLQRSAMTrainer
from hf_llqrsam.checkpoint import LLQRSAMStateError
from hf_llqrsam.data import curvature_indices
from hf_llqrsam.llqr import LLQRConfig
from hf_llqrsam.modes import MODES
from tests.integration.test_trainer_equivalence import BatchNormNet
from tests.oracles.sam_loop import OracleEfficientSAM, OracleSAM
from tests.utils import SequentialTrainer, batches, image_dataset, make_args, max_abs_diff, params_of, tiny_vit

TOL = 1e-6
RHO, LR, STEPS = 0.1, 0.1, 4
LLQR_ARGS = dict(llqr=True, llqr_batch_size=8, llqr_inner_steps=3, llqr_update_interval=2)
LLQR_CONFIG = LLQRConfig(batch_size=8, inner_steps=3, update_interval=2)
MODE_ARGS = {  # LookSAM: a full step and a reuse step within 4 steps; Flat-LoRA: the ramp over the 4 steps, and the
    # Trainer's seed (make_args: 0), which Flat-LoRA's noise and Bi-LoRA's auxiliary adapter are drawn from
    "looksam": {"looksam_interval": 2},
    "flat_lora": {"flat_lora_ramp_steps": STEPS, "seed": 0},
    "bi_lora": {"seed": 0},
}
LLQR_MODES = [m for m, spec in MODES.items() if spec.llqr_geometry or spec.llqr_descent]


def _loss(model, batch):
    out = model(**batch)
    return out["loss"] if isinstance(out, dict) else out.loss


def _curvature(ds):
    def batch(step):
        idx = curvature_indices(0, step, len(ds), 8)
        rows = [ds[i] for i in idx]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    return batch


def run_api(model, ds, mode, *, llqr=None, steps=STEPS, bs=4, closure=None, **options):
    """The README's loop: pass 1, `with sam.perturbed()`, pass 2, optimizer step (`sam.step` where the mode needs)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    sam = SAM(model, optimizer, mode, RHO, llqr=llqr, curvature_batch=_curvature(ds) if llqr else None, **options)
    for batch in batches(ds, bs)[:steps]:
        if closure or not sam.two_pass:
            sam.step(lambda b=batch: _backward(model, b))
            continue
        _loss(model, batch).backward()
        with sam.perturbed():
            _loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    return sam


def _backward(model, batch):
    loss = _loss(model, batch)
    loss.backward()
    return loss


@pytest.mark.parametrize("mode", ["sam", "asam", "fsam", "fisher_sam", "gsam", "vasso", "infosam"])
def test_api_equals_the_hand_written_sam_loop(mode):
    ds = image_dataset(16)
    model, ref = tiny_vit(), tiny_vit()
    run_api(model, ds, mode)
    oracle = OracleSAM(mode, RHO, LR)
    for batch in batches(ds, 4):
        oracle.step(ref, batch)
    assert max_abs_diff(params_of(model), params_of(ref)) < TOL


@pytest.mark.parametrize(("mode", "oracle_kwargs"), [("past_fsam", {}), ("looksam", {"k": 2}), ("wsam", {})])
def test_api_step_equals_the_hand_written_efficient_loops(mode, oracle_kwargs):
    ds = image_dataset(16)
    model, ref = tiny_vit(), tiny_vit()
    run_api(model, ds, mode, **MODE_ARGS.get(mode, {}))
    oracle = OracleEfficientSAM(mode, RHO, LR, **oracle_kwargs)
    for batch in batches(ds, 4):
        oracle.step(ref, batch)
    assert max_abs_diff(params_of(model), params_of(ref)) < TOL


def _model(mode):
    """A tiny ViT; with LoRA on q/v (and a trained classifier copy) for the modes that perturb LoRA layers."""
    if mode in MODES and MODES[mode].acts_on_lora:
        from tests.lm_utils import lora

        return lora(tiny_vit(), ["q_proj", "v_proj"], modules_to_save=["classifier"])
    return tiny_vit()


@pytest.mark.parametrize(
    ("mode", "llqr"), [(m, False) for m in MODES] + [(m, True) for m in LLQR_MODES] + [("none", True)]
)
def test_api_equals_the_trainer(tmp_path, mode, llqr):
    """Same model, data, order and seed: the plain API and `LLQRSAMTrainer` give the same weights (and U)."""
    ds = image_dataset(16)
    model, ref = _model(mode), _model(mode)
    extra = MODE_ARGS.get(mode, {})
    in_c = mode in MODES and MODES[mode].llqr_geometry  # U enters C only where the record allows it
    llqr_args = {**LLQR_ARGS, "llqr_in_perturbation": in_c} if llqr and mode != "none" else LLQR_ARGS if llqr else {}
    trainer = SequentialTrainer(
        model=ref,
        args=make_args(tmp_path, sam_mode=mode, sam_rho=RHO, max_steps=STEPS, **extra, **llqr_args),
        train_dataset=ds,
    )
    trainer.train()
    config = dataclasses.replace(LLQR_CONFIG, in_perturbation=in_c) if llqr else None
    sam = run_api(model, ds, mode, llqr=config, **extra)
    assert max_abs_diff(params_of(model), params_of(ref)) < TOL
    if llqr:
        assert sam.preconditioner.num_updates == trainer.preconditioner.num_updates == 2
        for a, b in zip(sam.preconditioner.structure.blocks, trainer.preconditioner.structure.blocks, strict=True):
            assert all(torch.allclose(a[k], b[k], atol=TOL) for k in a)
    for kind, buffers in trainer.sam_state.buffers.items():
        assert all(torch.allclose(t, sam.engine.state.buffers[kind][n], atol=TOL) for n, t in buffers.items())


def test_api_batchnorm_equals_the_trainer(tmp_path):
    """The `second` BatchNorm policy (the reference): running statistics from pass 2 only, in both drivers."""
    ds = image_dataset(16)
    model, ref = BatchNormNet(), BatchNormNet()
    SequentialTrainer(
        model=ref, args=make_args(tmp_path, sam_mode="sam", sam_rho=RHO, max_steps=3), train_dataset=ds
    ).train()
    run_api(model, ds, "sam", steps=3)
    assert max_abs_diff(params_of(model), params_of(ref)) < TOL
    assert torch.allclose(model.bn.running_mean, ref.bn.running_mean, atol=TOL)
    assert torch.allclose(model.bn.running_var, ref.bn.running_var, atol=TOL)


def test_api_gradient_accumulation_is_one_epsilon_per_window():
    """Pass 1 and pass 2 over two micro-batches of 2 = one step on their batch of 4 (mean losses halved)."""
    ds = image_dataset(16)
    model, ref = tiny_vit(), tiny_vit()
    run_api(ref, ds, "fsam", steps=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    sam = SAM(model, optimizer, "fsam", RHO)
    for batch in batches(ds, 4)[:2]:
        micro = [{k: v[i : i + 2] for k, v in batch.items()} for i in (0, 2)]
        for mb in micro:
            (_loss(model, mb) / 2).backward()
        with sam.perturbed():
            for mb in micro:
                (_loss(model, mb) / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert max_abs_diff(params_of(model), params_of(ref)) < TOL


@pytest.mark.parametrize("mode", ["sam", "fsam"])
def test_api_under_a_grad_scaler_equals_the_unscaled_run(mode):
    ds = image_dataset(16)
    model, ref = tiny_vit(), tiny_vit()
    run_api(ref, ds, mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    sam = SAM(model, optimizer, mode, RHO, scaler=scaler)
    for batch in batches(ds, 4)[:STEPS]:
        scaler.scale(_loss(model, batch)).backward()
        with sam.perturbed():
            scaler.scale(_loss(model, batch)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert max_abs_diff(params_of(model), params_of(ref)) < 1e-5


def test_api_in_an_accelerate_loop_equals_the_plain_loop():
    from accelerate import Accelerator

    ds = image_dataset(16)
    model, ref = tiny_vit(), tiny_vit()
    run_api(ref, ds, "sam")
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    sam = SAM(model, optimizer, "sam", RHO, scaler=accelerator.scaler)
    for batch in batches(ds, 4)[:STEPS]:
        with accelerator.accumulate(model):
            accelerator.backward(_loss(model, batch))
            with sam.perturbed():
                accelerator.backward(_loss(model, batch))
            optimizer.step()
            optimizer.zero_grad()
    assert max_abs_diff(params_of(accelerator.unwrap_model(model)), params_of(ref)) < TOL


class TwoBranch(nn.Module):
    """A classifier whose second branch runs on chosen forward calls only (LayerDrop, MoE routing)."""

    def __init__(self, branch_calls: set[int]):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(64, 3), nn.Linear(64, 3)
        self.branch_calls, self.calls = branch_calls, 0

    def forward(self, pixel_values, labels):
        self.calls += 1
        x = pixel_values.flatten(1)
        logits = self.a(x) + (self.b(x) if self.calls in self.branch_calls else 0.0)
        return {"loss": nn.functional.cross_entropy(logits, labels)}


@pytest.mark.parametrize("mode", ["gsam", "wsam", "looksam"])
@pytest.mark.parametrize("branch", ["pass1", "pass2"])
def test_a_parameter_with_a_gradient_in_one_pass_reads_zero_in_the_other(mode, branch):
    """The descent aligns by name: the branch's missing gradient is a zero tensor (hand formula on flat vectors)."""
    ds = image_dataset(8)
    batch = batches(ds, 8)[0]
    model = TwoBranch({1} if branch == "pass1" else {2})
    ref = copy.deepcopy(model)
    sam = run_api(model, ds, mode, steps=1, bs=8, **MODE_ARGS.get(mode, {}))
    assert sam.skipped == 0
    # oracle on flat vectors, zeros for the missing branch
    names = [n for n, _ in ref.named_parameters()]

    def flat_grad(use_b, params):
        ref.zero_grad()
        with torch.no_grad():
            backup = [p.clone() for p in ref.parameters()]
            for p, q in zip(ref.parameters(), params, strict=True):
                p.copy_(q)
        ref.branch_calls, ref.calls = ({1} if use_b else set()), 0
        ref(**batch)["loss"].backward()
        g = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in ref.parameters()])
        with torch.no_grad():
            for p, q in zip(ref.parameters(), backup, strict=True):
                p.copy_(q)
        return g

    theta = [p.detach().clone() for p in ref.parameters()]
    g = flat_grad(branch == "pass1", theta)
    b_mask = torch.cat([torch.full((p.numel(),), n.startswith("b.")) for n, p in ref.named_parameters()])
    eps_flat = RHO * g / g.norm()
    eps_flat = torch.where(b_mask & (branch == "pass2"), 0.0, eps_flat)  # no pass-1 gradient: not perturbed
    sizes = [p.numel() for p in ref.parameters()]
    perturbed = [t + e.view_as(t) for t, e in zip(theta, eps_flat.split(sizes), strict=True)]
    gs = flat_grad(branch == "pass2", perturbed)
    if mode == "gsam":
        g_perp = g - (g @ gs) / (gs @ gs) * gs
        d = gs - 0.4 * g_perp
    elif mode == "wsam":
        a = 0.9 / 0.1
        d = g + a * (gs - g)
    else:
        d = gs  # LookSAM's full step descends on g̃
    expected = torch.cat([t.reshape(-1) for t in theta]) - LR * d
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert names and torch.allclose(got, expected, atol=TOL)


class NaNOnCall(nn.Module):
    """BatchNorm classifier whose loss is NaN on chosen forward calls (1-based)."""

    def __init__(self, poison: set[int]):
        super().__init__()
        torch.manual_seed(0)
        self.lin1, self.bn, self.lin2 = nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        self.poison, self.calls = poison, 0

    def forward(self, pixel_values, labels):
        self.calls += 1
        loss = nn.functional.cross_entropy(self.lin2(self.bn(self.lin1(pixel_values.flatten(1)))), labels)
        return {"loss": loss * float("nan") if self.calls in self.poison else loss}


@pytest.mark.parametrize("mode", ["wsam", "fsam", "vasso", "infosam", "gsam", "looksam", "sam"])
def test_a_nonfinite_pass_2_skips_the_step_with_weights_batchnorm_and_state_intact(mode):
    """Step 1's pass 2 (call 4) is NaN: the step is skipped and counted; weights, BatchNorm statistics and the mode
    state are bit-identical to after step 0 (decoupled WSAM used to take the step through its post-step term)."""
    ds = image_dataset(16)
    model = NaNOnCall({4})
    extra = {"looksam_interval": 1} if mode == "looksam" else {}  # every step a full one
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    sam = SAM(model, optimizer, mode, RHO, **extra)
    data = batches(ds, 4)
    sam.step(lambda: _backward(model, data[0]))
    weights = params_of(model)
    bn = [b.clone() for b in (model.bn.running_mean, model.bn.running_var, model.bn.num_batches_tracked)]
    state = {k: {n: t.clone() for n, t in v.items()} for k, v in sam.engine.state.buffers.items()}
    ascents = sam.engine.state.ascents
    sam.step(lambda: _backward(model, data[1]))
    assert sam.skipped == 1 and sam.metrics()["sam/skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), weights, strict=True))
    assert all(torch.equal(a, b) for a, b in zip((model.bn.running_mean, model.bn.running_var), bn, strict=False))
    assert int(model.bn.num_batches_tracked) == int(bn[2])
    assert sam.engine.state.ascents == ascents
    assert sam.engine.state.buffers.keys() == state.keys()
    for kind, buffers in state.items():
        assert all(torch.equal(t, sam.engine.state.buffers[kind][n]) for n, t in buffers.items())


def test_api_state_dict_resume_equals_the_uninterrupted_run():
    ds = image_dataset(16)
    full, part = tiny_vit(), tiny_vit()
    run_api(full, ds, "fsam", llqr=LLQR_CONFIG)
    optimizer = torch.optim.SGD(part.parameters(), lr=LR)
    sam = SAM(part, optimizer, "fsam", RHO, llqr=LLQR_CONFIG, curvature_batch=_curvature(ds))
    data = batches(ds, 4)
    for batch in data[:2]:
        sam.step(lambda b=batch: _backward(part, b))
    saved = sam.state_dict()
    resumed = SAM(part, optimizer, "fsam", RHO, llqr=LLQR_CONFIG, curvature_batch=_curvature(ds))
    resumed.load_state_dict(saved)
    assert resumed.step_count == 2
    for batch in data[2:]:
        resumed.step(lambda b=batch: _backward(part, b))
    assert max_abs_diff(params_of(part), params_of(full)) < TOL


def test_api_load_state_dict_refuses_another_runs_state():
    ds = image_dataset(16)
    model = tiny_vit()
    sam = run_api(model, ds, "fsam", steps=1)
    saved = sam.state_dict()
    other = SAM(model, torch.optim.SGD(model.parameters(), lr=LR), "vasso", RHO)
    saved["config"]["sam_mode"] = "vasso"
    with pytest.raises(LLQRSAMStateError, match="do not belong to sam_mode='vasso'"):
        other.load_state_dict(saved, source="ckpt.pt")
    with pytest.raises(LLQRSAMStateError, match="step"):
        SAM(model, torch.optim.SGD(model.parameters(), lr=LR), "fsam", RHO).load_state_dict(
            {**sam.state_dict(), "step": -1}
        )


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"mode": "nope"}, "Invalid mode='nope'"),
        ({"rho": -1.0}, "rho"),
        ({"mode": "asam", "norm": "matrix"}, "norm='matrix'"),
        ({"accumulation": "micro"}, "accumulation='micro'"),
        ({"bogus": 1}, "Invalid SAM option"),
        ({"llqr": LLQR_CONFIG}, "curvature_batch"),
    ],
)
def test_api_bad_arguments_are_refused_naming_the_field(kwargs, needle):
    model = tiny_vit()
    with pytest.raises((ValueError, TypeError), match=needle):
        SAM(model, torch.optim.SGD(model.parameters(), lr=LR), **kwargs)


def test_perturbed_refuses_a_one_pass_step_and_names_step():
    model = tiny_vit()
    sam = SAM(model, torch.optim.SGD(model.parameters(), lr=LR), "past_fsam", RHO)
    with pytest.raises(RuntimeError, match=r"sam.step\(closure\)"), sam.perturbed():
        pass


def test_top_level_names():
    assert hf_llqrsam.SAM is SAM and hf_llqrsam.SAMEngine.__module__ == "hf_llqrsam.engine"
    assert LLQRSAMTrainer is hf_llqrsam.LLQRSAMTrainer


@pytest.mark.distributed
def test_api_under_ddp_equals_one_process_on_the_union_batch(tmp_path):
    """2 gloo processes, each on half of every batch of 4, against one process on the whole batch."""
    from tests.utils import run_torchrun

    modes = ["sam", "fsam", "gsam", "looksam", "past_fsam", "wsam"]
    run_torchrun("tests/distributed/workers/api_ddp.py", str(tmp_path), ",".join(modes))
    for mode in modes:
        ref = tiny_vit()
        run_api(ref, image_dataset(16), mode, **MODE_ARGS.get(mode, {}))
        got = torch.load(tmp_path / f"{mode}.pt", weights_only=True)
        assert max_abs_diff(got, params_of(ref)) < TOL, mode


def test_api_under_bf16_autocast_equals_the_trainer_in_bf16(tmp_path):
    """`torch.autocast` (bf16 on CPU) around both passes: the same weights as the Trainer with `bf16=True`, which
    runs its forward under the same autocast (fp32 master weights, fp32 SAM math)."""
    ds = image_dataset(16)
    model, ref = tiny_vit(), tiny_vit()
    trainer = SequentialTrainer(
        model=ref, args=make_args(tmp_path, sam_mode="fsam", sam_rho=RHO, max_steps=STEPS, bf16=True), train_dataset=ds
    )
    trainer.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    sam = SAM(model, optimizer, "fsam", RHO)
    for batch in batches(ds, 4)[:STEPS]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(model, batch)
        loss.backward()
        with sam.perturbed():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                perturbed = _loss(model, batch)
            perturbed.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert max_abs_diff(params_of(model), params_of(ref)) < TOL
    for kind, buffers in trainer.sam_state.buffers.items():
        assert all(torch.equal(t, sam.engine.state.buffers[kind][n]) for n, t in buffers.items())


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"mode": "looksam"}, "steps of other shapes"),
        ({"mode": "past_fsam"}, "steps of other shapes"),
        ({"mode": "sam", "start_step": 2}, "plain ones"),
        ({"mode": "sam", "interval": 2}, "plain ones"),
    ],
)
def test_perturbed_refuses_a_schedule_with_other_steps_at_its_first_call(kwargs, why):
    """LookSAM's step 0 is a two-pass step, but its step 1 is not: the refusal comes at the first call, not later."""
    model = tiny_vit()
    sam = SAM(model, torch.optim.SGD(model.parameters(), lr=LR), rho=RHO, **kwargs)
    assert not sam.two_pass
    with pytest.raises(RuntimeError, match=why), sam.perturbed():
        pass
    assert sam.step_count == 0


def test_api_logs_each_refresh(caplog):
    """The plain loop shows the LLQR refresh like the Trainer: a first line, the products, the refresh line."""
    import logging

    ds = image_dataset(16)
    with caplog.at_level(logging.INFO, logger="hf_llqrsam"):
        run_api(tiny_vit(), ds, "sam", llqr=LLQR_CONFIG)
    lines = [r.getMessage() for r in caplog.records if r.name == "hf_llqrsam.api"]
    assert any("fitting U before step 0" in line for line in lines)
    assert any("curvature product 1 of 3" in line for line in lines)
    assert [line.split(":")[0] for line in lines if line.startswith("LLQR refresh ") and " at step " in line] == [
        "LLQR refresh 1 at step 0",
        "LLQR refresh 2 at step 2",
    ]
