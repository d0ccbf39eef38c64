"""Flat-LoRA and Bi-LoRA on 2 gloo DDP processes equal one process on the union batch: the noise is drawn from
(seed, step) on every rank alike, and the auxiliary adapter's gradient is averaged over the ranks."""

import pytest
import torch

pytest.importorskip("peft")

from tests.distributed.workers.lora_sam_ddp import MODES, lora_vit
from tests.utils import SequentialTrainer, image_dataset, make_args, max_abs_diff, params_of, run_torchrun

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_torchrun("tests/distributed/workers/lora_sam_ddp.py", str(out))
    return {mode: torch.load(out / f"{mode}.pt", weights_only=True) for mode in MODES}


@pytest.mark.parametrize("mode", list(MODES))
def test_ddp_equals_one_process_on_the_union_batch(ddp, tmp_path, mode):
    model = lora_vit()
    args = make_args(tmp_path, sam_mode=mode, per_device_train_batch_size=4, **MODES[mode])
    trainer = SequentialTrainer(model=model, args=args, train_dataset=image_dataset(16))
    trainer.train()
    assert max_abs_diff(ddp[mode]["params"], params_of(model)) < 1e-6
    aux = trainer.sam_state.buffers.get("aux", {})
    assert set(aux) == set(ddp[mode]["aux"]) and (bool(aux) is (mode == "bi_lora"))
    assert all(torch.allclose(t, ddp[mode]["aux"][n], atol=1e-6) for n, t in aux.items())
