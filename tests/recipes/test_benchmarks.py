"""The cost benchmark's entry point in a tiny configuration: it runs and writes its files and keys.

The benchmark itself is not a test: its numbers go into the README, with the command that produced them.
"""

import argparse
import json

import pytest

from recipes.benchmarks.bench_cost import _measure_peak, main


def test_cost_benchmark_tiny(tmp_path):
    out = main(
        [
            "--output_dir",
            str(tmp_path),
            "--models",
            "vit-s",
            "--variants",
            "base,sam,hand_sam,llqr_sam",
            "--batch_size",
            "4",
            "--llqr_batch_size",
            "4",
            "--steps",
            "1",
            "--rounds",
            "2",
            "--warmup",
            "1",
            "--refreshes",
            "1",
            "--scaling_widths",
            "",
            "--no_memory",
        ]
    )
    saved = json.loads((tmp_path / "cost.json").read_text())
    rows = saved["models"]["vit-s"]["variants"]
    assert rows.keys() == {"base", "sam", "hand_sam", "llqr_sam"}
    assert rows["base"]["ratio_to_base"] == 1.0
    assert len(out["models"]["vit-s"]["variants"]["sam"]["step_s_all_rounds"]) == 2
    llqr = rows["llqr_sam"]
    refresh_cost = llqr["refresh_in_base_steps"] * rows["base"]["step_s"]  # in base steps timed around it
    assert llqr["amortised_step_s"] == pytest.approx(llqr["step_s"] + refresh_cost / 1000, rel=1e-12)
    assert llqr["refresh_in_base_steps"] > 0
    targets = saved["targets"]
    trainer_over_hand = rows["sam"]["step_s"] / rows["hand_sam"]["step_s"]
    assert targets["Trainer SAM / hand-written SAM loop"]["vit-s"] == trainer_over_hand
    assert targets["LLQR+SAM / SAM, amortised at E"]["vit-s"] == llqr["amortised_step_s"] / rows["sam"]["step_s"]
    assert "peak memory LLQR+SAM (diagonal) / base" not in targets  # --no_memory
    table = (tmp_path / "cost.md").read_text()
    assert "| vit-s |" in table and "| SAM step / base step |" in table
    assert (tmp_path / "cost.png").stat().st_size > 5_000


def test_peak_memory_counts_the_sam_backup():
    args = argparse.Namespace(output_dir="/tmp", batch_size=2, llqr_batch_size=4, bf16=False, device="cpu")
    base, sam = _measure_peak("vit-s", "base", args), _measure_peak("vit-s", "sam", args)
    assert sam > base > 0


def test_quality_benchmark_tiny(tmp_path):
    from recipes.benchmarks.bench_quality import main as quality

    tiny = (
        "--max_steps 2 --hidden_size 16 --num_hidden_layers 1 --num_attention_heads 2 --intermediate_size 32 "
        "--do_train --do_predict --max_train_samples 32 --max_predict_samples 32"
    )
    report = quality(
        ["--recipe", "image", "--output_dir", str(tmp_path), "--methods", "sam", "--seeds", "0", "--extra", tiny]
    )
    assert 0.0 <= report["results"]["sam"][0]["metric"] <= 1.0
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["metric"] == "test_accuracy" and len(saved["results"]["sam"]) == 1
    assert "| sam |" in (tmp_path / "quality.md").read_text() and (tmp_path / "quality.png").exists()


def test_profile_tiny(tmp_path):
    from recipes.benchmarks.profile_cost import main as profile_main

    out = profile_main(
        ["--output_dir", str(tmp_path), "--model", "vit-s", "--batch_size", "4", "--inner_steps", "2", "--reps", "1"]
    )
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert saved["sam_work"]["tensors"] == 40 and saved["sam_work"]["ours_ms"] > 0 < saved["sam_work"]["hand_ms"]
    refresh = out["refresh"]
    assert refresh["refresh_s"] == pytest.approx(refresh["build_s"] + refresh["products_s"] + refresh["rest_s"])
    assert saved["jv"]["double_vjp_ms"] > 0 and saved["jv"]["forward_mode_ms"] > 0
    assert "linearize_ms" in saved["jv"] or "linearize_error" in saved["jv"]
    assert saved["jv"]["forward_vs_double_vjp_rel_err"] < 1e-4  # both compute the same Jv


def test_cost_benchmark_looksam_and_wsam_rows(tmp_path):
    """LookSAM is timed over whole cycles of k = 5 steps (one full step each), reported per optimizer step."""
    main(
        [
            "--output_dir",
            str(tmp_path),
            "--models",
            "vit-s",
            "--variants",
            "base,sam,looksam,wsam",
            "--batch_size",
            "2",
            "--steps",
            "1",
            "--rounds",
            "1",
            "--warmup",
            "1",
            "--scaling_widths",
            "",
            "--no_memory",
        ]
    )
    saved = json.loads((tmp_path / "cost.json").read_text())
    rows, targets = saved["models"]["vit-s"]["variants"], saved["targets"]
    assert {"looksam", "wsam"} <= rows.keys()
    assert targets["LookSAM (k = 5) step / base step"]["vit-s"] == rows["looksam"]["step_s"] / rows["base"]["step_s"]
    assert targets["WSAM step / SAM step"]["vit-s"] == rows["wsam"]["step_s"] / rows["sam"]["step_s"]


@pytest.mark.parametrize("shape", [(7,), (8, 3), (1, 5), (50257, 768), (3, 2, 2), ()])
@pytest.mark.parametrize("world_size", [2, 8, 64])
def test_fsdp2_shard_size_is_the_first_chunk(shape, world_size):
    """FSDP2 gives every rank dim-0 chunk 0's size (`torch.chunk`, the last ranks padded): the table counts that."""
    import torch

    from recipes.benchmarks.fsdp2_memory_table import shard_entries

    full = torch.empty(shape)
    expected = torch.chunk(full, world_size, dim=0)[0].numel() if full.dim() else 1
    assert shard_entries(torch.Size(shape), world_size) == expected


def test_fsdp2_memory_table_rows(tmp_path):
    """The memory-per-rank table's models and the DDP row: one fp32 U per parameter (4 bytes each). That the docs
    page prints this script's table is checked in tests/unit/test_docs.py."""
    from recipes.benchmarks.fsdp2_memory_table import main as memory_table

    rows = memory_table(["--output_dir", str(tmp_path)])
    assert [r["parameters"] for r in rows] == [86_567_656, 124_439_808]
    assert rows[0]["ddp_u_mib"] == pytest.approx(4 * 86_567_656 / 2**20)


def test_looksam_peer_check_tiny(tmp_path):
    """The LookSAM peer check runs its three arms from the same weights and writes the windowed losses."""
    pytest.importorskip("pytorch_optimizer")
    from recipes.benchmarks.looksam_peer_check import main as peer_check

    report = peer_check(["--output_dir", str(tmp_path), "--steps", "4", "--window", "2"])
    means = report["mean_loss_per_window"]
    assert means.keys() == {"adamw", "sam", "looksam"} and all(len(v) == 2 for v in means.values())
    assert means["sam"][0] == pytest.approx(means["adamw"][0], rel=0.05)  # the same start, the same first batches
    assert json.loads((tmp_path / "looksam_peer_check.json").read_text())["steps"] == 4
