"""Memory per rank of U and of the SAM state under FSDP2 at W = 2, 8, 64, computed from the real models' shapes.

    python recipes/benchmarks/fsdp2_memory_table.py --output_dir runs/fsdp2_memory_table

No process group and no weights: the models (ViT-B/16 and GPT-2 125M, from their configs) are built on the meta
device and only their parameter shapes are read. FSDP2's `fully_shard` shards every parameter on dim 0 into W equal
chunks of ⌈n₀/W⌉ rows (the last ones padded), so each rank allocates ⌈n₀/W⌉·(numel/n₀) entries per tensor; that is
what is counted here, in fp32 (U, the SAM backups and the SAM buffers are fp32 whatever the training precision).

Per rank:
* diagonal U: one entry per parameter entry, sharded like the parameter (`hf_llqrsam/llqr/sharding.py`);
* the SAM step's backup of θ (`hf_llqrsam.sam.apply_perturbation_` keeps the unperturbed shards; ε lives in the
  gradient buffers and costs nothing extra);
* a mode's state buffer (FSAM's ḡ, VaSSO's d; infoSAM holds two), each sharded like the parameter;
* an LLQR refresh's transient: about four whole fp32 copies of θ (the unsharded view, the gathered U, the inner
  loop's V and its momentum), which does not shrink with W (docs/integration.md §7.5; measured at W = 2 by
  `fsdp2_memory_cpu.py`: +4.0 × the fp32 parameter bytes).

Writes `<output_dir>/fsdp2_memory_table.json` and `.md`.
"""

import argparse
import json
import math
import os

import torch
from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

MIB = 2**20


def models() -> dict[str, torch.nn.Module]:
    """ViT-B/16 (224², 1000 classes) and GPT-2 125M (tied head), on the meta device."""
    with torch.device("meta"):
        vit = ViTForImageClassification(ViTConfig(num_labels=1000))
        gpt2 = GPT2LMHeadModel(GPT2Config())
    return {"ViT-B/16": vit, "GPT-2 125M": gpt2}


def shard_entries(shape: torch.Size, world_size: int) -> int:
    """Entries one rank allocates for a parameter of `shape` under `fully_shard` (dim-0 chunks of ⌈n₀/W⌉ rows)."""
    if len(shape) == 0:
        return 1
    rows = math.ceil(shape[0] / world_size)
    return rows * math.prod(shape[1:])


def table(world_sizes: list[int]) -> list[dict]:
    rows = []
    for name, model in models().items():
        shapes = [p.shape for p in model.parameters()]  # tied weights counted once, as FSDP2 shards them once
        full = sum(math.prod(s) for s in shapes)
        row = {"model": name, "parameters": full, "ddp_u_mib": 4 * full / MIB, "refresh_mib": 4 * 4 * full / MIB}
        for w in world_sizes:
            row[f"w{w}_u_mib"] = 4 * sum(shard_entries(s, w) for s in shapes) / MIB
        rows.append(row)
    return rows


def markdown(rows: list[dict], world_sizes: list[int]) -> str:
    head = " | ".join(f"W = {w}" for w in world_sizes)
    lines = [
        f"| model | parameters | one process / DDP | {head} | LLQR refresh transient (any W) |",
        "|---|---|---|" + "---|" * len(world_sizes) + "---|",
    ]
    for r in rows:
        cells = " | ".join(f"{r[f'w{w}_u_mib']:.1f}" for w in world_sizes)
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {r['ddp_u_mib']:.1f} | {cells} | "
            f"{r['refresh_mib'] / 1024:.2f} GiB |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--world_sizes", default="2,8,64")
    args = parser.parse_args(argv)
    world_sizes = [int(w) for w in args.world_sizes.split(",")]
    rows = table(world_sizes)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "fsdp2_memory_table.json"), "w") as f:
        json.dump(rows, f, indent=1)
    text = markdown(rows, world_sizes)
    with open(os.path.join(args.output_dir, "fsdp2_memory_table.md"), "w") as f:
        f.write(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
