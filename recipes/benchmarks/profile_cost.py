"""Where the cost of a SAM step and of an LLQR refresh goes: the profile behind the README's cost reading.

Three measurements on one model of `bench_cost.py`, each as a median over repetitions in one process:

1. SAM-specific tensor work per step, outside the two forward/backward passes: our `compute_perturbation` +
   `apply_perturbation_` + `restore_` + the finiteness check, against the textbook loop (one norm, clone, add, copy).
2. The LLQR refresh split into building the curvature problem, the T products (G + λI)·v, and the rest of the inner
   loop (U-gradient, clipping, SGD, EMA).
3. Jv, the costlier half of a GGN product, three ways: the double-VJP the package uses, forward-mode `torch.func.jvp`
   (recomputes the forward), and `torch.func.linearize` (traces once per refresh; may fail on models with
   data-dependent control flow).

    python recipes/benchmarks/profile_cost.py --model marian-s --output_dir runs/profile_cost
"""

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: this checkout's root first, for `recipes` and its `hf_llqrsam`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch.func import functional_call, jvp, linearize  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import hf_llqrsam  # noqa: E402
from hf_llqrsam import SAMState, compute_perturbation  # noqa: E402
from hf_llqrsam.config import SAMConfig  # noqa: E402
from hf_llqrsam.llqr import LLQRConfig, LLQRPreconditioner, curvature_problem  # noqa: E402
from hf_llqrsam.sam import apply_perturbation_, restore_, total_norm  # noqa: E402
from recipes.benchmarks.bench_cost import MODELS, build_model, synthetic_batch  # noqa: E402


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def sam_work(model: torch.nn.Module, reps: int, rho: float = 0.05) -> dict[str, float]:
    """Milliseconds of the SAM-specific tensor work of one step, ours vs the textbook loop."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    cfg, state = SAMConfig(mode="sam", rho=rho), SAMState()

    def ours() -> None:
        pert = compute_perturbation(cfg, state, names, params, grads, rho)
        backups = apply_perturbation_(params, pert.eps)
        restore_(params, backups)
        bool(torch.isfinite(total_norm(grads)))

    def hand() -> None:
        scale = rho / (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) + 1e-12)
        with torch.no_grad():
            backup = [p.detach().clone() for p in params]
            torch._foreach_add_(params, torch._foreach_mul(grads, scale))
            torch._foreach_copy_(params, backup)

    with torch.no_grad():
        return {"tensors": len(params), "ours_ms": _median_ms(ours, reps), "hand_ms": _median_ms(hand, reps)}


def refresh_split(model: torch.nn.Module, batch: dict, reps: int, inner_steps: int = 50) -> dict[str, float]:
    """Seconds of one refresh: build, `inner_steps` products, and the rest of the inner loop."""
    pre = LLQRPreconditioner(model, LLQRConfig(inner_steps=inner_steps))
    build_s, products_s, total_s = [], [], []
    for _ in range(reps):
        start = time.perf_counter()
        g, gv = curvature_problem(model, batch)
        build_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(inner_steps):
            gv(g)
        products_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        pre.update(model, batch)
        total_s.append(time.perf_counter() - start)
    build, products, total = (statistics.median(x) for x in (build_s, products_s, total_s))
    return {
        "refresh_s": total,
        "build_s": build,
        "products_s": products,
        "rest_s": total - build - products,
        "product_ms": 1e3 * products / inner_steps,
    }


def jv_ways(model: torch.nn.Module, batch: dict, reps: int) -> dict[str, float | str]:
    """Milliseconds of one Jv (logits' Jacobian times a parameter-shaped v) by three methods."""
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    keys, params = list(named), [p.detach() for p in named.values()]
    gen = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=gen) for p in params]
    out: dict[str, float | str] = {}

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(keys, ps, strict=True)), (), inputs).logits

    with sdpa_kernel(SDPBackend.MATH):
        logits = model(**inputs).logits
        w0 = torch.zeros_like(logits, requires_grad=True)
        live = list(named.values())
        jt = torch.autograd.grad(logits, live, grad_outputs=w0, create_graph=True, allow_unused=True)
        used = [i for i, t in enumerate(jt) if t is not None and t.requires_grad]

        def double_vjp() -> torch.Tensor:
            return torch.autograd.grad(
                [jt[i] for i in used], w0, grad_outputs=[v[i] for i in used], retain_graph=True
            )[0]

        out["double_vjp_ms"] = _median_ms(double_vjp, reps)
        with torch.no_grad():
            out["forward_mode_ms"] = _median_ms(lambda: jvp(f, tuple(params), tuple(v))[1], reps)
            forward = jvp(f, tuple(params), tuple(v))[1]
        reference = double_vjp().detach()  # the methods must agree, or their timings compare different things
        out["forward_vs_double_vjp_rel_err"] = float((forward - reference).abs().max() / reference.abs().max())
        try:
            start = time.perf_counter()
            _, jv_fn = linearize(f, *params)
            out["linearize_trace_ms"] = 1e3 * (time.perf_counter() - start)
            out["linearize_ms"] = _median_ms(lambda: jv_fn(*v), reps)
        except Exception as err:  # data-dependent control flow, e.g. in Marian
            out["linearize_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    model.train()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model", default="marian-s", choices=sorted(MODELS))
    parser.add_argument("--batch_size", type=int, default=64, help="the curvature batch of the refresh and Jv")
    parser.add_argument("--inner_steps", type=int, default=50)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    model = build_model(args.model)
    batch = synthetic_batch(args.model, args.batch_size, "cpu")
    results = {
        "model": args.model,
        "batch_size": args.batch_size,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "device": f"cpu x{os.cpu_count()}",
        "package": os.path.dirname(os.path.abspath(hf_llqrsam.__file__)),
        "sam_work": sam_work(model, reps=20 * args.reps),
        "refresh": refresh_split(model, batch, reps=max(1, args.reps // 2), inner_steps=args.inner_steps),
        "jv": jv_ways(model, batch, reps=args.reps),
    }
    with open(os.path.join(args.output_dir, "profile.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
