"""Cost of SAM, LLQR and LLQR+SAM against the base optimizer, measured side by side in one process.

Every variant is built once, then timed in interleaved rounds (A B C … A B C …) so drifts in machine load hit all
variants alike. A "step" is one optimizer step: `training_step` (one pass for base/LLQR, two for SAM) + the AdamW
step + `zero_grad`. LookSAM (two passes every k-th step, one between) is timed over whole cycles of k = 5 steps and
reported per step; WSAM is two passes plus its decoupled sharpness step. LLQR variants are timed between refreshes;
the refresh is timed on its own and amortised at the refresh interval E (default 1000): amortised = step + refresh /
E. Peers on the same model, data and batch: a hand-written SAM loop and `pytorch_optimizer.SAM` (optional extra
`peers`), and the same loop on the plain API `hf_llqrsam.SAM` (`api_sam`). `base_again` is a second, identical base
instance: its ratio to `base` shows how much of a ratio is machine noise. The training batch defaults to the LLQR
curvature batch (64), as in every reference preset (`docs/algorithm.md` §12.2); the refresh cost scales with the
latter.

Peak memory is measured per variant in a fresh subprocess: on GPU `torch.cuda.max_memory_allocated`; on CPU the
persistent tensors (params, optimizer and SAM/LLQR state) plus the peak running sum of the tensor allocations that
`torch.profiler` records during one step.

    python recipes/benchmarks/bench_cost.py --output_dir runs/bench_cost
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import MarianConfig, MarianMTModel, ViTConfig, ViTForImageClassification

import hf_llqrsam
from hf_llqrsam import LLQRSAMTrainer, LLQRSAMTrainingArguments
from hf_llqrsam.modes import MODES
from hf_llqrsam.trainer_support import curvature_batch

# name -> (family, config kwargs). CPU sizes by default; the *-gpu sizes are ViT-B/16 and Marian-base.
MODELS: dict[str, tuple[str, dict]] = {
    "vit-s": (
        "vit",
        dict(
            image_size=32,
            patch_size=4,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
        ),
    ),
    "vit-m": (
        "vit",
        dict(
            image_size=32,
            patch_size=4,
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=512,
        ),
    ),
    "vit-ti": (
        "vit",
        dict(
            image_size=32,
            patch_size=4,
            hidden_size=192,
            num_hidden_layers=6,
            num_attention_heads=3,
            intermediate_size=768,
        ),
    ),
    "marian-s": (
        "marian",
        dict(
            vocab_size=2000,
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_ffn_dim=256,
            decoder_ffn_dim=256,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
        ),
    ),
    "marian-m": (
        "marian",
        dict(
            vocab_size=4000,
            d_model=128,
            encoder_layers=3,
            decoder_layers=3,
            encoder_ffn_dim=512,
            decoder_ffn_dim=512,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
        ),
    ),
    "vit-b16-gpu": (
        "vit",
        dict(
            image_size=224,
            patch_size=16,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
        ),
    ),
    "marian-base-gpu": (
        "marian",
        dict(
            vocab_size=58101,
            d_model=512,
            encoder_layers=6,
            decoder_layers=6,
            encoder_ffn_dim=2048,
            decoder_ffn_dim=2048,
            encoder_attention_heads=8,
            decoder_attention_heads=8,
        ),
    ),
}

# name -> TrainingArguments overrides (Trainer variants) or None (hand-written peers)
VARIANTS: dict[str, dict | None] = {
    "base": {},
    "base_again": {},  # a second, identical base instance: its ratio to base is the noise floor (A/A)
    "sam": {"sam_mode": "sam"},
    "llqr": {"llqr": True},
    "llqr_sam": {"sam_mode": "sam", "llqr": True},
    "llqr_sam_kfac": {"sam_mode": "sam", "llqr": True, "llqr_structure": "kfac"},
    "looksam": {"sam_mode": "looksam", "looksam_interval": 5},  # timed over whole cycles of k = 5 steps
    "wsam": {"sam_mode": "wsam"},
    "hand_base": None,
    "hand_sam": None,
    "peer_sam": None,
    "api_sam": None,  # hf_llqrsam.SAM, the plain-PyTorch API, in the same loop as hand_sam
}
SEQ_LEN = 24


def build_model(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    family, kw = MODELS[name]
    torch.manual_seed(0)
    if family == "vit":
        model = ViTForImageClassification(
            ViTConfig(num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)
        )
    else:
        model = MarianMTModel(
            MarianConfig(
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
                max_position_embeddings=64,
                dropout=0.0,
                attention_dropout=0.0,
                activation_dropout=0.0,
                **kw,
            )
        )
    return model.to(dtype)


def synthetic_batch(name: str, batch_size: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    family, kw = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        size = kw["image_size"]
        batch = {
            "pixel_values": torch.randn(batch_size, 3, size, size, generator=g),
            "labels": torch.randint(0, 10, (batch_size,), generator=g),
        }
    else:
        vocab = kw["vocab_size"]
        batch = {
            "input_ids": torch.randint(2, vocab, (batch_size, SEQ_LEN), generator=g),
            "labels": torch.randint(2, vocab, (batch_size, SEQ_LEN), generator=g),
        }
        batch["decoder_input_ids"] = torch.cat(
            [torch.zeros(batch_size, 1, dtype=torch.long), batch["labels"][:, :-1]], dim=1
        )
    return {k: v.to(device) for k, v in batch.items()}


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = {k: v.cpu() for k, v in batch.items()}

    def __len__(self) -> int:
        return len(next(iter(self.batch.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


@dataclass
class Stepper:
    """One variant: `step()` runs `per_call` optimizer steps (one, or a LookSAM cycle of k); `refresh()` (LLQR
    only) runs one U refresh."""

    step: Callable[[], None]
    tensors: Callable[[], list[torch.Tensor]]
    refresh: Callable[[], float] | None = None
    per_call: int = 1


def _state_tensors(*objs: object) -> list[torch.Tensor]:
    """Every distinct tensor held by modules, optimizers and nested state dicts (for memory accounting)."""
    seen: dict[int, torch.Tensor] = {}

    def walk(x: object) -> None:
        if isinstance(x, torch.Tensor):
            seen[id(x)] = x
        elif isinstance(x, torch.nn.Module):
            for t in list(x.parameters()) + list(x.buffers()):
                walk(t)
                walk(t.grad)
        elif isinstance(x, torch.optim.Optimizer):
            walk(list(x.state.values()))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    for o in objs:
        walk(o)
    return list(seen.values())


def trainer_stepper(model: torch.nn.Module, batch: dict, overrides: dict, args: argparse.Namespace) -> Stepper:
    targs = LLQRSAMTrainingArguments(
        output_dir=os.path.join(args.output_dir, "tmp"),
        report_to="none",
        use_cpu=args.device == "cpu",
        learning_rate=1e-4,
        optim="adamw_torch",
        max_grad_norm=0.0,
        bf16=args.bf16,
        save_strategy="no",
        per_device_train_batch_size=args.batch_size,
        llqr_batch_size=args.llqr_batch_size,
        **overrides,
    )
    trainer = LLQRSAMTrainer(model=model, args=targs, train_dataset=_ListDataset(batch))
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    trainer.current_gradient_accumulation_steps = 1
    trainer.state.global_step = 1  # between refreshes (E = 1000): the timed steps never refresh U

    def one_step() -> None:
        trainer.accelerator.gradient_state._set_sync_gradients(True)
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.model.zero_grad(set_to_none=True)

    # LookSAM's cost depends on the step (two passes every k-th, one between): time whole cycles of k steps, the
    # global step advancing, so every timed call holds exactly one full step
    spec = MODES.get(overrides.get("sam_mode", "none"))  # a cadence mode is timed over whole cycles
    cycle = overrides.get("looksam_interval", 1) if spec is not None and spec.passes == "cadence" else 1

    def step() -> None:
        for _ in range(cycle):
            one_step()
            if cycle > 1:
                trainer.state.global_step += 1

    def refresh() -> float:
        curvature = curvature_batch(trainer, 0)
        start = time.perf_counter()
        trainer.preconditioner.update(trainer.model, curvature, step=0)
        _sync(args.device)
        return time.perf_counter() - start

    def tensors() -> list[torch.Tensor]:
        precond = trainer.preconditioner.state_dict() if trainer.preconditioner is not None else {}
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrapped unless prepared
        return _state_tensors(trainer.model, opt, trainer.sam_state.buffers, precond)

    if overrides.get("llqr"):
        step()  # builds the preconditioner
        return Stepper(step, tensors, refresh)
    return Stepper(step, tensors, per_call=cycle)


def hand_stepper(model: torch.nn.Module, batch: dict, variant: str, rho: float = 0.1) -> Stepper:
    """The textbook loops: base, SAM (davda54-style, restore by copy), pytorch_optimizer.SAM, and the same loop on
    the package's plain API (`hf_llqrsam.SAM`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    if variant == "api_sam":
        opt = torch.optim.AdamW(params, lr=1e-4)
        sam = hf_llqrsam.SAM(model, opt, "sam", rho)

        def api() -> None:
            model(**batch).loss.backward()
            with sam.perturbed():
                model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return Stepper(api, lambda: _state_tensors(model, opt))
    if variant == "peer_sam":
        from pytorch_optimizer import SAM

        opt = SAM(model.parameters(), torch.optim.AdamW, rho=rho, lr=1e-4)

        def peer() -> None:
            model(**batch).loss.backward()
            opt.first_step(zero_grad=True)
            model(**batch).loss.backward()
            opt.second_step(zero_grad=True)

        return Stepper(peer, lambda: _state_tensors(model, opt))
    opt = torch.optim.AdamW(params, lr=1e-4)

    def base() -> None:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sam() -> None:
        model(**batch).loss.backward()
        grads = [p.grad for p in params]
        scale = rho / (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) + 1e-12)
        with torch.no_grad():
            backup = [p.detach().clone() for p in params]
            torch._foreach_add_(params, torch._foreach_mul(grads, scale))
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        with torch.no_grad():
            torch._foreach_copy_(params, backup)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Stepper(base if variant == "hand_base" else sam, lambda: _state_tensors(model, opt))


def make_stepper(model_name: str, variant: str, args: argparse.Namespace) -> Stepper:
    model = build_model(model_name).to(args.device)
    batch = synthetic_batch(model_name, args.batch_size, args.device)
    overrides = VARIANTS[variant]
    if overrides is None:
        if args.bf16:
            raise SystemExit("--bf16: the hand-written peers run in fp32 only; drop them with --variants.")
        return hand_stepper(model, batch, variant)
    return trainer_stepper(model, batch, overrides, args)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_steps(stepper: Stepper, args: argparse.Namespace) -> float:
    """Seconds per optimizer step over `args.steps` consecutive calls of `stepper.step`."""
    start = time.perf_counter()
    for _ in range(args.steps):
        stepper.step()
    _sync(args.device)
    return (time.perf_counter() - start) / (args.steps * stepper.per_call)


def time_model(model_name: str, args: argparse.Namespace) -> dict:
    steppers = {v: make_stepper(model_name, v, args) for v in args.variants}
    for s in steppers.values():  # warm-up (allocator, kernels, optimizer state)
        for _ in range(args.warmup):
            s.step()
    _sync(args.device)
    per_round: dict[str, list[float]] = {v: [] for v in steppers}
    for _ in range(args.rounds):
        for v, s in steppers.items():
            per_round[v].append(_time_steps(s, args))
    refresh = {
        v: _refresh_in_base_steps(s, steppers.get("base"), args) for v, s in steppers.items() if s.refresh is not None
    }
    n_params = sum(p.numel() for p in build_model(model_name).parameters())
    out: dict = {"params": n_params, "variants": {}}
    base = statistics.median(per_round["base"]) if "base" in per_round else None
    for v, times in per_round.items():
        med = statistics.median(times)
        row = {"step_s": med, "step_s_all_rounds": times}
        if v in refresh:
            seconds, in_base = refresh[v]
            row["refresh_s"] = seconds
            # with a base variant, the refresh enters as "so many base steps" measured next to it, so a slow
            # phase of the machine during the refresh does not inflate the amortised ratio
            cost = in_base * base if base and in_base is not None else seconds
            row["amortised_step_s"] = med + cost / args.update_interval
            if in_base is not None:
                row["refresh_in_base_steps"] = in_base
        if base:
            row["ratio_to_base"] = row.get("amortised_step_s", med) / base
        out["variants"][v] = row
    return out


# target name -> (numerator variant, denominator variant, metric, bound); `amortised` uses the amortised LLQR step
TARGETS: dict[str, tuple[str, str, str, float | None]] = {
    "A/A noise floor: a second base instance / base": ("base_again", "base", "time", None),
    "SAM step / base step": ("sam", "base", "time", 2.05),
    "Trainer SAM / hand-written SAM loop": ("sam", "hand_sam", "time", 1.00),
    "plain API SAM / hand-written SAM loop": ("api_sam", "hand_sam", "time", 1.00),
    "Trainer SAM / pytorch_optimizer SAM": ("sam", "peer_sam", "time", 1.00),
    "Trainer base / hand-written base (for scale)": ("base", "hand_base", "time", None),
    "pytorch_optimizer SAM / hand-written SAM loop": ("peer_sam", "hand_sam", "time", None),
    "LLQR+SAM / SAM, amortised at E": ("llqr_sam", "sam", "amortised", 1.05),
    "LLQR / base, amortised at E": ("llqr", "base", "amortised", None),
    "LLQR+SAM (kfac) / SAM, amortised at E": ("llqr_sam_kfac", "sam", "amortised", None),
    "peak memory LLQR+SAM (diagonal) / base": ("llqr_sam", "base", "memory", 1.3),
    "LookSAM (k = 5) step / base step": ("looksam", "base", "time", 1.25),
    "LookSAM (k = 5) step / SAM step": ("looksam", "sam", "time", None),
    "WSAM step / SAM step": ("wsam", "sam", "time", None),
}


def target_ratios(results: dict) -> dict[str, dict[str, float]]:
    """The ratios the README's targets are stated in, per model (only those whose two variants were run)."""
    out: dict[str, dict[str, float]] = {}
    for name, (num, den, metric, _) in TARGETS.items():
        for model, res in results["models"].items():
            rows = res["variants"]
            if metric == "memory":
                mem = results["memory"].get(model, {})
                if num in mem and den in mem:
                    out.setdefault(name, {})[model] = mem[num] / mem[den]
            elif num in rows and den in rows:
                key = "amortised_step_s" if metric == "amortised" else "step_s"
                out.setdefault(name, {})[model] = rows[num].get(key, rows[num]["step_s"]) / rows[den]["step_s"]
    return out


def _refresh_in_base_steps(
    stepper: Stepper, base: Stepper | None, args: argparse.Namespace
) -> tuple[float, float | None]:
    """Median refresh seconds and, with a base variant, the median of refresh / (base step timed right around it)."""

    seconds, ratios = [], []
    for _ in range(args.refreshes):
        before = _time_steps(base, args) if base is not None else None
        seconds.append(stepper.refresh())
        if base is not None and before is not None:
            ratios.append(seconds[-1] / statistics.fmean([before, _time_steps(base, args)]))
    return statistics.median(seconds), statistics.median(ratios) if ratios else None


def peak_memory(model_name: str, variant: str, args: argparse.Namespace) -> float:
    """Peak memory (MiB) of `steps` steps of one variant, in a fresh process."""
    code = (
        f"import sys, json, argparse; sys.path.insert(0, {os.getcwd()!r}); "
        "from recipes.benchmarks.bench_cost import _measure_peak; "
        f"print(json.dumps(_measure_peak({model_name!r}, {variant!r}, argparse.Namespace(**json.loads(sys.argv[1])))))"
    )
    ns = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(ns)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure_peak(model_name: str, variant: str, args: argparse.Namespace) -> float:
    if args.device == "cuda":
        stepper = make_stepper(model_name, variant, args)
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            stepper.step()
        return torch.cuda.max_memory_allocated() / 2**20
    # CPU: persistent tensors (params, optimizer and SAM/LLQR state, after a warm-up step) plus the peak of the
    # running sum of the allocations the profiler records during one more step.
    stepper = make_stepper(model_name, variant, args)
    stepper.step()
    persistent = sum(t.untyped_storage().nbytes() for t in stepper.tensors())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        stepper.step()
    # allocations are attributed to the ops (self memory, so nested ops are not double counted); frees outside any
    # op appear as "[memory]" events
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events())
    running = peak = 0
    for _, d in deltas:
        running += d
        peak = max(peak, running)
    return (persistent + peak) / 2**20


def update_scaling(args: argparse.Namespace) -> dict:
    """LLQR refresh time across ViT widths; the fitted exponent of time vs parameter count (log-log)."""
    rows = []
    for width in args.scaling_widths:
        name = f"vit-w{width}"
        MODELS[name] = (
            "vit",
            dict(
                image_size=32,
                patch_size=4,
                hidden_size=width,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=4 * width,
            ),
        )
        stepper = make_stepper(name, "llqr", args)
        seconds = statistics.median(stepper.refresh() for _ in range(args.refreshes))
        rows.append(
            {"width": width, "params": sum(p.numel() for p in build_model(name).parameters()), "refresh_s": seconds}
        )
    xs = [math.log(r["params"]) for r in rows]
    ys = [math.log(r["refresh_s"]) for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return {"rows": rows, "exponent": slope}


def to_markdown(results: dict) -> str:
    lines = [
        f"device: {results['device']}, batch {results['batch_size']}, LLQR curvature batch "
        f"{results['llqr_batch_size']}, E = {results['update_interval']}, median of {results['rounds']} "
        f"interleaved rounds x {results['steps']} steps; torch {results['torch']}; date {results['date']}",
        "",
    ]
    models = list(results["models"])
    lines += ["| ratio | " + " | ".join(models) + " | target |", "|---|" + "---|" * (len(models) + 1)]
    for name, per_model in results.get("targets", {}).items():
        bound = TARGETS[name][3]
        cells = [f"{per_model[m]:.3f}" if m in per_model else "–" for m in models]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'–' if bound is None else f'≤ {bound}'} |")
    lines += [
        "",
        "| model | params | variant | step (ms) | refresh (s) | amortised (ms) | / base | peak mem (MiB) "
        "| mem / base |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, res in results["models"].items():
        mem = results["memory"].get(model, {})
        for v, row in res["variants"].items():
            amort = f"{1e3 * row['amortised_step_s']:.1f}" if "amortised_step_s" in row else "–"
            refresh = f"{row['refresh_s']:.2f}" if "refresh_s" in row else "–"
            if "refresh_in_base_steps" in row:
                refresh += f" ({row['refresh_in_base_steps']:.0f} base steps)"
            m = mem.get(v)
            m_ratio = f"{m / mem['base']:.2f}" if m is not None and mem.get("base") else "–"
            lines.append(
                f"| {model} | {res['params']:,} | {v} | {1e3 * row['step_s']:.1f} | {refresh} | {amort} | "
                f"{row.get('ratio_to_base', float('nan')):.3f} | {'–' if m is None else f'{m:.0f}'} | "
                f"{m_ratio} |"
            )
    if results.get("scaling"):
        sc = results["scaling"]
        lines += [
            "",
            f"LLQR refresh time vs parameters: fitted exponent {sc['exponent']:.2f}",
            "",
            "| width | params | refresh (s) |",
            "|---|---|---|",
        ]
        lines += [f"| {r['width']} | {r['params']:,} | {r['refresh_s']:.3f} |" for r in sc["rows"]]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    ncols = 1 + bool(results.get("scaling"))
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.5), squeeze=False)
    ax = axes[0][0]
    variants = list(next(iter(results["models"].values()))["variants"])
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        ratios = [results["models"][m]["variants"][v].get("ratio_to_base", float("nan")) for m in models]
        ax.bar([j + i * width for j in range(len(models))], ratios, width, label=v)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models)
    ax.set(ylabel="step time / base (amortised for LLQR)", title=f"step cost ({results['device']})")
    ax.legend(fontsize=7)
    if results.get("scaling"):
        ax = axes[0][1]
        rows = results["scaling"]["rows"]
        ax.loglog([r["params"] for r in rows], [r["refresh_s"] for r in rows], "o-")
        ax.set(
            xlabel="parameters",
            ylabel="LLQR refresh (s)",
            title=f"refresh time, exponent {results['scaling']['exponent']:.2f}",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--models", default="vit-s,vit-m,vit-ti,marian-s,marian-m")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--batch_size",
        type=int,
        default=64,
        help="training batch; the default equals the curvature batch, as in every reference preset",
    )
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per timed round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--refreshes", type=int, default=2, help="timed LLQR refreshes per variant")
    parser.add_argument("--update_interval", type=int, default=1000, help="E for the amortised LLQR cost")
    parser.add_argument("--llqr_batch_size", type=int, default=64)
    parser.add_argument("--scaling_widths", default="32,64,128,256", help="ViT widths for the refresh scaling fit")
    parser.add_argument("--no_memory", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.variants = args.variants.split(",")
    bad = sorted(set(args.variants) - set(VARIANTS))
    if bad:
        parser.error(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
    if "peer_sam" in args.variants:
        try:
            import pytorch_optimizer  # noqa: F401
        except ImportError:
            print("pytorch_optimizer is not installed (pip install -e '.[peers]'): skipping peer_sam")
            args.variants.remove("peer_sam")
    args.scaling_widths = [int(w) for w in args.scaling_widths.split(",")] if args.scaling_widths else []
    os.makedirs(args.output_dir, exist_ok=True)
    results: dict = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{os.cpu_count()}",
        "date": time.strftime("%Y-%m-%d"),
        "batch_size": args.batch_size,
        "llqr_batch_size": args.llqr_batch_size,
        "update_interval": args.update_interval,
        "rounds": args.rounds,
        "steps": args.steps,
        "torch": torch.__version__,
        "models": {},
        "memory": {},
    }
    for name in args.models.split(","):
        results["models"][name] = time_model(name, args)
        if not args.no_memory:
            results["memory"][name] = {v: peak_memory(name, v, args) for v in args.variants}
        print(
            json.dumps(
                {
                    name: {
                        v: round(r.get("ratio_to_base", 0), 3) for v, r in results["models"][name]["variants"].items()
                    }
                }
            ),
            flush=True,
        )
    results["targets"] = target_ratios(results)
    if args.scaling_widths and any(VARIANTS[v] and VARIANTS[v].get("llqr") for v in args.variants):
        results["scaling"] = update_scaling(args)
    with open(os.path.join(args.output_dir, "cost.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = to_markdown(results)
    with open(os.path.join(args.output_dir, "cost.md"), "w") as f:
        f.write(table)
    plot(results, os.path.join(args.output_dir, "cost.png"))
    print(table)
    return results


if __name__ == "__main__":
    main()
