"""Issue 10, SAM side, through the Trainer: past-FSAM, LookSAM, WSAM, the per-layer norms and `fsam_ema` against
hand-written loops (`tests/oracles/sam_loop.py`), LookSAM and WSAM against `pytorch_optimizer` (the `peers` extra),
and resume of the modes that keep state between steps.
"""

import pytest
import torch
from torch import nn

from hf_llqrsam import LLQRSAMTrainer
from tests.integration.test_trainer_equivalence import FixedDiagonalU
from tests.oracles.sam_loop import OracleEfficientSAM, OracleSAM
from tests.utils import SequentialTrainer, batches, image_dataset, make_args, max_abs_diff, params_of, tiny_vit

TOL = 1e-6  # fp32 parameters (docs/integration.md §14.2)

ORACLE = [
    ("past_fsam", {}, {}),
    ("past_fsam", {"past_fsam_overlap": 0.5}, {"window": 2}),
    (
        "past_fsam",
        {"past_fsam_overlap": 2 / 3, "fsam_beta": 0.5, "fsam_sigma": 0.7, "sam_norm": "layer_euclidean"},
        {"window": 3, "fsam_beta": 0.5, "fsam_sigma": 0.7, "norm": "layer_euclidean"},
    ),
    ("looksam", {"looksam_interval": 2}, {"k": 2}),
    ("looksam", {"looksam_interval": 3, "looksam_alpha": 0.3}, {"k": 3, "alpha": 0.3}),
    ("wsam", {}, {}),
    ("wsam", {"wsam_decouple": False, "wsam_gamma": 0.5}, {"gamma": 0.5}),
]


@pytest.mark.parametrize(("mode", "flags", "oracle"), ORACLE, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(ORACLE)])
def test_efficient_mode_matches_hand_written_loop(tmp_path, mode, flags, oracle):
    ds = image_dataset(16)
    model, ref = tiny_vit(), tiny_vit()
    SequentialTrainer(
        model=model, args=make_args(tmp_path, sam_mode=mode, sam_rho=0.05, max_steps=4, **flags), train_dataset=ds
    ).train()
    loop = OracleEfficientSAM(mode, 0.05, 0.1, **oracle)
    for batch in batches(ds, 4):
        loop.step(ref, batch)
    assert max_abs_diff(params_of(model), params_of(ref)) < TOL


@pytest.mark.parametrize(
    ("mode", "flags"),
    [
        ("sam", {"sam_norm": "layer_euclidean"}),
        ("sam", {"sam_norm": "layer_matrix"}),
        ("fsam", {"fsam_ema": "direction"}),
        ("fsam", {"fsam_ema": "direction", "sam_norm": "layer_matrix"}),
        ("fsam", {"fsam_ema": "grad", "sam_norm": "layer_euclidean"}),
    ],
)
def test_layer_norms_and_fsam_ema_match_hand_written_loop(tmp_path, mode, flags):
    ds = image_dataset(16)
    model, ref = tiny_vit(), tiny_vit()
    SequentialTrainer(
        model=model, args=make_args(tmp_path, sam_mode=mode, sam_rho=0.05, max_steps=4, **flags), train_dataset=ds
    ).train()
    loop = OracleSAM(
        mode, 0.05, 0.1, norm=flags.get("sam_norm", "euclidean"), fsam_ema=flags.get("fsam_ema", "precond_grad")
    )
    for batch in batches(ds, 4):
        loop.step(ref, batch)
    assert max_abs_diff(params_of(model), params_of(ref)) < TOL


def test_past_fsam_with_a_fixed_u_enters_perturbation_and_descent(tmp_path):
    """LLQR+past-FSAM (the reference allows U in both): C = U on v = g̃ₜ₋₁ − ḡ, P = U on the one-pass gradient."""
    ds = image_dataset(16)
    model, ref = tiny_vit(), tiny_vit()
    trainer = SequentialTrainer(
        model=model,
        args=make_args(tmp_path, sam_mode="past_fsam", max_steps=4, past_fsam_overlap=0.5),
        train_dataset=ds,
    )
    u = FixedDiagonalU(model)
    trainer.preconditioner = u
    trainer.train()
    assert u.calls == 4
    loop = OracleEfficientSAM("past_fsam", 0.1, 0.1, window=2, u=u.flat(ref))
    for batch in batches(ds, 4):
        loop.step(ref, batch)
    assert max_abs_diff(params_of(model), params_of(ref)) < TOL


def test_passes_per_step_are_counted(tmp_path):
    """LookSAM k = 2 over 4 steps: 2 + 1 + 2 + 1 passes; past-FSAM: 1 per step, plus the overlap window's."""
    ds = image_dataset(16)
    flos = {}
    for name, flags in {
        "none": {"sam_mode": "none"},
        "looksam": {"sam_mode": "looksam", "looksam_interval": 2},
        "past": {"sam_mode": "past_fsam"},
        "past_window": {"sam_mode": "past_fsam", "past_fsam_overlap": 0.5},
    }.items():
        trainer = LLQRSAMTrainer(model=tiny_vit(), args=make_args(tmp_path, max_steps=4, **flags), train_dataset=ds)
        trainer.train()
        flos[name] = trainer.state.total_flos
    assert flos["looksam"] == 1.5 * flos["none"] and flos["past"] == flos["none"]
    assert flos["past_window"] == 7 / 4 * flos["none"]  # windows of 1, 2, 2, 2 batches


def test_past_fsam_overlap_is_single_process(tmp_path, monkeypatch):
    args = make_args(tmp_path, sam_mode="past_fsam", past_fsam_overlap=0.5)
    monkeypatch.setattr(type(args), "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match=r"past_fsam_overlap=0.5 with world_size=2.*single-process"):
        LLQRSAMTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(8))


# ---------------------------------------------------------------------------------------------- peers


class OneTensorNet(nn.Module):
    """A bias-free linear classifier in float64: one parameter tensor, so per-tensor and whole-vector projections
    agree; `hidden` adds a tanh layer (several tensors, for WSAM)."""

    def __init__(self, hidden: int = 0):
        super().__init__()
        torch.manual_seed(0)
        layers = [nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 3)] if hidden else [nn.Linear(64, 3, bias=False)]
        self.net = nn.Sequential(*layers).double()
        self.calls = 0

    def forward(self, pixel_values, labels):
        self.calls += 1
        return {"loss": nn.functional.cross_entropy(self.net(pixel_values.flatten(1).double()), labels)}


def _drive(opt, model, data):
    for batch in data:
        opt.zero_grad()
        model(**batch)["loss"].backward()
        opt.first_step(zero_grad=True)
        model(**batch)["loss"].backward()
        opt.second_step(zero_grad=True)


def test_looksam_matches_pytorch_optimizer(tmp_path):
    """`pytorch_optimizer.LookSAM` (4.1.0, `second_step`) projects each parameter tensor on its own and rescales per
    tensor; ours projects the whole vector (the paper's Alg. 1). On a one-tensor model the two are the same method:
    compared in float64 over 6 steps at k = 3 with SGD momentum 0.9. What is left (5.9e-8 here) is its reuse scale
    ‖g‖/(‖g_v‖ + 1e-8) against our ‖g‖/‖g_v‖; with its +1e-8 copied in, 2e-10 remain: its ε = ρg/(‖g‖ + 1e-12)
    against our ρg/√(‖g‖² + 1e-12), with its ‖g‖ reduced in float32. Its step() runs two passes on every step (the
    closure recomputes g at θ on the reuse steps); ours runs one there: 8 forwards in 6 steps instead of 12."""
    peers = pytest.importorskip("pytorch_optimizer")
    ds = image_dataset(24)
    model = OneTensorNet()
    args = make_args(
        tmp_path,
        sam_mode="looksam",
        sam_rho=0.05,
        looksam_interval=3,
        looksam_alpha=0.7,
        optim_args="momentum=0.9",
        max_steps=6,
    )
    SequentialTrainer(model=model, args=args, train_dataset=ds).train()
    ref = OneTensorNet()
    opt = peers.LookSAM(ref.parameters(), torch.optim.SGD, rho=0.05, k=3, alpha=0.7, lr=0.1, momentum=0.9)
    _drive(opt, ref, batches(ds, 4))
    assert max_abs_diff(params_of(model), params_of(ref)) < 2e-7
    assert (model.calls, ref.calls) == (2 + 1 + 1 + 2 + 1 + 1, 12)


@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_matches_pytorch_optimizer(tmp_path, decouple):
    """`pytorch_optimizer.WSAM` (4.1.0), float64, SGD momentum 0.9 (so the decoupled sharpness step differs from the
    coupled one). Same definition: a = γ/(1 − γ), ε = ρg/‖g‖. What is left (6e-10) is numerics: its ‖g‖ is reduced
    in float32 (`get_global_gradient_norm`) and θ restored by subtraction, ours in float64 and by copy."""
    peers = pytest.importorskip("pytorch_optimizer")
    ds = image_dataset(16)
    model = OneTensorNet(hidden=8)
    args = make_args(
        tmp_path,
        sam_mode="wsam",
        sam_rho=0.05,
        wsam_gamma=0.6,
        wsam_decouple=decouple,
        optim_args="momentum=0.9",
        max_steps=4,
    )
    SequentialTrainer(model=model, args=args, train_dataset=ds).train()
    ref = OneTensorNet(hidden=8)
    opt = peers.WSAM(
        ref, ref.parameters(), torch.optim.SGD, rho=0.05, gamma=0.6, decouple=decouple, lr=0.1, momentum=0.9
    )
    _drive(opt, ref, batches(ds, 4))
    assert max_abs_diff(params_of(model), params_of(ref)) < 1e-8


def test_wsam_decoupling_matters_with_momentum(tmp_path):
    ds = image_dataset(16)
    out = []
    for decouple in (True, False):
        model = tiny_vit()
        SequentialTrainer(
            model=model,
            args=make_args(tmp_path, sam_mode="wsam", wsam_decouple=decouple, max_steps=3, optim_args="momentum=0.9"),
            train_dataset=ds,
        ).train()
        out.append(params_of(model))
    assert max_abs_diff(*out) > 1e-4


# ---------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "flags",
    [
        {"sam_mode": "past_fsam", "past_fsam_overlap": 0.5},
        {"sam_mode": "looksam", "looksam_interval": 3},
        {"sam_mode": "wsam"},
    ],
    ids=["past_fsam-overlap", "looksam", "wsam"],
)
def test_resume_is_bit_exact(tmp_path, flags):
    """2 steps + checkpoint + 2 steps equals 4 uninterrupted steps: g̃ₜ₋₁, ḡ and the overlap window's batches
    (past-FSAM), g_v (LookSAM, whose step 3 reuses the g_v of step 0) travel in the checkpoint."""
    ds = image_dataset(20)
    common = dict(
        optim="adamw_torch",
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        max_steps=4,
        save_steps=2,
        save_strategy="steps",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        seed=7,
        **flags,
    )
    full = LLQRSAMTrainer(model=tiny_vit(dropout=0.1), args=make_args(tmp_path / "full", **common), train_dataset=ds)
    full.train()
    resumed = LLQRSAMTrainer(
        model=tiny_vit(seed=5, dropout=0.1), args=make_args(tmp_path / "res", **common), train_dataset=ds
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert all(torch.equal(a, b) for a, b in zip(params_of(full.model), params_of(resumed.model), strict=True))
    assert full.sam_state.buffers.keys() == resumed.sam_state.buffers.keys()
    for kind, buffers in full.sam_state.buffers.items():
        assert all(torch.equal(t, resumed.sam_state.buffers[kind][n]) for n, t in buffers.items())
    if flags["sam_mode"] == "past_fsam":
        assert len(full.sam_state.batches) == len(resumed.sam_state.batches) == 1
        assert set(full.sam_state.buffers) == {"gbar", "g_last"}


def test_model_card_lists_the_borrowed_fsam_flags(tmp_path):
    from hf_llqrsam.card import method_card_section

    section = method_card_section(make_args(tmp_path, sam_mode="past_fsam", past_fsam_overlap=0.5, fsam_beta=0.8))
    assert "PAST_FSAM (rho=0.1)" in section
    assert all(f"- {k}" in section for k in ("past_fsam_overlap: 0.5", "fsam_beta: 0.8", "fsam_sigma", "fsam_ema"))
    assert "fsam_init" not in section and "looksam" not in section
