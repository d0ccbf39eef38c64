"""torchrun worker: Flat-LoRA and Bi-LoRA under 2-process gloo DDP on a LoRA ViT.

Writes `<out>/<mode>.pt` (rank 0's final parameters, and Bi-LoRA's auxiliary adapter) after checking that both ranks
hold the same ones.
"""

import sys

import torch
import torch.distributed as dist

from tests.lm_utils import lora
from tests.utils import SequentialTrainer, image_dataset, make_args, params_of, tiny_vit


def lora_vit():
    return lora(tiny_vit(), ["q_proj", "v_proj"], modules_to_save=["classifier"])


MODES = {"flat_lora": dict(sam_rho=0.3, flat_lora_ramp_steps=4), "bi_lora": dict(sam_rho=0.3, bi_lora_lr=0.1)}


def _same_on_all_ranks(flat: torch.Tensor, what: str) -> None:
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), f"{what}: ranks diverged"


def main(out_dir: str) -> None:
    ds = image_dataset(16)
    for mode, extra in MODES.items():
        args = make_args(out_dir, ddp_find_unused_parameters=False, sam_mode=mode, per_device_train_batch_size=2,
                         **extra)  # fmt: skip
        assert args.world_size == 2, f"expected 2 processes, got {args.world_size}"
        model = lora_vit()
        trainer = SequentialTrainer(model=model, args=args, train_dataset=ds)
        trainer.train()
        aux = dict(trainer.sam_state.buffers.get("aux", {}))
        _same_on_all_ranks(
            torch.cat([p.reshape(-1) for p in params_of(model)] + [t.reshape(-1) for t in aux.values()]), mode
        )
        if dist.get_rank() == 0:
            torch.save({"params": params_of(model), "aux": aux}, f"{out_dir}/{mode}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
