"""Drop-in contract: what a stock-Trainer user relies on holds with our classes (issue 22).

Here: a save killed half-way is skipped on resume, by the recipes' auto-resume and by
`resume_from_checkpoint=True` (item 8), and a checkpoint whose SAM state does not fit the model is refused before any
step runs (item 7). Both through real checkpoints on disk; the kill is a real SIGKILL of a training process.
"""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers.trainer_utils import get_last_checkpoint

from hf_llqrsam import LLQRSAMTrainer
from hf_llqrsam.checkpoint import STATE_FILE, LLQRSAMStateError, last_complete_checkpoint
from recipes import recipe_utils
from tests.utils import REPO, image_dataset, make_args, params_of, tiny_vit

# a random sampler over 16 examples in batches of 4: step 5 starts the second epoch, so resuming at step 2 must
# skip the right batches as well
KILL_ARGS = {
    "sam_mode": "sam",
    "sam_rho": 0.05,
    "save_strategy": "steps",
    "save_steps": 2,
    "max_steps": 6,
    "seed": 7,
    "do_train": True,
}

# The child trains with the real Trainer; the save of checkpoint-4 stops after the weights and the optimizer are
# written (before trainer_state.json and llqrsam_state.pt), says so with a marker file and waits to be killed.
CHILD = """
import json, sys, time
from transformers import Trainer
from hf_llqrsam import LLQRSAMTrainer
from tests.utils import image_dataset, make_args, tiny_vit

out, marker, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
save = Trainer._save_optimizer_and_scheduler

def save_then_hang(self, output_dir):
    save(self, output_dir)
    if self.state.global_step == 4:
        open(marker, "w").close()
        time.sleep(600)

Trainer._save_optimizer_and_scheduler = save_then_hang
LLQRSAMTrainer(model=tiny_vit(), args=make_args(out, **kwargs), train_dataset=image_dataset(16)).train()
"""


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """An output dir with checkpoint-2 complete and checkpoint-4 from a save killed half-way (SIGKILL)."""
    base = tmp_path_factory.mktemp("killed")
    out, marker = base / "out", base / "saving"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out), str(marker), json.dumps(KILL_ARGS)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 600
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the child ended ({proc.returncode}) before the save:\n{proc.stdout.read()}")
            if time.monotonic() > deadline:
                raise AssertionError("the child did not reach the save of checkpoint-4 in 600 s")
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return out


def _full_run(tmp_path) -> list[torch.Tensor]:
    full = LLQRSAMTrainer(
        model=tiny_vit(), args=make_args(tmp_path / "full", **KILL_ARGS), train_dataset=image_dataset(16)
    )
    full.train()
    return params_of(full.model)


def test_a_save_killed_half_way_is_skipped_by_the_recipes_auto_resume(tmp_path, killed_run, caplog):
    out = tmp_path / "out"
    shutil.copytree(killed_run, out)
    killed, complete = out / "checkpoint-4", out / "checkpoint-2"
    assert (killed / "model.safetensors").is_file() and (killed / "optimizer.pt").is_file()
    assert not (killed / "trainer_state.json").exists() and not (killed / STATE_FILE).exists()
    assert get_last_checkpoint(str(out)) == str(killed)  # what stock resume (and the recipes, before) picked

    args = make_args(out, **KILL_ARGS)
    with caplog.at_level("WARNING"):
        found = recipe_utils.last_checkpoint(logging.getLogger("recipe"), args)
    assert found == str(complete) == last_complete_checkpoint(str(out))
    assert f"{killed} (no trainer_state.json: its save was interrupted)" in caplog.text

    resumed = LLQRSAMTrainer(model=tiny_vit(seed=99), args=args, train_dataset=image_dataset(16))
    resumed.train(resume_from_checkpoint=found)
    assert resumed.state.global_step == 6
    full = _full_run(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(full, params_of(resumed.model), strict=True))  # bit-exact
    assert (killed / "trainer_state.json").is_file()  # the resumed run saved step 4 again, completely


def test_resume_from_checkpoint_true_skips_a_save_killed_half_way(tmp_path, killed_run):
    out = tmp_path / "out"
    shutil.copytree(killed_run, out)
    resumed = LLQRSAMTrainer(
        model=tiny_vit(seed=99), args=make_args(out, **KILL_ARGS), train_dataset=image_dataset(16)
    )
    resumed.train(resume_from_checkpoint=True)
    assert all(torch.equal(a, b) for a, b in zip(_full_run(tmp_path), params_of(resumed.model), strict=True))


@pytest.mark.parametrize("poison", ["broadcastable", "another-model"])
def test_a_sam_state_that_does_not_fit_the_model_is_refused_before_any_step(tmp_path, poison):
    """An FSAM gbar of a broadcastable wrong shape was broadcast into the descent; one keyed by another model's
    parameter names silently restarted at zero. Both are refused, naming the file, before any step runs."""
    kwargs = {"sam_mode": "fsam", "save_strategy": "steps", "save_steps": 2, "max_steps": 4}
    first = LLQRSAMTrainer(
        model=tiny_vit(), args=make_args(tmp_path / "run", **kwargs), train_dataset=image_dataset(16)
    )
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    path = checkpoint / STATE_FILE
    state = torch.load(path, weights_only=True)
    gbar = state["sam"]["buffers"]["gbar"]
    name = next(n for n, t in gbar.items() if t.dim() == 2 and t.shape[0] > 1)
    if poison == "broadcastable":
        gbar[name] = gbar[name][:1].clone()
    else:
        state["sam"]["buffers"]["gbar"] = {f"encoder.{n}": t for n, t in gbar.items()}
    torch.save(state, path)
    resumed = LLQRSAMTrainer(
        model=tiny_vit(seed=99), args=make_args(tmp_path / "again", **kwargs), train_dataset=image_dataset(16)
    )
    with pytest.raises(LLQRSAMStateError, match=re.escape(str(path.resolve()))):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    saved = type(resumed.model).from_pretrained(checkpoint).state_dict()  # applies 5.x's legacy-name renames
    live = resumed.model.state_dict()
    assert saved.keys() == live.keys()
    assert all(torch.equal(live[k], t) for k, t in saved.items())  # the checkpoint's weights: no step ran
