"""FSDP2 on GPUs (issue 11 item 4): step time and peak memory per rank of SAM and LLQR+SAM against the same model
without SAM, through Accelerate's own FSDP2 path (`fsdp_version: 2`), bf16; and the loss against DDP.

Models, built from their configs (no download), on synthetic data drawn from a fixed seed (the same batches on
every backend):

- `vit-b16`: ViT-B/16 (86M parameters), 224×224 images, 1000 classes, 32 images per GPU;
- `gpt2-125m`: GPT-2 small (124M), 512 tokens, 8 sequences per GPU (`llqr_shift_labels`: causal).

Variants: `base` (AdamW), `sam` (ρ = 0.05) and `llqr_sam` (diagonal U, one refresh at step 0 on 8 curvature examples
with 5 inner steps). Each run takes `--steps` optimizer steps (default 10); the step time is the median of steps
2…N (step 0 holds the LLQR refresh and warm-up), the peak memory per rank is `torch.cuda.max_memory_allocated` over
steps 1…N (`peak_train`) and over step 0 (`peak_step0`, which holds the refresh on its unsharded fp32 view).

One launch per model and backend (the driver, `recipes/benchmarks/fsdp2_gpu.sh`, at most 8 minutes):

    bash recipes/benchmarks/fsdp2_gpu.sh runs/fsdp2_gpu        # then runs/fsdp2_gpu/fsdp2_gpu.md

`--cpu_smoke` runs the same code on CPU with tiny models in one process (the plumbing test of this script).
"""

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, ViTConfig, ViTForImageClassification

from hf_llqrsam import LLQRSAMTrainer, LLQRSAMTrainingArguments

MODELS: dict[str, dict[str, Any]] = {
    "vit-b16": dict(kind="vit", batch=32, config=dict(image_size=224, patch_size=16, num_labels=1000)),
    "gpt2-125m": dict(kind="lm", batch=8, seq=512, config=dict(n_positions=512)),
    # --cpu_smoke
    "tiny-vit": dict(
        kind="vit",
        batch=4,
        config=dict(
            image_size=16,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=5,
        ),
    ),
    "tiny-lm": dict(
        kind="lm", batch=2, seq=16, config=dict(n_positions=16, n_embd=32, n_layer=2, n_head=2, vocab_size=64)
    ),
}
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "sam": dict(sam_mode="sam", sam_rho=0.05),
    "llqr_sam": dict(
        sam_mode="sam", sam_rho=0.05, llqr=True, llqr_batch_size=8, llqr_inner_steps=5, llqr_update_interval=1000
    ),
}


class Synthetic(Dataset):
    """Fixed random examples: images with labels, or token sequences whose labels are the inputs (causal LM)."""

    def __init__(self, spec: dict[str, Any], n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        cfg = spec["config"]
        if spec["kind"] == "vit":
            size = cfg["image_size"]
            self.x = torch.randn(n, 3, size, size, generator=g)
            self.y = torch.randint(0, cfg["num_labels"], (n,), generator=g)
        else:
            vocab = cfg.get("vocab_size", 50257)
            self.x = torch.randint(0, vocab, (n, spec["seq"]), generator=g)
            self.y = self.x
        self.kind = spec["kind"]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        key = "pixel_values" if self.kind == "vit" else "input_ids"
        return {key: self.x[i], "labels": self.y[i]}


def build(spec: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(0)
    if spec["kind"] == "vit":
        return ViTForImageClassification(ViTConfig(**spec["config"]))
    return GPT2LMHeadModel(GPT2Config(**spec["config"]))


class Probe(TrainerCallback):
    """Per-step wall time (synchronised), losses, `llqr/update_seconds` and the peak memory of step 0 and after."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.times, self.losses, self.refresh = cuda, [], [], []
        self.peak_step0 = self.peak_train = 0
        self._t0 = 0.0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._t0)
        if self.cuda and state.global_step == 1:
            self.peak_step0 = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.losses.append(float(logs["loss"]))
        if "llqr/update_seconds" in logs:
            self.refresh.append(float(logs["llqr/update_seconds"]))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.cuda:
            self.peak_train = torch.cuda.max_memory_allocated()


def run(model_name: str, variant: str, backend: str, out_dir: str, steps: int, cpu: bool) -> dict[str, Any]:
    spec = MODELS[model_name]
    variant_args = dict(VARIANTS[variant])
    if cpu and variant_args.get("llqr"):  # the plumbing test: a token refresh
        variant_args.update(llqr_batch_size=2, llqr_inner_steps=1)
    args = LLQRSAMTrainingArguments(
        output_dir=os.path.join(out_dir, f"{backend}-{model_name}-{variant}"), report_to="none", save_strategy="no",
        logging_steps=1, per_device_train_batch_size=spec["batch"], max_steps=steps, learning_rate=1e-4,
        optim="adamw_torch", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, seed=0,
        bf16=not cpu, use_cpu=cpu, disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
        ddp_find_unused_parameters=False, **variant_args,
    )  # fmt: skip
    if torch.cuda.is_available() and not cpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    probe = Probe(cuda=torch.cuda.is_available() and not cpu)
    data = Synthetic(spec, n=spec["batch"] * args.world_size * steps + 64)
    trainer = LLQRSAMTrainer(model=build(spec), args=args, train_dataset=data, callbacks=[probe])
    trainer.train()
    peaks = [probe.peak_train, probe.peak_step0]
    if args.world_size > 1:
        gathered: list[Any] = [None] * args.world_size
        torch.distributed.all_gather_object(gathered, peaks)
    else:
        gathered = [peaks]
    timed = probe.times[2:] or probe.times
    pre = trainer.preconditioner
    out = {
        "model": model_name, "variant": variant, "backend": backend, "world_size": args.world_size,
        "params": sum(p.numel() for p in trainer.model.parameters()),  # DTensor numel: the whole parameter
        "step_seconds": statistics.median(timed), "losses": probe.losses, "refresh_seconds": probe.refresh,
        "peak_train_per_rank": [p[0] for p in gathered], "peak_step0_per_rank": [p[1] for p in gathered],
        "u_bytes_per_rank": None if pre is None else pre.memory_bytes(),
        "fsdp2": type(trainer.model_wrapped).__name__.startswith("FSDP"),
    }  # fmt: skip
    del trainer, pre
    gc.collect()
    return out


def report(out_dir: str) -> str:
    """The markdown table of every `<backend>-<model>.json` in `out_dir` (FSDP2 rows, DDP as the loss reference)."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".json") and "-" in name:
            with open(os.path.join(out_dir, name)) as f:
                for r in json.load(f):
                    rows[(r["backend"], r["model"], r["variant"])] = r
    gib = 2**30
    lines = [
        "| model | variant | W | step (s) | × base | peak/rank, steps 1–N (GiB) | × base | peak/rank, step 0 (GiB) "
        "| refresh (s) | U/rank (MiB) | max \\|loss − DDP loss\\| |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (backend, model, variant), r in sorted(rows.items()):
        if backend != "fsdp2":
            continue
        base = rows.get((backend, model, "base"), r)
        ddp = rows.get(("ddp", model, variant))
        dloss = max((abs(a - b) for a, b in zip(r["losses"], ddp["losses"], strict=False)), default=float("nan"))
        peak, peak0 = max(r["peak_train_per_rank"]), max(r["peak_step0_per_rank"])
        u = "–" if r["u_bytes_per_rank"] is None else f"{r['u_bytes_per_rank'] / 2**20:.0f}"
        refresh = f"{r['refresh_seconds'][0]:.2f}" if r["refresh_seconds"] else "–"
        lines.append(
            f"| {model} | {variant} | {r['world_size']} | {r['step_seconds']:.3f} | "
            f"{r['step_seconds'] / base['step_seconds']:.2f} | {peak / gib:.2f} | "
            f"{peak / max(max(base['peak_train_per_rank']), 1):.2f} | {peak0 / gib:.2f} | {refresh} | {u} | "
            f"{dloss if ddp else float('nan'):.2e} |"
        )
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "fsdp2_gpu.md"), "w") as f:
        f.write(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--backend", choices=("fsdp2", "ddp"), default="fsdp2", help="a label: the launch decides")
    parser.add_argument("--model", choices=sorted(MODELS), default="vit-b16")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cpu_smoke", action="store_true", help="CPU, one process, tiny models: tests the plumbing")
    parser.add_argument("--report", action="store_true", help="only write the table from the JSON files")
    a = parser.parse_args(argv)
    os.makedirs(a.output_dir, exist_ok=True)
    if a.report:
        print(report(a.output_dir))
        return
    results = [run(a.model, v, a.backend, a.output_dir, a.steps, a.cpu_smoke) for v in a.variants.split(",")]
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(a.output_dir, f"{a.backend}-{a.model}.json"), "w") as f:
            json.dump(results, f, indent=1)
        for r in results:
            print(json.dumps({k: v for k, v in r.items() if k != "losses"}))


if __name__ == "__main__":
    main(sys.argv[1:])
