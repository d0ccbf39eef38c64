"""torchrun worker: Flat-LoRA under 2-process gloo DDP on a LoRA ViT, and Bi-LoRA's refusal of several processes.

Writes `<out>/flat_lora.pt` (rank 0's final parameters) after checking that both ranks hold the same parameters, and
`<out>/bi_lora_refused.txt` with the error Bi-LoRA raised on rank 0.
"""

import sys

import torch
import torch.distributed as dist

from tests.lm_utils import lora
from tests.utils import SequentialTrainer, image_dataset, make_args, params_of, tiny_vit


def lora_vit():
    return lora(tiny_vit(), ["q_proj", "v_proj"], modules_to_save=["classifier"])


def main(out_dir: str) -> None:
    ds = image_dataset(16)
    args = make_args(out_dir, ddp_find_unused_parameters=False, sam_mode="flat_lora", sam_rho=0.3,
                     per_device_train_batch_size=2, flat_lora_ramp_steps=4)  # fmt: skip
    assert args.world_size == 2, f"expected 2 processes, got {args.world_size}"
    model = lora_vit()
    SequentialTrainer(model=model, args=args, train_dataset=ds).train()
    flat = torch.cat([p.reshape(-1) for p in params_of(model)])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), "flat_lora: ranks diverged"
    if dist.get_rank() == 0:
        torch.save({"params": params_of(model)}, f"{out_dir}/flat_lora.pt")

    args = make_args(out_dir, ddp_find_unused_parameters=False, sam_mode="bi_lora", per_device_train_batch_size=2)
    try:
        SequentialTrainer(model=lora_vit(), args=args, train_dataset=ds).train()
        message = "no error"
    except ValueError as err:
        message = str(err)
    if dist.get_rank() == 0:
        with open(f"{out_dir}/bi_lora_refused.txt", "w") as f:
            f.write(message)


if __name__ == "__main__":
    main(sys.argv[1])
