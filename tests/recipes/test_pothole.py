"""The pothole toy's escape contract (docs/algorithm.md T-POT) on one seed, through the project's perturbation code."""

import json
import os

from recipes.pothole.run_pothole import ETA, KAPPA, Y_STAR, main


def test_pothole_constants_match_the_spec():
    assert abs(Y_STAR - 1.942796) < 1e-6 and abs(KAPPA - 4.7699) < 1e-4 and abs(ETA - 0.07547) < 1e-5


def test_only_llqr_sam_escapes(tmp_path):
    # 2000 steps: every non-escaping method keeps running to the cap, LLQR+SAM must escape within 200.
    out = main(["--output_dir", str(tmp_path), "--seeds", "1", "--max_steps", "2000"])
    assert out["llqr_sam"]["escaped"] == [True] and out["llqr_sam"]["steps"][0] <= 200
    for name in ("gd", "sam", "llqr", "sam_lr5", "gd_lr5"):
        assert out[name]["escaped"] == [False], name
    assert out["extras"]["llqr_sam_zero_noise"]["escaped"]  # round-off alone supplies the direction
    radius = out["extras"]["flat_basin_max_radius"]
    assert radius["llqr_sam"] < 1e-2 and radius["llqr_sam"] < radius["sam"]  # the wide basin stays stable
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) >= {"gd", "sam", "llqr", "llqr_sam", "sam_lr5", "gd_lr5"}
    assert set(saved["llqr_sam"]) == {"escaped", "steps", "path_length"}
    assert os.path.getsize(tmp_path / "trajectories.png") > 10_000 and (tmp_path / "results.md").exists()
