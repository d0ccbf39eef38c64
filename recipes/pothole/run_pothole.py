"""The two-scale pothole toy (`docs/algorithm.md` §13, T-POT): LLQR+SAM escapes a pothole that SAM, GD and LLQR cannot.

Surface on θ = (x, y):  L(x, y) = ½·5·x² + ½·0.2·y² − 0.08·exp(−(y − 2)²/(2·0.1²)).
The average geometry is H̄ = diag(5, 0.2), so the fixed preconditioner is U = diag(0.2, 5). Inside the pothole
(y* ≈ 1.9428, local curvature κ ≈ 4.770) the y-direction is flat on average but locally sharp. With
η = 1.8/(U_yy κ) and ρ = 0.05, U amplifies SAM's escape signal along y (arXiv 2605.16134 §3) while x, sharp on
average, stays stable. The constants are the project's own reconstruction (`docs/algorithm.md` T-POT), not the paper's.

All runs go as one batch ([`run_batch`]), a vectorised form of the per-seed loop [`run`], whose every perturbation
goes through `hf_llqrsam.compute_perturbation`, the function the trainer uses; a test proves the two equal.

    python recipes/pothole/run_pothole.py --output_dir runs/pothole
"""

import argparse
import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hf_llqrsam import SAM, LLQRConfig, LLQRPreconditioner, Preconditioner, SAMConfig
from hf_llqrsam.llqr.schedules import parse_milestones

A, B, DEPTH, CENTER, WIDTH = 5.0, 0.2, 0.08, 2.0, 0.1
U_DIAG = (1.0 / A, 1.0 / B)  # inverse of the average curvature diag(5, 0.2)
RHO = 0.05
NOISE_VARIANCE = 1e-9
MAX_STEPS = 20_000
STOP_BOX = 0.05
NAMES = ["theta"]


def pothole_min() -> tuple[float, float]:
    """(y*, κ): the pothole minimum on x = 0 and its local curvature, by Newton's method in float64."""

    def d1(y: float) -> float:
        return B * y + DEPTH * (y - CENTER) / WIDTH**2 * math.exp(-((y - CENTER) ** 2) / (2 * WIDTH**2))

    def d2(y: float) -> float:
        z = (y - CENTER) ** 2 / WIDTH**2
        return B + DEPTH / WIDTH**2 * (1 - z) * math.exp(-z / 2)

    y = 1.94
    for _ in range(50):
        y -= d1(y) / d2(y)
    return y, d2(y)


Y_STAR, KAPPA = pothole_min()
ETA = 1.8 / (U_DIAG[1] * KAPPA)


def loss(theta: torch.Tensor) -> torch.Tensor:
    x, y = theta[..., 0], theta[..., 1]
    return 0.5 * A * x**2 + 0.5 * B * y**2 - DEPTH * torch.exp(-((y - CENTER) ** 2) / (2 * WIDTH**2))


def grad(theta: torch.Tensor) -> torch.Tensor:
    """∇L at θ of shape (..., 2): one point or a batch of points (one per seed)."""
    x, y = theta[..., 0], theta[..., 1]
    bump = DEPTH * (y - CENTER) / WIDTH**2 * torch.exp(-((y - CENTER) ** 2) / (2 * WIDTH**2))
    return torch.stack([A * x, B * y + bump], dim=-1)


def draw_noise(seed: int, steps: int, variance: float) -> torch.Tensor:
    """The gradient noise of one seed, drawn up front: (steps, pass, coordinate), N(0, variance) in each pass."""
    gen = torch.Generator().manual_seed(seed)
    return math.sqrt(variance) * torch.randn((steps, 2, 2), generator=gen, dtype=torch.float64)


class FixedDiagonal:
    """A fixed diagonal U as an `hf_llqrsam.Preconditioner`."""

    def __init__(self, diag: Sequence[float] | torch.Tensor):
        self.d = torch.as_tensor(diag, dtype=torch.float64)

    def apply(self, names: Sequence[str], tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [t * self.d for t in tensors]

    def apply_(self, names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            t.mul_(self.d)


@dataclass(frozen=True)
class Method:
    """sam: perturb (ε = ρ Cg/‖Cg‖); u_in_perturbation: C = U; u_on_update: P = U; lr_scale multiplies η."""

    sam: bool
    u_in_perturbation: bool = False
    u_on_update: bool = False
    lr_scale: float = 1.0


METHODS = {
    "gd": Method(sam=False),
    "sam": Method(sam=True),
    "llqr": Method(sam=False, u_on_update=True),
    "llqr_sam": Method(sam=True, u_in_perturbation=True, u_on_update=True),
    "sam_lr5": Method(sam=True, lr_scale=5.0),
    "gd_lr5": Method(sam=False, lr_scale=5.0),
}


def run(
    method: Method,
    seed: int,
    start: tuple[float, float],
    u: Preconditioner,
    max_steps: int = MAX_STEPS,
    noise_variance: float = NOISE_VARIANCE,
    stop: bool = True,
    keep_every: int = 1,
    refresh: "LearnedU | None" = None,
) -> dict:
    """One seed, step by step through the public API [`hf_llqrsam.SAM`] (the library's SAM step): the reference.

    θ is the one parameter of a module, the gradient comes from the analytic surface plus this seed's noise (pass 1
    and pass 2 draw their own), and plain SGD at η takes θ ← θ − η P g̃ from `start`; stops in the box |x|, |y| < 0.05
    when `stop`. With `refresh`, U is re-learned on its schedule before the step, from the average geometry at θ.
    [`run_seeds`] is the same computation for many seeds at once, and a test proves the two equal.
    """
    noise = draw_noise(seed, max_steps, noise_variance)
    point = _Theta()
    with torch.no_grad():
        point.theta.copy_(torch.tensor(start, dtype=torch.float64))
    optimizer = _GradientDescent([point.theta], lr=ETA * method.lr_scale)
    sam = SAM(
        point,
        optimizer,
        "sam" if method.sam else "none",
        RHO,
        preconditioner=u,
        u_in_perturbation=method.u_in_perturbation,
        u_on_update=method.u_on_update,
    )
    path, max_radius, steps, escaped = 0.0, 0.0, 0, False
    trajectory = [start]
    for steps in range(1, max_steps + 1):  # noqa: B007  (steps is read after the loop)
        theta = point.theta.detach().clone()
        if refresh is not None:
            refresh.maybe_update(steps - 1, theta)
        passes = iter(noise[steps - 1])

        def closure(passes=passes) -> torch.Tensor:  # the surface's gradient at the (perturbed) point, plus noise
            point.theta.grad = grad(point.theta.detach()) + next(passes)
            return torch.zeros(())

        sam.step(closure)
        step = theta - point.theta.detach()
        path += float(step.norm())
        max_radius = max(max_radius, float(point.theta.detach().norm()))
        if steps % keep_every == 0:
            trajectory.append(point.theta.tolist())
        x, y = point.theta.tolist()
        if stop and abs(x) < STOP_BOX and abs(y) < STOP_BOX:
            escaped = True
            break
    return {
        "escaped": escaped,
        "steps": steps,
        "path_length": path,
        "max_radius": max_radius,
        "final": point.theta.tolist(),
        "trajectory": trajectory,
    }


@dataclass
class Row:
    """One trajectory of a batch: a method from a start point with one seed's noise (and, optionally, learned U)."""

    method: Method
    seed: int
    start: tuple[float, float] = (0.0, Y_STAR)
    noise_variance: float = NOISE_VARIANCE
    stop: bool = True
    refresh: "LearnedU | None" = None


def _grid(config: LLQRConfig) -> int:
    """The gcd of E and the milestone intervals: every refresh step is a multiple of it."""
    return math.gcd(config.update_interval, *(e for _, e in parse_milestones(config.update_interval_milestones)))


def run_batch(
    rows: Sequence[Row], u_diag: Sequence[float], max_steps: int = MAX_STEPS, keep_every: int = 0
) -> list[dict]:
    """[`run`] for many rows at once, θ ∈ R^{rows×2}: the same arithmetic, vectorised over rows (seeds and methods).

    The perturbation is `compute_perturbation`'s `sam` row with C = I or a diagonal U, taken per row (each row is
    normalised on its own): ε_r = ρ·C g_r / √(‖C g_r‖² + eps). Rows without SAM use the first-pass gradient, rows
    without U multiply by ones (exact). A row that reached the stop box is frozen. A row with `refresh` re-learns its U
    on its schedule, as in [`run`]. With `keep_every > 0`, each row's trajectory is kept every `keep_every` steps.
    """
    n = len(rows)
    noise = torch.stack([draw_noise(r.seed, max_steps, r.noise_variance) for r in rows])  # (rows, steps, pass, 2)
    theta = torch.tensor([r.start for r in rows], dtype=torch.float64)
    fixed = torch.tensor(u_diag, dtype=torch.float64)
    ones = torch.ones(2, dtype=torch.float64)
    c = torch.stack([fixed if r.method.u_in_perturbation else ones for r in rows])  # perturbation geometry C
    p = torch.stack([fixed if r.method.u_on_update else ones for r in rows])  # descent preconditioner P
    sam = torch.tensor([r.method.sam for r in rows])[:, None]
    eta = torch.tensor([ETA * r.method.lr_scale for r in rows], dtype=torch.float64)[:, None]
    stop = torch.tensor([r.stop for r in rows])
    # Each learned row's refresh grid is prefiltered by the gcd of its intervals (E and any milestone E_i).
    learned = [
        (i, r.refresh, _grid(r.refresh.preconditioner.config)) for i, r in enumerate(rows) if r.refresh is not None
    ]
    cfg_eps = SAMConfig(mode="sam", rho=RHO).eps
    active = torch.ones(n, dtype=torch.bool)
    arrived_at = torch.full((n,), max_steps)
    path = torch.zeros(n, dtype=torch.float64)
    max_radius = torch.zeros(n, dtype=torch.float64)
    kept = [theta.clone()] if keep_every else []
    for k in range(max_steps):
        for i, refresh, interval in learned:
            if k % interval == 0 and bool(active[i]) and refresh.preconditioner.is_due(k):
                refresh.maybe_update(k, theta[i])
                c[i] = p[i] = torch.tensor(refresh.diagonal(), dtype=torch.float64)
        g = grad(theta) + noise[:, k, 0]
        cg = c * g
        nu = torch.linalg.vector_norm(cg, dim=1, keepdim=True)  # ν = ‖Cg‖ per row, as compute_perturbation
        eps = cg * (RHO / torch.sqrt(nu**2 + cfg_eps))
        g = torch.where(sam, grad(theta + eps) + noise[:, k, 1], g)
        step = torch.where(active[:, None], eta * (p * g), 0.0)
        theta = theta - step
        path += step.norm(dim=1)
        max_radius = torch.maximum(max_radius, theta.norm(dim=1))
        if keep_every and (k + 1) % keep_every == 0:
            kept.append(theta.clone())
        arrived = active & stop & (theta.abs() < STOP_BOX).all(dim=1)
        arrived_at = torch.where(arrived, k + 1, arrived_at)
        active &= ~arrived
        if k % 256 == 255 and not bool(active.any()):
            break
    trajectory = torch.stack(kept, dim=1) if kept else None  # (rows, kept, 2)
    out = []
    for i, r in enumerate(rows):
        escaped = bool(r.stop and not active[i])
        steps = int(arrived_at[i])
        traj = [] if trajectory is None else trajectory[i, : (steps // keep_every) + 1 if escaped else None].tolist()
        out.append(
            {
                "escaped": escaped,
                "steps": steps,
                "path_length": float(path[i]),
                "max_radius": float(max_radius[i]),
                "final": theta[i].tolist(),
                "trajectory": traj,
            }
        )
    return out


def run_seeds(
    method: Method,
    seeds: Sequence[int],
    start: tuple[float, float],
    u_diag: Sequence[float],
    max_steps: int = MAX_STEPS,
    noise_variance: float = NOISE_VARIANCE,
    stop: bool = True,
    keep_every: int = 0,
    refresh: "Sequence[LearnedU] | None" = None,
) -> list[dict]:
    """[`run_batch`] of one method over `seeds` (with one [`LearnedU`] per seed when `refresh` is given)."""
    rows = [
        Row(method, seed, start, noise_variance, stop, None if refresh is None else refresh[i])
        for i, seed in enumerate(seeds)
    ]
    return run_batch(rows, u_diag, max_steps, keep_every)


class _GradientDescent(torch.optim.Optimizer):
    """θ ← θ − η·g, rounded as the batched runs compute it (`torch.optim.SGD` fuses η·g into the add)."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["lr"] * p.grad)


class _Theta(torch.nn.Module):
    """The toy's θ as the one parameter of a module (what [`hf_llqrsam.SAM`] and U are built for)."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))


class LearnedU:
    """U learned by `LLQRPreconditioner` from the *average* geometry H̄ = diag(5, 0.2), refreshed every E steps.

    Each refresh fits the diagonal U on the quadratic model of the smooth surface at the current θ
    (g = H̄θ, G = H̄; the pothole is invisible to it), then merges it by EMA, exactly as a training refresh does.
    The inner-loop optimum is U = H̄⁻¹ = diag(0.2, 5) on every coordinate where g ≠ 0 (`docs/algorithm.md` §2.1).
    """

    def __init__(self, **llqr: float | int) -> None:
        self.preconditioner = LLQRPreconditioner(_Theta(), LLQRConfig(**llqr))  # type: ignore[arg-type]
        self.hbar = torch.tensor([A, B], dtype=torch.float64)

    def maybe_update(self, step: int, theta: torch.Tensor) -> None:
        if self.preconditioner.is_due(step):
            self.preconditioner.fit_problem(
                {"theta": self.hbar * theta}, lambda v: {"theta": self.hbar * v["theta"]}, step=step
            )

    def diagonal(self) -> list[float]:
        return self.preconditioner.apply(NAMES, [torch.ones(2, dtype=torch.float64)])[0].tolist()


# Learned-U settings: the package defaults; a fast one (refresh every 10 steps, no EMA memory, larger inner lr); and
# the reference's own schedule knobs in the shape its presets use them (frequent refreshes early, the 1000-step
# cadence later: `precond_update_scheduler: piecewise_constant`; `ema_scheduler: step_warmup`; `precond_lr_scheduler:
# cosine_annealing`): for the first 100 steps U is refreshed every 10 steps with an inner lr that anneals from 0.05 to
# the package default 1e-3 and an EMA decay that warms up from 0 (keep the newest fit) to the package default 0.95;
# after step 100, every 1000 steps at the defaults.
LEARNED = {
    "llqr_sam_learned_default": {},
    "llqr_sam_learned_fast": {"update_interval": 10, "ema_decay": 0.0, "inner_lr": 0.05},
    "llqr_sam_learned_scheduled": {
        "update_interval": 10,
        "update_interval_milestones": "100:1000",
        "inner_lr": 0.05,
        "inner_lr_schedule": "cosine",
        "inner_lr_schedule_value": 1e-3,
        "inner_lr_schedule_steps": 100,
        "ema_decay": 0.95,
        "ema_schedule": "warmup",
        "ema_schedule_value": 0.0,
        "ema_schedule_steps": 100,
    },
}


def summarize(results: dict[str, dict[str, list]]) -> str:
    lines = [
        "| method | escaped | median steps (escaped) | max steps (escaped) | median path length |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        esc = [s for s, e in zip(r["steps"], r["escaped"], strict=True) if e]
        med = f"{statistics.median(esc):.0f}" if esc else "–"
        worst = f"{max(esc)}" if esc else "–"
        lines.append(
            f"| {name} | {sum(r['escaped'])}/{len(r['escaped'])} | {med} | {worst} | "
            f"{statistics.median(r['path_length']):.3g} |"
        )
    return "\n".join(lines)


def plot(trajectories: dict[str, list], path: str) -> None:
    """Trajectories over the loss contours: the whole basin, and a zoom on the pothole."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    views = [((-1.2, 1.2), (-0.4, 2.4), "whole basin"), ((-0.06, 0.06), (1.80, 2.06), "zoom on the pothole")]
    for ax, (xlim, ylim, title) in zip(axes, views, strict=True):
        xs = torch.linspace(*xlim, 241, dtype=torch.float64)
        ys = torch.linspace(*ylim, 241, dtype=torch.float64)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
        ax.contour(xs, ys, loss(grid), levels=40, cmap="Greys", linewidths=0.6)
        for name, traj in trajectories.items():
            t = torch.tensor(traj)
            ax.plot(t[:, 0], t[:, 1], lw=1.0, marker=".", ms=2, label=name, alpha=0.8)
        ax.add_patch(plt.Rectangle((-STOP_BOX, -STOP_BOX), 2 * STOP_BOX, 2 * STOP_BOX, fill=False, color="red"))
        ax.set(xlabel="x (sharp on average)", ylabel="y (flat on average)", title=title, xlim=xlim, ylim=ylim)
    axes[0].legend(loc="upper right", fontsize=8)
    fig.suptitle("Pothole toy, seed 0 (points every 7 steps; stop box in red)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seeds", type=int, default=20, help="seeds 0..N-1 (20 for the acceptance run)")
    parser.add_argument("--max_steps", type=int, default=MAX_STEPS)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    parser.add_argument("--learned_seeds", type=int, default=5, help="seeds for the learned-U variants (0 skips)")
    parser.add_argument("--no_plot", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # 2-element rows: threads only add overhead
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    os.makedirs(args.output_dir, exist_ok=True)
    # Everything as one batch: every method × seed, the learned-U variants, the flat basin and the zero-noise run.
    rows = [Row(METHODS[name], seed) for name in methods for seed in range(args.seeds)]
    learned_refresh = {
        name: [LearnedU(**settings) for _ in range(args.learned_seeds)] for name, settings in LEARNED.items()
    }
    rows += [
        Row(METHODS["llqr_sam"], seed, refresh=refresh)
        for refreshes in learned_refresh.values()
        for seed, refresh in enumerate(refreshes)
    ]
    basin_methods = [name for name in ("sam", "llqr_sam") if name in methods]
    rows += [Row(METHODS[name], 0, start=(0.0, 0.0), stop=False) for name in basin_methods]
    rows += [Row(METHODS["llqr_sam"], 0, noise_variance=0.0)]
    out = iter(run_batch(rows, U_DIAG, args.max_steps, keep_every=7))

    results: dict[str, dict[str, list]] = {}
    trajectories: dict[str, list] = {}
    for name in methods:
        runs = [next(out) for _ in range(args.seeds)]
        results[name] = {k: [r[k] for r in runs] for k in ("escaped", "steps", "path_length")}
        trajectories[name] = runs[0]["trajectory"] if runs else []
        print(f"{name:10s} escaped {sum(results[name]['escaped'])}/{args.seeds}", flush=True)
    learned = {}
    for name, refreshes in learned_refresh.items():
        runs = [
            {"escaped": r["escaped"], "steps": r["steps"], "u_final": refresh.diagonal()}
            for r, refresh in zip([next(out) for _ in refreshes], refreshes, strict=True)
        ]
        learned[name] = {"settings": LEARNED[name], "runs": runs}
        print(
            f"{name:28s} escaped {sum(r['escaped'] for r in runs)}/{len(runs)}; final U {runs[0]['u_final']}"
            if runs
            else name,
            flush=True,
        )
    basin = {name: next(out)["max_radius"] for name in basin_methods}
    zero_noise = next(out)
    extras = {
        "learned_u": learned,
        "flat_basin_max_radius": basin,
        "llqr_sam_zero_noise": {"escaped": zero_noise["escaped"], "steps": zero_noise["steps"]},
        "constants": {
            "y_star": Y_STAR,
            "kappa": KAPPA,
            "eta": ETA,
            "rho": RHO,
            "u": list(U_DIAG),
            "noise_variance": NOISE_VARIANCE,
            "max_steps": args.max_steps,
            "seeds": args.seeds,
        },
    }
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({**results, "extras": extras}, f, indent=1)
    table = summarize(results)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table + "\n\n" + "\n".join(f"- {k}: {v}" for k, v in extras.items()) + "\n")
    if not args.no_plot:
        plot(trajectories, os.path.join(args.output_dir, "trajectories.png"))
    print(table)
    print(json.dumps(extras))
    return {**results, "extras": extras}


if __name__ == "__main__":
    main()
