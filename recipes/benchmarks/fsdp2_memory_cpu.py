"""Memory per rank of U, the SAM state and one LLQR refresh under FSDP2, measured on CPU (2 gloo ranks, W = 2).

Launch: `torchrun --standalone --nproc_per_node 2 recipes/benchmarks/fsdp2_memory_cpu.py --output_dir runs/fsdp2_mem`.

A ViT (`--hidden`, `--layers`) is sharded with `fully_shard` per layer and root. Measured per rank: the bytes of the
local shards of θ, of diagonal U and of one SAM step's backup of θ and ε (`hf_llqrsam.sam.apply_perturbation_` on
the sharded gradients), and the transient peak of one LLQR refresh: the peak running sum of the allocations that
`torch.profiler` records during `LLQRPreconditioner.update` on the unsharded view (the whole refresh: the view's
all-gather, the curvature graph, the inner loop on whole tensors, the re-slice). The same refresh on one process
without FSDP2 is measured on rank 0 for comparison. Writes `<output_dir>/fsdp2_memory_cpu.json`.
"""

import argparse
import json
import os
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import ViTConfig, ViTForImageClassification

from hf_llqrsam.distributed import unsharded_view
from hf_llqrsam.llqr import LLQRConfig, LLQRPreconditioner
from hf_llqrsam.llqr.sharding import local_tensor
from hf_llqrsam.sam import apply_perturbation_, restore_


def _model(hidden: int, layers: int) -> ViTForImageClassification:
    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=32,
        patch_size=4,
        num_channels=3,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
        num_labels=10,
    )
    return ViTForImageClassification(cfg)


def _bytes(tensors: Any) -> int:
    return sum(local_tensor(t).numel() * t.element_size() for t in tensors)


def _peak(fn: Any) -> int:
    """Peak running sum of the tensor allocations `torch.profiler` records while `fn` runs (self memory per op)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    running = peak = 0
    for _, delta in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()):
        running += delta
        peak = max(peak, running)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="curvature examples")
    a = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(1)
    batch = {"pixel_values": torch.randn(a.batch, 3, 32, 32, generator=g), "labels": torch.randint(0, 10, (a.batch,))}
    config = LLQRConfig(inner_steps=5, batch_size=a.batch)

    model = _model(a.hidden, a.layers)
    full_bytes = _bytes(model.parameters())
    for layer in model.vit.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    pre = LLQRPreconditioner(model, config)
    model(**batch).loss.backward()  # sharded gradients, for one SAM perturbation
    params = list(model.parameters())
    backups = apply_perturbation_(params, [p.grad for p in params])
    sam_bytes = {"backup": _bytes(backups), "eps": _bytes([p.grad for p in params])}
    restore_(params, backups)
    refresh = _peak(lambda: pre.update(unsharded_view(model), batch, step=0))
    out = {
        "rank": rank,
        "world_size": world,
        "full_param_bytes": full_bytes,
        "param_bytes": _bytes(params),
        "u_bytes": pre.memory_bytes(),
        **sam_bytes,
        "refresh_peak_bytes": refresh,
    }
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, out)
    if rank == 0:
        plain_model = _model(a.hidden, a.layers)
        plain = LLQRPreconditioner(plain_model, config)
        one = _peak(lambda: plain.update(plain_model, batch, step=0))
        result = {"ranks": gathered, "one_process_refresh_peak_bytes": one, "args": vars(a)}
        os.makedirs(a.output_dir, exist_ok=True)
        with open(os.path.join(a.output_dir, "fsdp2_memory_cpu.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
