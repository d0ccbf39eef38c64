"""The label-noise report: paired statistics, the per-cell summary, the knob selection and the markdown tables."""

import math
import statistics
from collections.abc import Sequence

from .data import ARCH
from .protocol import LLQR_SAM_ARMS, LRS, METHODS, Cell, grid_for
from .store import Store, choose, complete

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_quantile(df: int) -> float:
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:  # pragma: no cover
        return T975.get(df, 1.96)


def mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Mean of a − b (same seeds) and its 95 % t-interval."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    m, s = mean_sd(d)
    h = t_quantile(len(d) - 1) * s / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return m, m - h, m + h


def summarise(
    store: Store, cells: list[Cell], epochs: int, grid_size: int, tuning_seeds: Sequence[int], seeds: Sequence[int]
) -> dict:
    summary: dict = {}
    all_seeds = seeds
    for cell in cells:
        rows = summary.setdefault(cell.key(), {})
        seeds = list(all_seeds) + list(cell.extra_seeds)
        for method in cell.methods:
            grid = grid_for(cell, method, grid_size)
            ep = cell.n_epochs(epochs)
            if not complete(store, cell, method, grid, ep, tuning_seeds, seeds):
                continue
            rho, curve = choose(store, cell, method, grid, ep, tuning_seeds) if METHODS[method].tuned else (0.0, {})
            runs = [store.data["runs"][cell.run_key_of(method, rho, s, ep)] for s in seeds]
            row = {
                "rho": rho,
                "val_curve": curve,
                "tuning_runs": len(curve) * len(tuning_seeds),
                "test": [r["test_acc"] for r in runs],
                "train_noisy": [r["train_noisy_acc"] for r in runs],
                "seconds": [r["seconds"] for r in runs],
            }
            if METHODS[method].llqr:
                row["u_rms_displacement"] = [r.get("u_rms_displacement_last", math.nan) for r in runs]
                row["u_at_floor_max"] = [r.get("u_at_floor_max", math.nan) for r in runs]
                row["refreshes"] = runs[0].get("refreshes", 0)
                row["u_min"] = min(min(x["u_min"] for x in r["u_refreshes"]) for r in runs if r.get("u_refreshes"))
                row["u_max"] = max(max(x["u_max"] for x in r["u_refreshes"]) for r in runs if r.get("u_refreshes"))
                row["u_rms_by_refresh"] = [
                    statistics.fmean(r["u_refreshes"][k]["u_rms_displacement"] for r in runs)
                    for k in range(len(runs[0].get("u_refreshes", [])))
                ]
            rows[method] = row
    for key in list(summary):
        rows = summary[key]
        if not rows:
            del summary[key]
        elif "sam" in rows:
            for method, row in rows.items():
                if method != "sam":
                    row["diff_vs_sam"] = paired(row["test"], rows["sam"]["test"])
    return summary


def knob_selection(summary: dict) -> dict:
    """LLQR+SAM with its knobs chosen on validation, per cell: of the cell's LLQR+SAM arms (`LLQR_SAM_ARMS`), the one
    whose chosen ρ has the best mean validation accuracy over the tuning seeds (ties: the earlier arm), and its
    reported test accuracy against SAM's. Its validation budget is the sum of the arms' tuning runs; SAM's is its
    own, so the comparison favours LLQR+SAM (more tuning, the winner picked from more draws)."""
    out = {}
    for key, rows in summary.items():
        arms = [m for m in LLQR_SAM_ARMS if m in rows]
        if len(arms) < 2 or "sam" not in rows or "extra seeds" in key:  # a seeds check, not a tuning cell
            continue
        best = max(arms, key=lambda m: (max(rows[m]["val_curve"].values()), -arms.index(m)))
        out[key] = {
            "arm": best,
            "rho": rows[best]["rho"],
            "val": max(rows[best]["val_curve"].values()),
            "diff_vs_sam": rows[best]["diff_vs_sam"],
            "test": rows[best]["test"],
            "arms": len(arms),
            "tuning_runs": sum(rows[m]["tuning_runs"] for m in arms),
            "sam_tuning_runs": rows["sam"]["tuning_runs"],
            "sam_val": max(rows["sam"]["val_curve"].values()),
        }
    return out


def fmt_pm(xs: Sequence[float], digits: int = 3) -> str:
    m, s = mean_sd(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown(summary: dict, meta: dict, cost: dict | None = None, selection: dict | None = None) -> str:
    lines = [
        "# Label-noise benchmark (issue 12)",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Protocol: {meta['protocol_text']}",
        "",
    ]
    for key, rows in summary.items():
        task, noise, opt, *extra = key.split("|")
        more = "".join(
            f", {x}"
            if x.endswith("epochs")
            else f", ρ {x.split()[1]} for every method (not tuned: a check)"
            if x.startswith("rho ")
            else f", reported seeds {meta['seeds']} plus {x} (a check of the main gap)"
            for x in extra
        )
        lines += [
            f"## {task} ({ARCH[task]}), {float(noise):.0%} noise, {opt.upper()} (lr {LRS[opt]}){more}",
            "",
            "| method | chosen ρ (LLQR alone: inner lr) | test acc (mean ± sd) | diff vs SAM [95 % CI] "
            "| noisy-train acc | s/run "
            "| U RMS(U−1) | U at floor (max) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method, row in rows.items():
            diff = row.get("diff_vs_sam")
            dtxt = "–" if diff is None else f"{diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]"
            hp = METHODS[method].hp
            rtxt = f"{row['rho']:g}" if hp == "rho" else f"inner lr {row['rho']:g}" if hp == "inner_lr" else "–"
            utxt = (
                (fmt_pm(row["u_rms_displacement"], 4), f"{max(row['u_at_floor_max']):.4f}")
                if "u_rms_displacement" in row
                else ("–", "–")
            )
            lines.append(
                f"| {method} | {rtxt} | {fmt_pm(row['test'])} | {dtxt} | {fmt_pm(row['train_noisy'])} | "
                f"{statistics.fmean(row['seconds']):.1f} | {utxt[0]} | {utxt[1]} |"
            )
        lines += ["", "Validation accuracy over the ρ grid (mean of the tuning seeds):", ""]
        for method, row in rows.items():
            if row["val_curve"]:
                what = " (inner lr)" if METHODS[method].hp == "inner_lr" else ""
                lines.append(f"- {method}{what}: " + ", ".join(f"{r:g}: {v:.3f}" for r, v in row["val_curve"].items()))
        lines.append("")
    lines += [
        "## How far U moved (LLQR runs, reported seeds)",
        "",
        "| cell | method | refreshes | RMS(U − 1) after refresh 1 / middle / last (mean over seeds) "
        "| U min … max over all refreshes | max fraction of entries at min_diag |",
        "|---|---|---|---|---|---|",
    ]
    for key, rows in summary.items():
        for method, row in rows.items():
            if "u_rms_displacement" in row and row["u_rms_by_refresh"]:
                by = row["u_rms_by_refresh"]
                lines.append(
                    f"| {key.replace('|', ' ')} | {method} | {row['refreshes']} | {by[0]:.2e} / "
                    f"{by[len(by) // 2]:.2e} / {by[-1]:.2e} | {row['u_min']:.3g} … {row['u_max']:.3g} | "
                    f"{max(row['u_at_floor_max']):.4f} |"
                )
    lines += [
        "",
        "## Verdict, computed: LLQR+SAM-family rows against SAM (same cell, same seeds)",
        "",
        "| cell | method | diff vs SAM [95 % CI] | verdict | time per run / SAM's |",
        "|---|---|---|---|---|",
    ]
    for key, rows in summary.items():
        sam = rows.get("sam")
        for method, row in rows.items():
            if sam is None or method == "sam" or not (METHODS[method].llqr and METHODS[method].sam_mode != "none"):
                continue
            m, lo, hi = row["diff_vs_sam"]
            verdict = "beats SAM" if lo > 0 else "loses to SAM" if hi < 0 else "no significant difference"
            ratio = (cost or {}).get("ratio_to_sam", {}).get(method)
            if ratio is None:
                ratio = statistics.fmean(row["seconds"]) / statistics.fmean(sam["seconds"])
            lines.append(
                f"| {key.replace('|', ' ')} | {method} | {m:+.3f} [{lo:+.3f}, {hi:+.3f}] | {verdict} | {ratio:.2f} |"
            )
    if selection:
        lines += [
            "",
            "## LLQR+SAM with its knobs chosen on validation (the arm of best tuning-seed validation accuracy)",
            "",
            "| cell | arms | chosen arm, ρ | its val acc / SAM's | diff vs SAM [95 % CI] | validation runs: "
            "LLQR+SAM / SAM |",
            "|---|---|---|---|---|---|",
        ]
        for key, sel in selection.items():
            m, lo, hi = sel["diff_vs_sam"]
            lines.append(
                f"| {key.replace('|', ' ')} | {sel['arms']} | {sel['arm']}, {sel['rho']:g} | "
                f"{sel['val']:.3f} / {sel['sam_val']:.3f} | {m:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
                f"{sel['tuning_runs']} / {sel['sam_tuning_runs']} |"
            )
    if cost:
        lines += [
            "",
            "The time ratio is from the cost measurement below where it has the method (else from the "
            "runs' wall seconds, which mix the machine's changing load).",
            "",
            *[
                line
                for x in cost.get("added", [])
                for line in (
                    f"Methods added later ({', '.join(m for m in x['seconds_per_epoch'] if m != 'sam')}) were "
                    f"timed against a fresh SAM over {x['epochs']} epochs, {x['rounds']} round(s); their ratio is "
                    f"to that SAM ({x['seconds_per_epoch']['sam']:.3f} s/epoch).",
                    "",
                )
            ],
            f"## Cost: seconds per epoch, digits MLP, SGD, ρ 0.5 ({cost['epochs']} epochs, median of "
            f"{cost['rounds']} interleaved rounds, one process, 1 thread)",
            "",
            "| method | s/epoch | / SAM |",
            "|---|---|---|",
        ]
        for m, t in cost["seconds_per_epoch"].items():
            lines.append(f"| {m} | {t:.3f} | {cost['ratio_to_sam'].get(m, math.nan):.2f} |")
    lines.append("")
    return "\n".join(lines)
