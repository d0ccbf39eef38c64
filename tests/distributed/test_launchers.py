"""The documented CPU launch commands really run DDP (docs/integration.md §14.1).

- `accelerate launch --config_file recipes/accelerate_configs/ddp_cpu.yaml <script> --use_cpu ...`: 2 gloo ranks in
  one DDP run, equal to one process on the union batch; without `--use_cpu` the same launch fails at trainer init
  with hf_llqrsam's error instead of running 2 independent trainings.
- The multi-node torchrun rendezvous (`--nnodes 2 --rdzv_backend c10d --rdzv_endpoint HOST:PORT`), with the two
  "nodes" as two torchrun agents on this machine: one DDP run, equal to the same reference.
"""

import os
import socket
import subprocess
import sys

import pytest

from tests.utils import REPO, SequentialTrainer, image_dataset, make_args, max_abs_diff, params_of, tiny_vit

pytestmark = pytest.mark.distributed
WORKER = "tests/distributed/workers/launched_sam.py"
CONFIG = "recipes/accelerate_configs/ddp_cpu.yaml"
# as tests.utils.make_args, per rank: 2 ranks x 2 examples = the reference's batch of 4
FLAGS = [
    "--report_to",
    "none",
    "--save_strategy",
    "no",
    "--logging_steps",
    "1",
    "--per_device_train_batch_size",
    "2",
    "--learning_rate",
    "0.1",
    "--optim",
    "sgd",
    "--lr_scheduler_type",
    "constant",
    "--max_grad_norm",
    "0",
    "--weight_decay",
    "0",
    "--max_steps",
    "3",
    "--seed",
    "0",
    "--disable_tqdm",
    "true",
    "--dataloader_num_workers",
    "0",
    "--ddp_find_unused_parameters",
    "false",
    "--sam_mode",
    "sam",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, batch 4 (the union of the two ranks' batches of 2)."""
    model = tiny_vit()
    args = make_args(tmp_path_factory.mktemp("single"), sam_mode="sam", per_device_train_batch_size=4)
    SequentialTrainer(model=model, args=args, train_dataset=image_dataset(16)).train()
    return params_of(model)


def _check(out_file, reference) -> dict:
    import torch

    result = torch.load(out_file, weights_only=True)
    launch = result["launch"]
    assert launch["world_size"] == 2 and launch["parallel_mode"] == "distributed", launch
    assert launch["backend"] == "gloo" and launch["wrapper"] == "DistributedDataParallel", launch
    assert max_abs_diff(result["params"], reference) < 1e-6
    return launch


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO)


def test_accelerate_launch_with_the_cpu_config_runs_ddp(tmp_path, reference):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIG, WORKER]
    out = tmp_path / "result.pt"
    proc = _run([*launch, str(out), "--output_dir", str(tmp_path / "run"), "--use_cpu", *FLAGS])
    assert proc.returncode == 0, proc.stderr[-6000:]
    _check(out, reference)

    refused = _run([*launch, str(tmp_path / "no.pt"), "--output_dir", str(tmp_path / "no"), *FLAGS])
    assert refused.returncode != 0 and not (tmp_path / "no.pt").exists()
    assert "Invalid launch: 2 processes were started" in refused.stderr and "pass --use_cpu" in refused.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_torchrun_rendezvous_runs_ddp(tmp_path, reference):
    """Two torchrun agents (the two nodes) meet at one c10d rendezvous endpoint; each starts one process."""
    out = tmp_path / "result.pt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"127.0.0.1:{_free_port()}",
        "--rdzv_id",
        "hf-llqrsam-test",
        WORKER,
        str(out),
        "--output_dir",
        str(tmp_path / "run"),
        "--use_cpu",
        *FLAGS,
    ]
    nodes = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
        for _ in range(2)
    ]
    results = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, results, strict=True):
        assert node.returncode == 0, err[-6000:]
    launch = _check(out, reference)
    assert launch["group_rank"] == "0"  # rank 0 lives on the node the rendezvous made node 0
