"""Launches that would silently do something else are refused, naming the flag (docs/integration.md §14.1).

- Several processes (torchrun / accelerate launch) that the Trainer runs as independent non-DDP trainings, because
  `use_cpu` is missing on a machine without GPUs: a `ValueError` at trainer init saying to pass `--use_cpu`.
- `--bf16` on a CPU-only machine without `--use_cpu`: transformers' own `ValueError`, which names `use_cpu`; with
  `--use_cpu` it builds (bf16 autocast on CPU, tested in `integration/test_mixed_precision.py`).
"""

import pytest
import torch
from transformers.training_args import ParallelMode

import hf_llqrsam.compat as compat
from hf_llqrsam import LLQRSAMTrainer, LLQRSAMTrainingArguments
from hf_llqrsam.args import parse_args
from tests.utils import image_dataset, make_args, tiny_vit

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only behaviour")


@CPU_ONLY
@pytest.mark.parametrize("sam_mode", ["none", "sam"])
def test_independent_processes_are_refused_naming_use_cpu(tmp_path, monkeypatch, sam_mode):
    """WORLD_SIZE=2 (as torchrun sets it) with arguments built without use_cpu: parallel_mode is NOT_PARALLEL."""
    args = make_args(tmp_path, use_cpu=False, sam_mode=sam_mode)
    assert args.parallel_mode == ParallelMode.NOT_PARALLEL
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"Invalid launch: 2 processes .* independent, non-DDP .* pass --use_cpu"):
        LLQRSAMTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(8))


@CPU_ONLY
def test_an_initialised_process_group_is_detected_too(tmp_path, monkeypatch):
    args = make_args(tmp_path, use_cpu=False)
    compat.validate_launch(args)  # one process: fine
    monkeypatch.setattr(compat.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(compat.dist, "get_world_size", lambda *a, **k: 2)
    with pytest.raises(ValueError, match=r"WORLD_SIZE=1, process group of 2\).*--use_cpu"):
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
