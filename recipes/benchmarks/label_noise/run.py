"""One label-noise run (`run_one`: data, model, optimizer, batches, the loop, accuracies and U's diagnostics) and the
seconds-per-epoch measurement (`measure_cost`)."""

import math
import os
import statistics
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hf_llqrsam import LLQRPreconditioner

from .data import MODELS, load_task
from .loop import train
from .protocol import BATCH_SIZE, LRS, METHODS, llqr_config

HIST_BINS = [0.0] + [10 ** (k / 10) for k in range(-80, 11)]  # U entries: 0, then 1e-8 … 10, log-spaced
# U − 1, signed log-spaced edges from −1 to 1 (resolution down to 1e-7 around 0; beyond ±1 clamped into the ends)
DEV_BINS = [-(10 ** (k / 4)) for k in range(0, -29, -1)] + [0.0] + [10 ** (k / 4) for k in range(-28, 1)]


def u_stats(pre: LLQRPreconditioner) -> tuple[Tensor, float, float]:
    """(all diagonal entries of U, RMS of U − 1, fraction of entries at `min_diag`)."""
    d = torch.cat([p.flatten() for p in pre.structure.diagonal_parts()])  # the identity scaling is already out
    rms = float(((d - 1) ** 2).mean().sqrt())
    floor = float((d <= pre.config.min_diag * (1 + 1e-6)).double().mean())
    return d, rms, floor


def _hist(d: Tensor) -> dict[str, list[int]]:
    """Counts of U's entries over HIST_BINS and of U − 1 over DEV_BINS."""
    u = torch.histogram(d.double().clamp(0, 10), torch.tensor(HIST_BINS, dtype=torch.float64)).hist
    dev = torch.histogram((d.double() - 1).clamp(-1, 1), torch.tensor(DEV_BINS, dtype=torch.float64)).hist
    return {"u": [int(c) for c in u], "u_minus_1": [int(c) for c in dev]}


def make_optimizer(name: str, params: Sequence[Tensor], lr: float | None = None) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr or LRS["sgd"], momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr or LRS["adamw"], weight_decay=0.0)
    raise ValueError(name)


def epoch_batches(n: int, epochs: int, seed: int) -> list[Tensor]:
    """Shuffled mini-batches of BATCH_SIZE (last one partial), a fresh permutation per epoch, from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        out += [perm[i : i + BATCH_SIZE] for i in range(0, n, BATCH_SIZE)]
    return out


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((model(x).argmax(-1) == y).double().mean())


def run_one(
    task: str,
    noise: float,
    method_name: str,
    opt: str,
    rho: float,
    seed: int,
    epochs: int,
    hist_at: Sequence[int] = (),
) -> dict:
    """One training run; returns its accuracies, seconds and (LLQR) the U displacement after every refresh.

    `rho` is the value of the method's tuned hyperparameter: ρ, or for LLQR alone (`hp="inner_lr"`) its inner lr.
    """
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data = load_task(task, noise)
    method = METHODS[method_name]
    torch.manual_seed(seed)
    model = MODELS[task](data.x_train.shape[1], data.classes)
    optimizer = make_optimizer(opt, [p for p in model.parameters() if p.requires_grad])
    n = len(data.y_train)
    batches = epoch_batches(n, epochs, seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    refreshes: list[dict] = []
    hists: dict[str, dict[str, list[int]]] = {}
    pre_holder: list[LLQRPreconditioner] = []

    def curv(step: int) -> list[int]:
        return torch.randperm(n, generator=gen)[:64].tolist()

    def on_refresh(step: int, pre: LLQRPreconditioner, metrics: dict) -> None:
        d, rms, floor = u_stats(pre)
        refreshes.append(
            {
                "step": step,
                "u_rms_displacement": rms,
                "u_at_floor": floor,
                "u_min": float(d.min()),
                "u_max": float(d.max()),
                "objective_ratio": metrics.get("llqr/objective_end", math.nan)
                / metrics.get("llqr/objective_start", math.nan)
                if metrics.get("llqr/objective_start")
                else math.nan,
            }
        )
        pre_holder[:] = [pre]
        if pre.num_updates in hist_at:
            hists[str(pre.num_updates)] = _hist(d)

    start = time.perf_counter()
    llqr = llqr_config(method, hp_value=rho) if method.llqr else None
    info = train(
        model,
        method,
        optimizer,
        rho if method.hp == "rho" else 0.0,
        batches,
        data.x_train,
        data.y_train,
        llqr=llqr,
        curvature_indices=curv,
        on_refresh=on_refresh,
    )
    seconds = time.perf_counter() - start
    info.pop("preconditioner")
    out = {
        "task": task,
        "noise": noise,
        "method": method_name,
        "opt": opt,
        "lr": LRS[opt],
        "rho": rho,
        "hp": method.hp,
        "seed": seed,
        "epochs": epochs,
        "steps": len(batches),
        "seconds": seconds,
        **info,
        "val_acc": accuracy(model, data.x_val, data.y_val),
        "test_acc": accuracy(model, data.x_test, data.y_test),
        "train_noisy_acc": accuracy(model, data.x_train, data.y_train),
        "train_clean_acc": accuracy(model, data.x_train, data.y_train_clean),
    }
    if refreshes:
        out["u_refreshes"] = refreshes
        out["u_rms_displacement_last"] = refreshes[-1]["u_rms_displacement"]
        out["u_at_floor_last"] = refreshes[-1]["u_at_floor"]
        out["u_at_floor_max"] = max(r["u_at_floor"] for r in refreshes)
    if hist_at and pre_holder:
        hists["last"] = _hist(u_stats(pre_holder[-1])[0])
    if hists:
        out["u_hist"] = hists
    return out


def measure_cost(methods: Sequence[str], epochs: int = 10, rounds: int = 3) -> dict:
    """Seconds per epoch of each method on the main cell (digits MLP, 40 %, SGD, ρ 0.5), in one process, the methods
    interleaved round by round so that they share the machine's load; the median over rounds. With a refresh every
    100 steps, 10 epochs (170 steps) hold two refreshes (steps 0 and 100), about the cadence of the full runs."""
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for m in methods:
            hp = METHODS[m].hp  # ρ 0.5 for the ρ-tuned arms; LLQR alone at the reference's inner lr
            r = run_one("digits", 0.4, m, "sgd", 0.5 if hp == "rho" else 1e-3 if hp == "inner_lr" else 0.0, 0, epochs)
            times[m].append(r["seconds"] / epochs)
    med = {m: statistics.median(t) for m, t in times.items()}
    return {
        "epochs": epochs,
        "rounds": rounds,
        "seconds_per_epoch": med,
        "samples": times,
        "ratio_to_sam": {m: med[m] / med["sam"] for m in methods} if "sam" in med else {},
    }
