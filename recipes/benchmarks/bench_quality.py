"""Quality of base, SAM, FSAM, infoSAM, LLQR, LLQR+SAM, LookSAM, WSAM and past-FSAM on the recipes' embedded
tasks, over seeds.

Every method runs the recipe's own `main()` with the same budget (the recipe defaults, or what `--extra` adds), each
run in a fresh subprocess. The report gives mean ± std of test accuracy (ViT on digits) or test BLEU (translation).

    python recipes/benchmarks/bench_quality.py --recipe image --output_dir runs/quality_image
    python recipes/benchmarks/bench_quality.py --recipe translation --output_dir runs/quality_translation
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = {
    "image": ("recipes/image_classification/run_image_classification.py", "test_accuracy"),
    "translation": ("recipes/translation/run_translation.py", "test_bleu"),
}
# The method flags; everything else is the recipe's default budget. ρ and LLQR settings are the recipes' defaults.
METHODS: dict[str, list[str]] = {
    "base": ["--sam_mode", "none"],
    "sam": ["--sam_mode", "sam"],
    "fsam": ["--sam_mode", "fsam"],
    "infosam": ["--sam_mode", "infosam"],
    "llqr": ["--sam_mode", "none", "--llqr"],
    "llqr_sam": ["--sam_mode", "sam", "--llqr"],
    "looksam": ["--sam_mode", "looksam", "--looksam_interval", "5"],
    "wsam": ["--sam_mode", "wsam"],
    "past_fsam": ["--sam_mode", "past_fsam"],
}


def run_one(recipe: str, method: str, seed: int, args: argparse.Namespace) -> dict:
    script, metric = RECIPES[recipe]
    out = os.path.join(args.output_dir, f"{method}-seed{seed}")
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: the recipes resume from any checkpoint they find
    cmd = [sys.executable, script, "--output_dir", out, "--seed", str(seed),
           "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", *METHODS[method],
           *shlex.split(args.extra)]
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "all_results.json")) as f:
        results = json.load(f)
    return {"metric": results[metric], "seconds": time.time() - start, "train_loss": results.get("train_loss")}


def summarize(results: dict, metric: str) -> str:
    lines = [f"| method | {metric} (mean ± std) | runs | seconds per run |", "|---|---|---|---|"]
    for method, runs in results.items():
        values = [r["metric"] for r in runs]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        secs = statistics.fmean(r["seconds"] for r in runs)
        lines.append(f"| {method} | {statistics.fmean(values):.2f} ± {std:.2f} | {len(values)} | {secs:.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, metric: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    means = [statistics.fmean(r["metric"] for r in results[n]) for n in names]
    stds = [statistics.stdev([r["metric"] for r in results[n]]) if len(results[n]) > 1 else 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    low = min(m - s for m, s in zip(means, stds, strict=True))
    high = max(m + s for m, s in zip(means, stds, strict=True))
    ax.set(ylabel=metric, title=f"{metric}: mean ± std over seeds", ylim=(max(0.0, low - 0.5 * (high - low)), None))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=list(RECIPES), required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--extra", default="", help="extra recipe flags for every run (same budget for all)")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    os.makedirs(args.output_dir, exist_ok=True)
    metric = RECIPES[args.recipe][1]
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in (int(s) for s in args.seeds.split(",")):  # seeds outermost: methods interleave in time
        for method in methods:
            results[method].append(run_one(args.recipe, method, seed, args))
            print(f"{method} seed {seed}: {metric} {results[method][-1]['metric']:.3f}", flush=True)
    report = {"recipe": args.recipe, "metric": metric, "extra": args.extra, "date": time.strftime("%Y-%m-%d"),
              "results": results}
    with open(os.path.join(args.output_dir, "quality.json"), "w") as f:
        json.dump(report, f, indent=1)
    table = summarize(results, metric)
    with open(os.path.join(args.output_dir, "quality.md"), "w") as f:
        f.write(table)
    plot(results, metric, os.path.join(args.output_dir, "quality.png"))
    print(table)
    return report


if __name__ == "__main__":
    main()
