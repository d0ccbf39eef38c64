"""recipes/benchmarks/bench_label_noise.py and its modules (recipes/benchmarks/label_noise/): the plain loop against
LLQRSAMTrainer (the oracle), and a smoke run."""

import json
import os

import datasets
import pytest
import torch

from hf_llqrsam import LLQRConfig, LLQRPreconditioner
from hf_llqrsam.data import curvature_indices
from recipes.benchmarks import bench_label_noise as bench
from recipes.benchmarks.label_noise import data, loop, protocol, report
from tests.utils import SequentialTrainer, make_args, max_abs_diff, params_of

TOL = 1e-6


def _data(n: int = 16, d: int = 6, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _mlp(seed: int = 0) -> data.MLP:
    torch.manual_seed(seed)
    return data.MLP(6, 3, width=8)


CASES = [
    ("sam", {"sam_mode": "sam"}, protocol.Method("sam"), None),
    ("llqr_sam", {"sam_mode": "sam", "llqr": True}, protocol.Method("sam", llqr=True), {}),
    (
        "llqr_sam_fast",
        {"sam_mode": "sam", "llqr": True, "llqr_inner_lr": 0.05, "llqr_ema_decay": 0.5},
        protocol.Method("sam", llqr=True),
        {"inner_lr": 0.05, "ema_decay": 0.5},
    ),
    ("llqr_fsam", {"sam_mode": "fsam", "llqr": True}, protocol.Method("fsam", llqr=True), {}),
    ("looksam", {"sam_mode": "looksam", "looksam_interval": 2}, protocol.Method("looksam"), None),
    ("wsam", {"sam_mode": "wsam"}, protocol.Method("wsam"), None),
    ("wsam_coupled", {"sam_mode": "wsam", "wsam_decouple": False}, protocol.Method("wsam"), None),
    ("past_fsam", {"sam_mode": "past_fsam"}, protocol.Method("past_fsam"), None),
    ("llqr_past_fsam", {"sam_mode": "past_fsam", "llqr": True}, protocol.Method("past_fsam", llqr=True), {}),
]


@pytest.mark.parametrize(("name", "trainer_kw", "method", "llqr_kw"), CASES, ids=[c[0] for c in CASES])
def test_loop_equals_trainer(tmp_path, name, trainer_kw, method, llqr_kw):
    """The benchmark's loop and LLQRSAMTrainer take the same steps (LLQR: U refreshed before every step)."""
    x, y = _data()
    bs, steps, rho, lr = 4, 3, 0.3, 0.1
    llqr_args = {}
    if llqr_kw is not None:
        llqr_args = dict(llqr_update_interval=1, llqr_batch_size=8, llqr_inner_steps=5, llqr_shift_labels="false")
    args = make_args(
        tmp_path,
        sam_rho=rho,
        max_steps=steps,
        per_device_train_batch_size=bs,
        learning_rate=lr,
        optim="sgd",
        **trainer_kw,
        **llqr_args,
    )
    ds = datasets.Dataset.from_dict({"x": x.tolist(), "labels": y.tolist()}).with_format("torch")
    trained = _mlp()
    trainer = SequentialTrainer(model=trained, args=args, train_dataset=ds)
    trainer.train()

    ours = _mlp()
    assert max_abs_diff(params_of(ours), params_of(_mlp())) == 0
    cfg = None
    if llqr_kw is not None:
        cfg = LLQRConfig(update_interval=1, batch_size=8, inner_steps=5, **llqr_kw)
    batches = [torch.arange(i * bs, (i + 1) * bs) for i in range(steps)]
    optimizer = torch.optim.SGD(list(ours.parameters()), lr=lr)
    info = loop.train(
        ours,
        method,
        optimizer,
        rho,
        batches,
        x,
        y,
        llqr=cfg,
        curvature_indices=lambda step: curvature_indices(args.seed, step, len(x), 8),
        looksam_interval=2 if method.sam_mode == "looksam" else None,
        sam_kwargs={"wsam_decouple": False} if name == "wsam_coupled" else None,
    )
    assert info["skipped"] == 0
    if cfg is not None:
        assert info["refreshes"] == steps == trainer.preconditioner.num_updates
        d_ours = torch.cat([p.flatten() for p in info["preconditioner"].structure.diagonal_parts()])
        d_trainer = torch.cat([p.flatten() for p in trainer.preconditioner.structure.diagonal_parts()])
        assert float((d_ours - d_trainer).abs().max()) < TOL
        assert float((d_ours - 1).abs().max()) > 1e-6  # U moved: the comparison is not trivially at U = I
    assert max_abs_diff(params_of(ours), params_of(trained)) < TOL
    assert max_abs_diff(params_of(ours), params_of(_mlp())) > 1e-3  # the steps did something


def test_noise_draw_fixed_and_recorded():
    torch.manual_seed(0)
    a = data.load_task("digits", 0.4)
    data.load_task.cache_clear()
    torch.manual_seed(1)  # the training seed does not enter the noise draw
    b = data.load_task("digits", 0.4)
    assert a is not b and torch.equal(a.y_train, b.y_train) and a.record == b.record
    assert a.record["noise_seed"] == data.NOISE_SEED
    assert a.record["flipped"] == round(0.4 * len(a.y_train))
    assert float((a.y_train != a.y_train_clean).double().mean()) == pytest.approx(0.4, abs=1e-3)  # all flipped
    assert torch.equal(a.y_val, data.load_task("digits", 0.0).y_val)  # val and test clean, the split fixed
    assert torch.equal(data.load_task("digits", 0.0).y_train, a.y_train_clean)


def test_smoke(tmp_path):
    out = str(tmp_path / "out")
    summary = bench.main(
        ["--output_dir", out, "--protocol", "smoke", "--epochs", "1", "--tuning_seeds", "100", "--seeds", "0", "1"]
    )
    with open(os.path.join(out, "label_noise.json")) as f:
        saved = json.load(f)
    rec = saved["meta"]["data"]["digits|0.4"]
    assert rec["noise_seed"] == data.NOISE_SEED and rec["flipped"] == 431 and rec["sizes"]["train"] == 1078
    assert rec["noisy_labels_sha"] == data.load_task("digits", 0.4).record["noisy_labels_sha"]
    assert len(saved["runs"]) == 2 + 2 + 2  # sam: 2 grid points x 1 tuning seed, then base and sam on seeds 0, 1
    rows = summary["digits|0.4|sgd"]
    assert set(rows) == {"base", "sam"} and len(rows["sam"]["test"]) == 2
    assert len(rows["base"]["diff_vs_sam"]) == 3
    with open(os.path.join(out, "label_noise.md")) as f:
        md = f.read()
    assert "| sam |" in md and "diff vs SAM" in md
    # resumable: a second call runs nothing new
    bench.main(
        ["--output_dir", out, "--protocol", "smoke", "--epochs", "1", "--tuning_seeds", "100", "--seeds", "0", "1"]
    )
    with open(os.path.join(out, "label_noise.json")) as f:
        assert json.load(f)["runs"] == saved["runs"]
    # another output dir merging this one's runs runs nothing itself, and a disagreeing run is refused
    other = str(tmp_path / "other")
    bench.main(
        [
            "--output_dir",
            other,
            "--merge_from",
            out,
            "--protocol",
            "smoke",
            "--epochs",
            "1",
            "--tuning_seeds",
            "100",
            "--seeds",
            "0",
            "1",
            "--report_only",
        ]
    )
    with open(os.path.join(other, "label_noise.json")) as f:
        assert json.load(f)["runs"] == saved["runs"]
    key = next(iter(saved["runs"]))
    saved["runs"][key]["test_acc"] += 0.5
    with open(os.path.join(out, "label_noise.json"), "w") as f:
        json.dump(saved, f)
    with pytest.raises(ValueError, match="disagrees"):
        bench.main(
            ["--output_dir", other, "--merge_from", out, "--protocol", "smoke", "--epochs", "1", "--report_only"]
        )


def test_llqr_alone_tunes_its_inner_lr():
    """LLQR alone's tuned value is its inner lr (no ρ); the other arms keep theirs."""
    cell = protocol.Cell("digits", 0.4, "sgd", ("llqr",))
    assert protocol.grid_for(cell, "llqr", 0) == protocol.INNER_LR_GRID
    assert protocol.llqr_config(protocol.METHODS["llqr"], hp_value=3e-3).inner_lr == 3e-3
    assert protocol.llqr_config(protocol.METHODS["llqr_sam_lr01"], hp_value=3e-3).inner_lr == 0.01  # ρ arm: untouched
    assert protocol.grid_for(cell, "base", 0) == (0.0,) and not protocol.METHODS["base"].tuned


def test_recipe_vit_is_the_recipes_model():
    """digits_vit trains the image recipe's default ViT (its ModelArguments and build_model) on 16x16 RGB input."""
    from recipes.image_classification.run_image_classification import ModelArguments

    torch.manual_seed(0)
    model = data.MODELS["digits_vit"](64, 10)
    cfg, args = model.vit.config, ModelArguments()
    assert (cfg.image_size, cfg.patch_size, cfg.hidden_size, cfg.num_hidden_layers) == (
        args.image_size,
        args.patch_size,
        args.hidden_size,
        args.num_hidden_layers,
    )
    x = data.load_task("digits_vit", 0.4).x_train[:5]
    assert model(x).shape == (5, 10)
    seen = {}
    model.vit.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    model(x)
    pix = seen["pixel_values"]
    assert pix.shape == (5, 3, 16, 16) and float(pix.min()) >= -1 and float(pix.max()) <= 1
    assert torch.equal(pix[:, 0], pix[:, 2])


def test_knob_selection_picks_best_validation_arm():
    """ "Knobs chosen on validation": the LLQR+SAM arm of best tuning validation, its budget the arms' sum."""

    def row(val, test):
        return {
            "rho": 0.5,
            "val_curve": {0.3: val - 0.1, 0.5: val},
            "tuning_runs": 4,
            "test": test,
            "diff_vs_sam": (test[0] - 0.9, 0.0, 0.0),
        }

    summary = {"c": {"sam": row(0.9, [0.9]), "llqr_sam": row(0.91, [0.95]), "llqr_sam_cg": row(0.93, [0.85])}}
    sel = report.knob_selection(summary)["c"]
    assert sel["arm"] == "llqr_sam_cg" and sel["tuning_runs"] == 8 and sel["sam_tuning_runs"] == 4
    assert report.knob_selection({"c": {"sam": row(0.9, [0.9]), "llqr_sam": row(0.91, [0.95])}}) == {}  # one arm


def test_knob_arms_configs():
    """The knob arms' overrides reach LLQRConfig; an arm's own cadence replaces LLQR_INTERVAL."""
    assert protocol.llqr_config(protocol.METHODS["llqr_sam"]).update_interval == protocol.LLQR_INTERVAL
    assert protocol.llqr_config(protocol.METHODS["llqr_sam_e20"]).update_interval == 20
    cfgs = {arm: protocol.llqr_config(protocol.METHODS[arm]) for arm in protocol.KNOB_ARMS}
    assert cfgs["llqr_sam_newton"].divergence == "newton" and cfgs["llqr_sam_newton"].ema_decay == 0.9
    assert cfgs["llqr_sam_kfac"].structure == "kfac" and cfgs["llqr_sam_cg"].inner_solver == "cg"
    cfgs.update({arm: protocol.llqr_config(protocol.METHODS[arm]) for arm in protocol.KNOB_ARMS_2})
    assert cfgs["llqr_sam_ema05"].ema_decay == 0.5 and cfgs["llqr_sam_ema05"].inner_lr == 1e-3  # one knob at a time
    assert cfgs["llqr_sam_lr01"].inner_lr == 0.01 and cfgs["llqr_sam_lr01"].ema_decay == 0.95
    lrsched = cfgs["llqr_sam_lrsched"]
    assert lrsched.inner_lr_schedule == "cosine" and lrsched.ema_schedule == "constant"
    assert cfgs["llqr_sam_emawarm"].ema_schedule == "warmup" and cfgs["llqr_sam_emawarm"].update_interval == 100
    assert cfgs["llqr_sam_cg_pr"].cg_beta == "polak_ribiere" and cfgs["llqr_sam_renyi"].divergence == "renyi"
    assert {cfgs[a].structure for a in ("llqr_sam_ekfac", "llqr_sam_psd_ekfac")} == {"ekfac", "psd_ekfac"}
    pre = LLQRPreconditioner(_mlp(), cfgs["llqr_sam_sched"])
    assert [k for k in range(301) if pre.is_due(k)] == [*range(0, 100, 10), 100, 200, 300]  # 10 to step 100, then 100


def test_cg_polak_ribiere_is_the_reference_cg_on_the_benchmark_mlp():
    """The README's claim for the CG-PR arm: on the benchmark's MLP and data, the first refresh with the Polak-Ribiere
    β gives exactly the reference CG's U (the raw PR β is never positive there, so PR+ clips it to 0)."""
    task = data.load_task("digits", 0.4)
    batch = {"x": task.x_train[:64], "labels": task.y_train[:64]}
    us = []
    for beta in ("reference", "polak_ribiere"):
        torch.manual_seed(0)
        model = data.MLP()
        pre = LLQRPreconditioner(model, LLQRConfig(inner_solver="cg", cg_beta=beta))
        pre.update(model, batch, step=0)
        us.append(torch.cat([p.flatten() for p in pre.structure.diagonal_parts()]))
    assert float((us[0] - 1).abs().max()) > 1e-2  # U moved
    assert torch.equal(us[0], us[1])
