"""Launches that would silently do something else are refused, naming the flag (docs/integration.md §14.1).

- Several processes (torchrun / accelerate launch) that the Trainer runs as independent non-DDP trainings, because
  `use_cpu` is missing on a machine without GPUs: a `LaunchError` (a `ValueError`) at trainer init saying to pass
  `--use_cpu`, which the recipes print once, from rank 0, as one line (checked with a real torchrun launch).
- `--bf16` on a CPU-only machine without `--use_cpu`: transformers' own `ValueError`, which names `use_cpu`; with
  `--use_cpu` it builds (bf16 autocast on CPU, tested in `integration/test_mixed_precision.py`).
"""

import os
import subprocess
import sys

import pytest
import torch
from transformers.training_args import ParallelMode

import hf_llqrsam.compat as compat
from hf_llqrsam import LLQRSAMTrainer, LLQRSAMTrainingArguments
from hf_llqrsam.args import parse_args
from tests.utils import REPO, image_dataset, make_args, tiny_vit

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only behaviour")


@CPU_ONLY
@pytest.mark.parametrize("sam_mode", ["none", "sam"])
def test_independent_processes_are_refused_naming_use_cpu(tmp_path, monkeypatch, sam_mode):
    """WORLD_SIZE=2 (as torchrun sets it) with arguments built without use_cpu: parallel_mode is NOT_PARALLEL."""
    args = make_args(tmp_path, use_cpu=False, sam_mode=sam_mode)
    assert args.parallel_mode == ParallelMode.NOT_PARALLEL
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        compat.LaunchError, match=r"Invalid launch: 2 processes .* independent, non-DDP .* pass --use_cpu"
    ):
        LLQRSAMTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(8))


@CPU_ONLY
def test_an_initialised_process_group_is_detected_too(tmp_path, monkeypatch):
    args = make_args(tmp_path, use_cpu=False)
    compat.validate_launch(args)  # one process: fine
    monkeypatch.setattr(compat.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(compat.dist, "get_world_size", lambda *a, **k: 2)
    with pytest.raises(compat.LaunchError, match=r"WORLD_SIZE=1, process group of 2\).*--use_cpu"):
        compat.validate_launch(args)


def test_single_process_and_real_ddp_pass(tmp_path, monkeypatch):
    compat.validate_launch(make_args(tmp_path))  # WORLD_SIZE unset
    args = make_args(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(type(args), "parallel_mode", property(lambda self: ParallelMode.DISTRIBUTED))
    compat.validate_launch(args)


@CPU_ONLY
def test_bf16_on_cpu_needs_use_cpu(tmp_path, capsys):
    with pytest.raises(ValueError, match="You need to assign use_cpu"):
        LLQRSAMTrainingArguments(output_dir=str(tmp_path), report_to="none", bf16=True, sam_mode="sam")
    with pytest.raises(SystemExit) as info:
        parse_args(LLQRSAMTrainingArguments, ["--output_dir", str(tmp_path), "--bf16", "--sam_mode", "sam"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "use_cpu" in err and len(err.strip().splitlines()) == 1
    args = LLQRSAMTrainingArguments(output_dir=str(tmp_path), report_to="none", bf16=True, use_cpu=True)
    assert args.bf16 and args.device.type == "cpu"


@pytest.mark.parametrize("rank", ["0", "1", None])
def test_launch_errors_exit_prints_once_from_rank_0(monkeypatch, capsys, rank):
    """Every rank exits 2 without a traceback; only global rank 0 (or a process without RANK) prints the line."""
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(sys, "argv", ["run_x.py"])
    with pytest.raises(SystemExit) as info, compat.launch_errors_exit():
        raise compat.LaunchError("Invalid launch: pass --use_cpu")
    assert info.value.code == 2 and info.value.__suppress_context__  # raised `from None`: no chained traceback
    expected = "" if rank == "1" else "run_x.py: error: Invalid launch: pass --use_cpu\n"
    assert capsys.readouterr() == ("", expected)
    with pytest.raises(ValueError, match="other"), compat.launch_errors_exit():  # other errors pass through
        raise ValueError("other")


@CPU_ONLY
@pytest.mark.distributed
def test_torchrun_without_use_cpu_prints_one_line_from_rank_0(tmp_path):
    """The README's torchrun launch of the image recipe without --use_cpu: the ranks exit 2, the error is printed
    once, and no traceback of a recipe process is printed (torchrun's own ChildFailedError report remains: it
    prints one for any child that exits non-zero)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["recipes/image_classification/run_image_classification.py", "--output_dir", str(tmp_path / "run")]
    cmd += ["--sam_mode", "sam", "--max_steps", "1", "--report_to", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "exitcode  : 2 " in out, out[-6000:]  # the other rank may get SIGTERM first
    assert out.count("run_image_classification.py: error: Invalid launch: 2 processes were started") == 1, out
    assert "pass --use_cpu" in out
    assert out.count("Traceback (most recent call last)") == out.count("errors.ChildFailedError:") == 1, out
    assert "LaunchError" not in out and 'run_image_classification.py", line' not in out, out
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing trained or saved


@pytest.mark.parametrize(
    ("overrides", "warns"),
    [
        ({"optim": "sgd", "sam_mode": "sam"}, True),
        ({"optim": "sgd", "sam_mode": "sam", "optim_args": "momentum=0.0,nesterov=False"}, True),
        ({"optim": "sgd", "sam_mode": "sam", "optim_args": "momentum=0.9"}, False),
        ({"optim": "sgd", "sam_mode": "none"}, False),
        ({"optim": "sgd", "sam_mode": "none", "llqr": True}, False),
        ({"optim": "adamw_torch", "sam_mode": "sam"}, False),
    ],
)
def test_sgd_without_momentum_under_sam_warns_once_naming_optim_args(tmp_path, monkeypatch, overrides, warns):
    """The Trainer's SGD gets momentum only from optim_args. Once per process, whatever the filters: two argument
    objects and the trainer's re-check of one give one warning."""
    import warnings

    from hf_llqrsam.args import validate_llqrsam_args

    monkeypatch.setattr(compat, "_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            args = make_args(tmp_path, **overrides)
            validate_llqrsam_args(args)
    messages = [str(w.message) for w in caught if "momentum=0" in str(w.message)]
    assert len(messages) == int(warns), messages
    if warns:
        assert '--optim_args "momentum=0.9"' in messages[0] and f"sam_mode={args.sam_mode!r}" in messages[0]
