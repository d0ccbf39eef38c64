"""Where the cost of a SAM step and of an LLQR refresh goes: the profile behind the README's cost reading.

Three measurements on one model of `bench_cost.py`, each as a median over repetitions in one process:

1. SAM-specific tensor work per step, outside the two forward/backward passes: our `compute_perturbation` +
   `apply_perturbation_` + `restore_` + the finiteness check, against the textbook loop (one norm, clone, add, copy).
2. The LLQR refresh split into building the curvature problem, the T products (G + λI)·v, and the rest of the inner
   loop (U-gradient, clipping, SGD, EMA).
3. Jv, the costlier half of a GGN product, three ways: the double-VJP the package uses, forward-mode `torch.func.jvp`
   (recomputes the forward), and `torch.func.linearize` (traces once per refresh; may fail on models with
   data-dependent control flow).
4. One refresh under `torch.profiler`, split by phase ([`refresh_phases`]): the forward that builds the curvature
   problem, the products (G + λI)·v, the rest of the surrogate U-gradient, sanitising, clipping, the solver step,
   the schedules, the EMA merge and clamp, the finiteness checks and the diagnostics; with the top operators.
5. The refresh before and after issue 20 (the diagonal U-gradient by autograd and a clip with its own norms, against
   the closed form and shared norms), interleaved with an A/A pair in one process: the inner loop's bookkeeping alone
   ([`bookkeeping_routes`], process CPU time per inner step) and whole refreshes ([`refresh_routes`]). On a shared
   machine read the CPU-time ratios, and the A/A ratio beside them, and record `uptime`'s load.

    python recipes/benchmarks/profile_cost.py --model marian-s --output_dir runs/profile_cost
"""

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a script: this checkout's root first, for `recipes` and its `hf_llqrsam`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch.func import functional_call, jvp, linearize  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import hf_llqrsam  # noqa: E402
from hf_llqrsam import SAMState, compute_perturbation  # noqa: E402
from hf_llqrsam.config import SAMConfig  # noqa: E402
from hf_llqrsam.llqr import LLQRConfig, LLQRPreconditioner, curvature_problem  # noqa: E402
from hf_llqrsam.llqr import fit as llqr_fit  # noqa: E402
from hf_llqrsam.llqr import refresh as llqr_refresh  # noqa: E402
from hf_llqrsam.llqr import state as llqr_state  # noqa: E402
from hf_llqrsam.llqr.structures import Structure  # noqa: E402
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


# phase label → (object, attribute): each is wrapped in a `record_function` range while profiling. The library carries
# no profiling code; the wrappers are installed here and removed afterwards.
PHASES: dict[str, tuple[object, str]] = {
    "build": (llqr_refresh, "curvature_problem"),
    "surrogate_gradient": (llqr_fit, "surrogate_gradient"),
    "surrogate_gradient_diagonal": (llqr_fit, "diagonal_surrogate_gradient"),
    "sanitize": (llqr_fit, "_sanitize_"),
    "clip": (llqr_fit, "clip_by_groups_"),
    "finite_checks": (llqr_refresh, "count_nonfinite"),
    "schedules": (llqr_refresh, "inner_lr_at"),
    "schedules_ema": (llqr_refresh, "ema_decay_at"),
    "ema_merge": (Structure, "ema_"),
    "clamp": (Structure, "clamp_"),
    "diagnostics_floor": (llqr_refresh, "floor_fractions"),
    "diagnostics_metrics": (llqr_state.UState, "metrics"),
    "solver_step": (torch.optim.SGD, "step"),
}


def _labelled(label: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        with record_function(f"llqr::{label}"):
            out = fn(*args, **kwargs)
        if label == "build":  # the products are the returned closure: label each call
            g, gv = out  # type: ignore[misc]
            return g, _labelled("product", gv)
        return out

    return wrapper


@contextlib.contextmanager
def _phase_ranges() -> Iterator[None]:
    saved = [(obj, name, getattr(obj, name)) for obj, name in PHASES.values()]
    try:
        for label, (obj, name) in PHASES.items():
            setattr(obj, name, _labelled(label, getattr(obj, name)))
        yield
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)


def refresh_phases(model: torch.nn.Module, batch: dict, inner_steps: int = 50, top: int = 15) -> dict:
    """One refresh (after a warm-up one) under `torch.profiler`, split by phase.

    Returns:
        `dict`: `wall_s` of the profiled refresh; `phases_ms`, the inclusive CPU time of each phase (the products run
        inside `surrogate_gradient`, so `surrogate_gradient_excl_products` is its own part); `phases_share` of the
        wall time; and `top_ops`, the operators with the most self CPU time.
    """
    pre = LLQRPreconditioner(model, LLQRConfig(inner_steps=inner_steps))
    with _phase_ranges():
        pre.update(model, batch, step=0)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            pre.update(model, batch, step=1)
            wall = time.perf_counter() - start
    averages = prof.key_averages()
    phases = {e.key.removeprefix("llqr::"): e.cpu_time_total / 1e3 for e in averages if e.key.startswith("llqr::")}
    phases["schedules"] = phases.get("schedules", 0.0) + phases.pop("schedules_ema", 0.0)
    phases["surrogate_gradient"] = phases.get("surrogate_gradient", 0.0) + phases.pop(
        "surrogate_gradient_diagonal", 0.0
    )
    phases["surrogate_gradient_excl_products"] = phases.get("surrogate_gradient", 0.0) - phases.get("product", 0.0)
    named = sum(v for k, v in phases.items() if k not in ("surrogate_gradient", "product"))
    phases["unlabelled"] = 1e3 * wall - named - phases.get("product", 0.0)
    ops = sorted((e for e in averages if not e.key.startswith("llqr::")), key=lambda e: -e.self_cpu_time_total)
    return {
        "wall_s": wall,
        "phases_ms": {k: round(v, 2) for k, v in sorted(phases.items(), key=lambda kv: -kv[1])},
        "phases_share": {k: round(v / (1e3 * wall), 4) for k, v in phases.items() if k != "surrogate_gradient"},
        "top_ops": [
            {"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 2)} for e in ops[:top]
        ],
    }


@contextlib.contextmanager
def _old_route() -> Iterator[None]:
    """The refresh as before issue 20: the autograd U-gradient for diagonal U, and a clip that computes its own
    norms. (The GGN product's in-place F multiply and the skipped ×1 pass are not toggled: both routes have them.)"""
    saved = llqr_fit.gradient_route, llqr_fit._sanitize_
    llqr_fit.gradient_route = lambda *args: llqr_fit.surrogate_gradient  # type: ignore[assignment]
    llqr_fit._sanitize_ = lambda tensors: (saved[1](tensors)[0], None)  # type: ignore[assignment]
    try:
        yield
    finally:
        llqr_fit.gradient_route, llqr_fit._sanitize_ = saved


def bookkeeping_routes(model: torch.nn.Module, batch: dict, rounds: int, inner_steps: int = 50) -> dict:
    """CPU milliseconds per inner step of everything but the product: the inner loop run on the model's g with a
    product that returns a stored (G + λI)·g, old route (A, A′) against new, interleaved as [`refresh_routes`]."""
    from hf_llqrsam.llqr.fit import fit_structure
    from hf_llqrsam.llqr.state import UState

    u = UState(model, LLQRConfig(inner_steps=inner_steps))
    g_dict, gv_dict = curvature_problem(model, batch)
    g = [g_dict[n] for n in u.names]
    stored = [gv_dict(g_dict)[n] for n in u.names]

    def product(v: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.clone() for t in stored]  # a fresh result, as the real product returns

    routes = {"old_a": _old_route, "old_a2": _old_route, "new": contextlib.nullcontext}
    cpu: dict[str, list[float]] = {k: [] for k in routes}
    order, gen = list(routes), torch.Generator().manual_seed(1)
    for r in range(rounds + 1):
        for i in torch.randperm(len(order), generator=gen).tolist():
            v = u.structure.clone()
            with routes[order[i]]():
                start = time.process_time()
                fit_structure(v, g, product, inner_steps, 1e-3, 0.9, 5.0, stop_if_nonfinite=True)
                if r:
                    cpu[order[i]].append(1e3 * (time.process_time() - start) / inner_steps)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "cpu_ms_per_inner_step": {k: round(v, 3) for k, v in med.items()},
        "aa_ratio": round(med["old_a2"] / med["old_a"], 4),
        "new_over_old": round(med["new"] / med["old_a"], 4),
    }


def refresh_routes(model: torch.nn.Module, batch: dict, rounds: int, inner_steps: int = 50) -> dict:
    """Seconds of one whole refresh by the old route (twice, A and A′: the noise floor) and the new one, interleaved
    in a shuffled order within each round, in one process; medians and their ratios to A."""
    routes = {"old_a": _old_route, "old_a2": _old_route, "new": contextlib.nullcontext}
    wall: dict[str, list[float]] = {k: [] for k in routes}
    cpu: dict[str, list[float]] = {k: [] for k in routes}
    order = list(routes)
    gen = torch.Generator().manual_seed(0)
    load = [os.getloadavg()[0]]
    for r in range(rounds + 1):  # round 0 warms up and is dropped
        for i in torch.randperm(len(order), generator=gen).tolist():
            name = order[i]
            pre = LLQRPreconditioner(model, LLQRConfig(inner_steps=inner_steps))
            with routes[name]():
                start, start_cpu = time.perf_counter(), time.process_time()
                pre.update(model, batch, step=0)
                elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if r:
                wall[name].append(elapsed)
                cpu[name].append(elapsed_cpu)
    load.append(os.getloadavg()[0])

    def summary(times: dict[str, list[float]]) -> dict:
        med = {k: statistics.median(v) for k, v in times.items()}
        return {
            "median_s": {k: round(v, 4) for k, v in med.items()},
            "aa_ratio": round(med["old_a2"] / med["old_a"], 4),
            "new_over_old": round(med["new"] / med["old_a"], 4),
        }

    # the process's CPU time is what a shared machine disturbs least (threads waiting for a core do not count)
    return {"rounds": rounds, "wall": summary(wall), "cpu": summary(cpu), "load_avg_1m": load}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model", default="marian-s", choices=sorted(MODELS))
    parser.add_argument("--batch_size", type=int, default=64, help="the curvature batch of the refresh and Jv")
    parser.add_argument("--inner_steps", type=int, default=50)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the interleaved old/new route comparison")
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
        "phases": refresh_phases(model, batch, inner_steps=args.inner_steps),
        "bookkeeping_routes": bookkeeping_routes(model, batch, rounds=args.rounds, inner_steps=args.inner_steps),
        "refresh_routes": refresh_routes(model, batch, rounds=args.rounds, inner_steps=args.inner_steps),
    }
    with open(os.path.join(args.output_dir, "profile.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
