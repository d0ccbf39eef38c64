"""The plumbing of recipes/benchmarks/fsdp2_gpu.py (the GPU measurement of FSDP2, issue 11 item 4) on CPU: one tiny
causal LM with LLQR+SAM under both backend labels, then the table. The GPU numbers themselves need a lent GPU."""

import json

from recipes.benchmarks import fsdp2_gpu


def test_cpu_smoke_writes_results_and_the_table(tmp_path):
    for backend in ("fsdp2", "ddp"):
        fsdp2_gpu.main(
            [
                "--cpu_smoke",
                "--model",
                "tiny-lm",
                "--variants",
                "llqr_sam",
                "--steps",
                "2",
                "--backend",
                backend,
                "--output_dir",
                str(tmp_path),
            ]
        )
    rows = json.loads((tmp_path / "fsdp2-tiny-lm.json").read_text())
    assert [r["variant"] for r in rows] == ["llqr_sam"]
    llqr = rows[0]
    assert llqr["u_bytes_per_rank"] == 4 * llqr["params"] and len(llqr["losses"]) == 2 and llqr["refresh_seconds"]
    table = fsdp2_gpu.report(str(tmp_path))
    line = next(row for row in table.splitlines() if row.startswith("| tiny-lm | llqr_sam |"))
    assert line.endswith("| 0.00e+00 |")  # the same single-process run under both labels: the same losses
    assert (tmp_path / "fsdp2_gpu.md").read_text() == table
