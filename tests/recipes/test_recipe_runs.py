"""The ViT recipe under torchrun x2 and across a SIGKILL (issue: recipes)."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.utils import REPO, run_torchrun

WORKER = "tests/recipes/workers/vit_recipe.py"
TINY = [
    "--do_train",
    "--max_train_samples",
    "64",
    "--per_device_train_batch_size",
    "8",
    "--hidden_size",
    "16",
    "--num_hidden_layers",
    "1",
    "--num_attention_heads",
    "2",
    "--intermediate_size",
    "32",
    "--image_size",
    "8",
    "--report_to",
    "none",
    "--use_cpu",
    "--disable_tqdm",
    "true",
    "--logging_steps",
    "1",
    "--sam_mode",
    "sam",
    "--llqr",
    "--llqr_update_interval",
    "2",
    "--llqr_batch_size",
    "16",
    "--llqr_inner_steps",
    "3",
    "--max_grad_norm",
    "0",
]


@pytest.mark.distributed
def test_vit_recipe_runs_on_two_processes(tmp_path):
    run_torchrun(
        WORKER,
        "--output_dir",
        str(tmp_path),
        "--max_steps",
        "3",
        "--save_strategy",
        "no",
        "--ddp_find_unused_parameters",
        "false",
        *TINY,
    )
    assert (tmp_path / "all_results.json").exists()


def _run(output_dir, *extra, kill_after=0):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "KILL_AFTER_CHECKPOINT": str(kill_after)}
    cmd = [sys.executable, WORKER, "--output_dir", str(output_dir), "--max_steps", "6", *TINY, *extra]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    """Killed after checkpoint-4, resumed to 6: same weights and U as 6 uninterrupted steps (LLQR+SAM, E = 2).

    Random augmentation is off: on a mid-epoch resume transformers 5.23 builds the first window *before* restoring
    the RNG (`_run_epoch`, `rng_to_sync`), so random crops of that one window differ from the uninterrupted run.
    """
    full, killed = tmp_path / "full", tmp_path / "killed"
    ckpt = ["--save_strategy", "steps", "--save_steps", "2", "--random_crop_padding", "0"]
    proc = _run(full, *ckpt)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run(killed, *ckpt, kill_after=4)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (killed / "checkpoint-4").is_dir() and not (killed / "model.safetensors").exists()
    proc = _run(killed, *ckpt)  # the recipe resumes from the newest checkpoint in --output_dir
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    u_full = torch.load(full / "checkpoint-6" / "llqrsam_state.pt", weights_only=True)["llqr"]["blocks"]
    u_res = torch.load(killed / "checkpoint-6" / "llqrsam_state.pt", weights_only=True)["llqr"]["blocks"]
    assert all(torch.equal(u_full[n][k], u_res[n][k]) for n in u_full for k in u_full[n])
