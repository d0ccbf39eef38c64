"""The label-noise plots: validation accuracy over the ρ grid, and histograms of U's entries after refreshes."""

import math
import os
from collections.abc import Sequence

from .protocol import LLQR_SAM_ARMS, METHODS, Cell
from .run import DEV_BINS, HIST_BINS
from .store import Store


def plots(store: Store, summary: dict, cells: Sequence[Cell], out: str, epochs: int, seed0: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []

    def rho_curve(method: str, row: dict) -> bool:  # the knob arms' curves lie on llqr_sam's: the tables have them
        knob = method in LLQR_SAM_ARMS and method != "llqr_sam"
        return bool(row["val_curve"]) and METHODS[method].hp == "rho" and not knob

    keys = [k for k in summary if any(rho_curve(m, r) for m, r in summary[k].items()) and "extra seeds" not in k]
    if keys:
        ncol = min(3, len(keys))
        nrow = math.ceil(len(keys) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.8 * ncol, 3.6 * nrow), squeeze=False)
        for ax in axes.flat[len(keys) :]:
            ax.set_visible(False)
        for ax, key in zip(axes.flat, keys, strict=False):
            for method, row in summary[key].items():
                if rho_curve(method, row):
                    xs = list(row["val_curve"])
                    ax.plot(xs, [row["val_curve"][r] for r in xs], marker="o", label=method)
            ax.set_xscale("log")
            grid = sorted({r for m, row in summary[key].items() if rho_curve(m, row) for r in row["val_curve"]})
            ax.set_xticks(grid, [f"{r:g}" for r in grid], fontsize=7)
            ax.minorticks_off()
            ax.set_xlabel("ρ")
            ax.set_ylabel("val acc (tuning seeds)")
            ax.set_title(key.replace("|", ", "), fontsize=9)
        axes[0][0].legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        path = os.path.join(out, "label_noise_rho.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    # one panel per (cell, method), at the reported ρ, first reported seed: the arms whose U moves differently
    panels = {
        "digits|0.4|sgd": (
            "llqr_sam",
            "llqr",
            "llqr_sam_fast",
            "llqr_sam_adam",
            "llqr_sam_cg",
            "llqr_sam_sched",
            "llqr_sam_ema05",
            "llqr_sam_lr01",
            "llqr_sam_kfac",
        ),
        "digits|0.4|adamw": ("llqr_sam",),
        "digits_vit|0.4|adamw|40 epochs": ("llqr_sam", "llqr"),
    }
    by_key = {c.key(): c for c in cells}
    hist_runs = []
    for key, methods in panels.items():
        cell = by_key.get(key)  # a smaller protocol (smoke) lacks these cells
        if cell is None:
            continue
        for m in methods:
            row = summary.get(key, {}).get(m)
            r = (
                None
                if row is None
                else store.data["runs"].get(cell.run_key_of(m, row["rho"], seed0, cell.n_epochs(epochs)))
            )
            if r is not None and r.get("u_hist"):
                hist_runs.append(r)
    if hist_runs:
        n = len(hist_runs)
        ncol, groups = min(n, 4), math.ceil(n / 4)  # a row pair (U − 1 over U) per 4 runs
        fig, axes = plt.subplots(2 * groups, ncol, figsize=(4.5 * ncol, 6.6 * groups), squeeze=False)
        for j in range(n, groups * ncol):  # the last row pair's unused panels
            axes[2 * (j // ncol)][j % ncol].set_visible(False)
            axes[2 * (j // ncol) + 1][j % ncol].set_visible(False)
        for j, r in enumerate(hist_runs):
            for row, (kind, edges) in enumerate((("u_minus_1", DEV_BINS), ("u", HIST_BINS))):
                ax = axes[2 * (j // ncol) + row][j % ncol]
                for k, h in r["u_hist"].items():
                    ax.stairs(h[kind], edges, label=f"after refresh {k}")
                if kind == "u_minus_1":
                    ax.set_xscale("symlog", linthresh=1e-7)
                    ax.set_xticks([-1, -1e-2, -1e-4, -1e-6, 0, 1e-6, 1e-4, 1e-2, 1])
                    ax.set_xticklabels(["−1", "−1e-2", "−1e-4", "−1e-6", "0", "1e-6", "1e-4", "1e-2", "1"], fontsize=7)
                else:
                    ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("U − 1 (diagonal entries)" if kind == "u_minus_1" else "U (diagonal entries)")
                ax.set_ylabel("entries")
                if row == 0:
                    ax.set_title(
                        f"{r['method']} {r['task']} {r['noise']:.0%} {r['opt']} "
                        f"{'inner lr' if r.get('hp') == 'inner_lr' else 'ρ'} {r['rho']:g} "
                        f"seed {r['seed']}",
                        fontsize=8,
                    )
                    ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out, "label_noise_u_hist.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files
