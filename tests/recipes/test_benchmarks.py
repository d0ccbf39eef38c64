"""The cost benchmark's entry point in a tiny configuration: it runs and writes its files and keys.

The benchmark itself is not a test: its numbers go into the README, with the command that produced them.
"""

import argparse
import json

from recipes.benchmarks.bench_cost import _measure_peak, main


def test_cost_benchmark_tiny(tmp_path):
    out = main(["--output_dir", str(tmp_path), "--models", "vit-s", "--variants", "base,sam,hand_sam",
                "--batch_size", "4", "--steps", "1", "--rounds", "2", "--warmup", "1", "--scaling_widths", "",
                "--no_memory"])
    saved = json.loads((tmp_path / "cost.json").read_text())
    assert saved["models"]["vit-s"]["variants"].keys() == {"base", "sam", "hand_sam"}
    assert saved["models"]["vit-s"]["variants"]["base"]["ratio_to_base"] == 1.0
    assert len(out["models"]["vit-s"]["variants"]["sam"]["step_s_all_rounds"]) == 2
    assert "| vit-s |" in (tmp_path / "cost.md").read_text()
    assert (tmp_path / "cost.png").stat().st_size > 5_000


def test_peak_memory_counts_the_sam_backup():
    args = argparse.Namespace(output_dir="/tmp", batch_size=2, llqr_batch_size=4, bf16=False, device="cpu")
    base, sam = _measure_peak("vit-s", "base", args), _measure_peak("vit-s", "sam", args)
    assert sam > base > 0
