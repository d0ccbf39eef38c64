"""A training script as a launcher starts it: SAM on tiny ViT from command-line flags, like a recipe.

    <launcher> tests/distributed/workers/launched_sam.py OUT_FILE --output_dir DIR --use_cpu --sam_mode sam ...

Every process checks that it is one rank of a real DDP run (the Trainer wrapped the model in DDP, gloo) and that its
final parameters equal rank 0's; rank 0 writes OUT_FILE: the parameters and how the launch looked from inside.
"""

import os
import sys

import torch
import torch.distributed as dist

from hf_llqrsam import LLQRSAMTrainingArguments
from hf_llqrsam.args import parse_args
from tests.utils import SequentialTrainer, image_dataset, params_of, tiny_vit


def main(out_file: str, argv: list[str]) -> None:
    (args,) = parse_args(LLQRSAMTrainingArguments, argv)
    trainer = SequentialTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(16))
    trainer.train()
    flat = torch.cat([p.reshape(-1) for p in params_of(trainer.model)])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(g, gathered[0]) for g in gathered), "ranks diverged"
    if dist.get_rank() == 0:
        launch = {
            "world_size": args.world_size,
            "parallel_mode": args.parallel_mode.value,
            "backend": dist.get_backend(),
            "wrapper": type(trainer.model_wrapped).__name__,
            "group_rank": os.environ.get("GROUP_RANK"),
        }
        torch.save({"params": params_of(trainer.model), "launch": launch}, out_file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
