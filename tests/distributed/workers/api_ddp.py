"""torchrun worker: `hf_llqrsam.SAM` in a plain PyTorch DDP loop on 2 gloo processes.

Each rank takes its half of every batch of 4; DDP averages the gradients, so each step equals one process on the
union batch. Writes `<out>/<mode>.pt` (rank 0's final parameters) and checks every rank holds the same weights.
"""

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hf_llqrsam import SAM
from tests.utils import batches, image_dataset, params_of, tiny_vit


def main(out_dir: str, modes: list[str]) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, world
    ds = image_dataset(16)
    for mode in modes:
        model = tiny_vit()
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        sam = SAM(ddp, optimizer, mode, 0.1, **({"looksam_interval": 2} if mode == "looksam" else {}))
        for batch in batches(ds, 4)[:4]:
            half = {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}

            def closure(b=half, ddp=ddp):
                loss = ddp(**b).loss
                loss.backward()
                return loss

            if sam.two_pass:
                closure()
                with sam.perturbed():
                    closure()
                optimizer.step()
                optimizer.zero_grad()
            else:
                sam.step(closure)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        assert torch.equal(gathered[0], gathered[1]), f"{mode}: ranks diverged"
        if rank == 0:
            torch.save(params_of(model), f"{out_dir}/{mode}.pt")
    dist.barrier()  # both ranks are done before either tears the group down (a gloo teardown race hung once)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","))
