"""Flat-LoRA on 2 gloo DDP processes equals one process on the union batch (the noise is drawn from (seed, step) on
every rank alike); Bi-LoRA refuses several processes, naming the mode."""

import pytest
import torch

pytest.importorskip("peft")

from tests.distributed.workers.lora_sam_ddp import lora_vit
from tests.utils import SequentialTrainer, image_dataset, make_args, max_abs_diff, params_of, run_torchrun

pytestmark = pytest.mark.distributed


def test_flat_lora_ddp_equals_one_process_and_bi_lora_is_refused(tmp_path):
    run_torchrun("tests/distributed/workers/lora_sam_ddp.py", str(tmp_path / "ddp"))
    ddp = torch.load(tmp_path / "ddp" / "flat_lora.pt", weights_only=True)["params"]
    model = lora_vit()
    args = make_args(tmp_path / "one", sam_mode="flat_lora", sam_rho=0.3, per_device_train_batch_size=4,
                     flat_lora_ramp_steps=4)  # fmt: skip
    SequentialTrainer(model=model, args=args, train_dataset=image_dataset(16)).train()
    assert max_abs_diff(ddp, params_of(model)) < 1e-6
    refused = (tmp_path / "ddp" / "bi_lora_refused.txt").read_text()
    assert refused.startswith("Invalid sam_mode='bi_lora' with 2 processes"), refused
