r"""Label-noise quality benchmark: does LLQR+SAM beat SAM at equal tuning effort? (issue 12, items 1 and 3)

Symmetric label noise on the training split only, each method's one main hyperparameter (ρ; for LLQR alone, which
has no ρ, its inner lr) chosen on a clean validation split by the mean over two tuning seeds that are never reported,
then five fresh seeds at the chosen value; the protocol of the SAM paper's label-noise experiments (Foret et al.,
arXiv 2010.01412 §3.3), with SAM, FSAM, LookSAM, WSAM, past-FSAM, LLQR (arXiv 2605.04230), LLQR+SAM (arXiv
2605.16134), LLQR+FSAM, LLQR+past-FSAM and LLQR+SAM under each of the reference's knobs (solver, schedules, cadence,
EMA, divergence, structure) as arms.

One command regenerates the JSON, the markdown tables and the plots (resumable: runs already in the JSON are
skipped, and the JSON is rewritten after every run):

    OMP_NUM_THREADS=1 python recipes/benchmarks/bench_label_noise.py --output_dir runs/label_noise --workers 2 \
        --answer recipes/benchmarks/results/label_noise_answer.md

`--cells` runs a subset (two processes on disjoint cells, each with its own `--output_dir`, split the work; then
`--merge_from DIR …` adds their runs to this JSON), `--report_only` rebuilds the tables and plots from the JSON.

Reduced from issue 12's protocol to fit a shared 2-core machine: 60 epochs, not 200 (the main cell is also run at
200 epochs, as a check), with SGD lr 0.05 so that base still memorises the noisy labels; the recipe's ViT 40 epochs
under AdamW only, on a ρ grid shifted down (it stops learning at ρ 0.2); the CNN, the ViT, the synthetic task and 0 /
20 % noise run only base, SAM and LLQR+SAM; the other arms run on the main cell (digits MLP, 40 %, SGD).

The code lives in `recipes/benchmarks/label_noise/`: `protocol` (arms, cells, grids, seeds), `data` (tasks and
models), `loop` (the training loop), `run` (one run, the cost measurement), `store` (the resumable JSON), `report`
(statistics and tables) and `plots`; this file is the command line. The training loop is plain torch (no Trainer,
for speed) built on the package's public math API, the functions the trainer itself uses: `compute_perturbation`
(ε), `hf_llqrsam.sam.apply_perturbation_` / `restore_` (θ + ε and the exact restore), the LookSAM and WSAM helpers,
and `LLQRPreconditioner.update` / `apply_` (refresh U before the step at 0, E, 2E, …; U·g̃ before the optimizer
step). `tests/recipes/test_label_noise.py` checks it against `LLQRSAMTrainer` on a tiny MLP (SAM, LookSAM, WSAM
coupled and decoupled, past-FSAM, and LLQR+SAM, LLQR+FSAM and LLQR+past-FSAM with refreshes: parameters equal to
1e-6).
"""

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable (the ViT is the recipe's)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from recipes.benchmarks.label_noise.data import ARCH, NOISE_SEED, SPLIT_SEED, load_task  # noqa: E402
from recipes.benchmarks.label_noise.plots import plots  # noqa: E402
from recipes.benchmarks.label_noise.protocol import (  # noqa: E402
    BATCH_SIZE,
    INNER_LR_GRID,
    LLQR_INTERVAL,
    LRS,
    METHODS,
    REPORT_SEEDS,
    RHO_GRID,
    RHO_GRID_TASK,
    TUNING_SEEDS,
    Cell,
    grid_for,
    protocol,
)
from recipes.benchmarks.label_noise.report import knob_selection, markdown, summarise  # noqa: E402
from recipes.benchmarks.label_noise.store import Store, choose, complete_cost, execute  # noqa: E402


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--protocol", default="full", choices=("full", "smoke"))
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--grid_size", type=int, default=0, help="ρ values per tuned method (thinned, ends kept; 0: all)")
    ap.add_argument("--tuning_seeds", type=int, nargs="+", default=list(TUNING_SEEDS))
    ap.add_argument("--seeds", type=int, nargs="+", default=list(REPORT_SEEDS))
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cells", nargs="+", help="run only these cells, as task|noise|opt (e.g. digits|0.4|sgd)")
    ap.add_argument("--methods", nargs="+", help="run only these methods of the chosen cells (the report keeps all)")
    ap.add_argument("--answer", help="a markdown file (the hand-written answer) appended to the report")
    ap.add_argument("--report_only", action="store_true", help="tables and plots from the JSON, no new runs")
    ap.add_argument(
        "--merge_from",
        nargs="+",
        default=[],
        help="output dirs of other processes (disjoint --cells): their runs join this JSON first",
    )
    ap.add_argument("--skip_cost", action="store_true", help="no seconds-per-epoch measurement after the runs")
    a = ap.parse_args(argv)
    os.makedirs(a.output_dir, exist_ok=True)
    cells = protocol(a.protocol)
    if a.protocol == "smoke":
        a.grid_size = 2
    command = (
        "python recipes/benchmarks/bench_label_noise.py --output_dir "
        + a.output_dir
        + f" --protocol {a.protocol} --epochs {a.epochs} --grid_size {a.grid_size} --tuning_seeds "
        + " ".join(map(str, a.tuning_seeds))
        + " --seeds "
        + " ".join(map(str, a.seeds))
        + f" --workers {a.workers}"
        + (f" --answer {a.answer}" if a.answer else "")
    )
    tasks = sorted({(c.task, c.noise) for c in cells})
    meta = {
        "command": command,
        "epochs": a.epochs,
        "batch_size": BATCH_SIZE,
        "lrs": LRS,
        "grid_size": a.grid_size,
        "rho_grids": {o: list(grid_for(Cell("", 0, o, ()), "sam", a.grid_size)) for o in RHO_GRID},
        "rho_grids_task": {
            f"{t}|{o}": list(grid_for(Cell(t, 0, o, ()), "sam", a.grid_size)) for t, o in RHO_GRID_TASK
        },
        "tuning_seeds": a.tuning_seeds,
        "seeds": a.seeds,
        "llqr_update_interval": LLQR_INTERVAL,
        "methods": {k: {**asdict(v), "llqr_overrides": dict(v.llqr_overrides)} for k, v in METHODS.items()},
        "cells": [asdict(c) for c in cells],
        "data": {f"{t}|{n}": load_task(t, n).record for t, n in tasks},
        "architectures": ARCH,
        "torch": torch.__version__,
    }
    meta["protocol_text"] = (
        f"{a.epochs} epochs (where a cell names its own: that), batch {BATCH_SIZE}, SGD momentum 0.9 lr "
        f"{LRS['sgd']} / AdamW lr {LRS['adamw']} "
        f"(weight decay 0), constant LR, fixed. Symmetric noise on the train split only (seed {NOISE_SEED}), "
        f"val and test clean; stratified 60/20/20 split (seed {SPLIT_SEED}). ρ chosen per method, optimizer and "
        f"noise level by mean final validation accuracy over tuning seeds {a.tuning_seeds} (never reported) on the "
        f"same grid for every tuned method of a cell (SGD {meta['rho_grids']['sgd']}, AdamW "
        f"{meta['rho_grids']['adamw']}, the ViT with AdamW {meta['rho_grids_task']['digits_vit|adamw']}, the "
        f"200-epoch cell SGD's and 1.0, 1.5; LLQR alone, which has no ρ: its inner lr over {list(INNER_LR_GRID)}); "
        f"reported: seeds {a.seeds} at the chosen ρ, final-epoch test accuracy; "
        f"paired differences vs SAM on the same seed with a 95 % t-interval. LLQR: diagonal U, refreshed every "
        f"{LLQR_INTERVAL} steps on 64 training examples (noisy labels), reference defaults otherwise."
    )
    store = Store(os.path.join(a.output_dir, "label_noise.json"), meta)
    for other in a.merge_from:
        store.merge(os.path.join(other, "label_noise.json"))
    ap_cells = [c for c in cells if a.cells is None or c.key() in a.cells]
    for cell in [] if a.report_only else ap_cells:  # cell by cell: tune, then the reported seeds
        if a.methods is not None:
            cell = dataclasses.replace(cell, methods=tuple(m for m in cell.methods if m in a.methods))
        ep = cell.n_epochs(a.epochs)
        tuning = [
            (cell.task, cell.noise, method, cell.opt, rho, s, ep)
            for method in cell.methods
            if METHODS[method].tuned and cell.fixed_rho(method) is None
            for rho in grid_for(cell, method, a.grid_size)
            for s in a.tuning_seeds
        ]
        execute(store, tuning, a.workers)
        final = []
        for method in cell.methods:
            rho = (
                choose(store, cell, method, grid_for(cell, method, a.grid_size), ep, a.tuning_seeds)[0]
                if METHODS[method].tuned
                else 0.0
            )
            final += [
                (
                    cell.task,
                    cell.noise,
                    method,
                    cell.opt,
                    rho,
                    s,
                    ep,
                    (1, 3, 6) if METHODS[method].llqr and s == a.seeds[0] else (),
                )
                for s in list(a.seeds) + list(cell.extra_seeds)
            ]
        execute(store, final, a.workers)
    if a.protocol == "full" and not a.report_only and not a.skip_cost:
        complete_cost(store, a.epochs)
    summary = summarise(store, cells, a.epochs, a.grid_size, a.tuning_seeds, a.seeds)
    selection = knob_selection(summary)
    store.data["summary"] = summary
    store.data["knob_selection"] = selection
    store.save()
    with open(os.path.join(a.output_dir, "label_noise.md"), "w") as f:
        f.write(markdown(summary, meta, store.data.get("cost"), selection))
        if a.answer:
            with open(a.answer) as g:
                f.write("\n" + g.read())
    plots(store, summary, cells, a.output_dir, a.epochs, a.seeds[0])
    return summary


if __name__ == "__main__":
    main()
