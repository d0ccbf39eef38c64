"""Quality of base, SAM, FSAM, infoSAM, LLQR, LLQR+SAM, LookSAM, WSAM and past-FSAM on the recipes' embedded
tasks, over seeds (the causal-LM recipe: base, SAM and LLQR+SAM from its shipped configs).

Every method runs the recipe's own `main()` with the same budget (the recipe defaults, or what `--extra` adds), each
run in a fresh subprocess. The report gives mean ± std of test accuracy (ViT on digits) or test BLEU (translation).

    python recipes/benchmarks/bench_quality.py --recipe image --output_dir runs/quality_image
    python recipes/benchmarks/bench_quality.py --recipe translation --output_dir runs/quality_translation
    python recipes/benchmarks/bench_quality.py --recipe causal_lm --output_dir runs/quality_causal_lm
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
    "causal_lm": ("recipes/causal_lm/run_causal_lm.py", "test_exact_match"),
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

# The causal-LM recipe's methods are its shipped configs (ρ from probe_rho.py, LLQR sized to an 80-step run; see
# recipes/causal_lm/README.md); a config file must be the recipe's first argument.
RECIPE_METHODS: dict[str, dict[str, list[str]]] = {
    "causal_lm": {
        "base": ["recipes/causal_lm/configs/smollm2_lora_adamw.yaml"],
        "sam": ["recipes/causal_lm/configs/smollm2_lora_sam.yaml"],
        "llqr_sam": ["recipes/causal_lm/configs/smollm2_lora_llqrsam.yaml"],
    },
}


def methods_of(recipe: str) -> dict[str, list[str]]:
    """The method table of `recipe`: its own (config files) when it has one, else `METHODS` (flags)."""
    return RECIPE_METHODS.get(recipe, METHODS)


def run_one(recipe: str, method: str, seed: int, args: argparse.Namespace) -> dict:
    script, metric = RECIPES[recipe]
    out = os.path.join(args.output_dir, f"{method}-seed{seed}")
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: the recipes resume from any checkpoint they find
    flags = methods_of(recipe)[method]
    configs = [f for f in flags if f.endswith((".yaml", ".yml", ".json"))]
    cmd = [
        sys.executable,
        script,
        *configs,
        "--output_dir",
        out,
        "--seed",
        str(seed),
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--save_strategy",
        "no",
        *[f for f in flags if f not in configs],
        *shlex.split(args.extra),
    ]
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "all_results.json")) as f:
        results = json.load(f)
    return {
        "metric": results[metric],
        "seconds": time.time() - start,
        "train_loss": results.get("train_loss"),
        "validation": results.get(metric.replace("test_", "eval_", 1)),
    }


def summarize(results: dict, metric: str) -> str:
    lines = [f"| method | {metric} (mean ± std) | runs | seconds per run |", "|---|---|---|---|"]
    for method, runs in results.items():
        values = [r["metric"] for r in runs]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        secs = statistics.fmean(r["seconds"] for r in runs)
        digits = 2 if metric.endswith("bleu") else 3
        mean = f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"
        lines.append(f"| {method} | {mean} | {len(values)} | {secs:.0f} |")
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
    parser.add_argument("--methods", default=None, help="comma-separated; default: every method of the recipe")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--extra", default="", help="extra recipe flags for every run (same budget for all)")
    args = parser.parse_args(argv)
    table = methods_of(args.recipe)
    methods = args.methods.split(",") if args.methods else list(table)
    unknown = sorted(set(methods) - set(table))
    if unknown:
        parser.error(f"--methods: unknown {unknown} for --recipe {args.recipe}; choose from {list(table)}")
    os.makedirs(args.output_dir, exist_ok=True)
    metric = RECIPES[args.recipe][1]
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in (int(s) for s in args.seeds.split(",")):  # seeds outermost: methods interleave in time
        for method in methods:
            results[method].append(run_one(args.recipe, method, seed, args))
            print(f"{method} seed {seed}: {metric} {results[method][-1]['metric']:.3f}", flush=True)
    report = {
        "recipe": args.recipe,
        "metric": metric,
        "extra": args.extra,
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
    }
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
