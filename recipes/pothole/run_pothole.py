"""The two-scale pothole toy (`docs/algorithm.md` §13, T-POT): LLQR+SAM escapes a pothole that SAM, GD and LLQR cannot.

Surface on θ = (x, y):  L(x, y) = ½·5·x² + ½·0.2·y² − 0.08·exp(−(y − 2)²/(2·0.1²)).
The average geometry is H̄ = diag(5, 0.2), so the fixed preconditioner is U = diag(0.2, 5). Inside the pothole
(y* ≈ 1.9428, local curvature κ ≈ 4.770) the y-direction is flat on average but locally sharp. With
η = 1.8/(U_yy κ) and ρ = 0.05, U amplifies SAM's escape signal along y (arXiv 2605.16134 §3) while x, sharp on
average, stays stable. The constants are the project's own reconstruction (`docs/algorithm.md` T-POT), not the paper's.

Every perturbation goes through `hf_llqrsam.compute_perturbation`, the function the trainer uses.

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

from hf_llqrsam import LLQRConfig, LLQRPreconditioner, Preconditioner, SAMConfig, SAMState, compute_perturbation

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
    x, y = theta[0], theta[1]
    bump = DEPTH * (y - CENTER) / WIDTH**2 * torch.exp(-((y - CENTER) ** 2) / (2 * WIDTH**2))
    return torch.stack([A * x, B * y + bump])


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


def run(method: Method, seed: int, start: tuple[float, float], u: Preconditioner, max_steps: int = MAX_STEPS,
        noise_variance: float = NOISE_VARIANCE, stop: bool = True, keep_every: int = 1,
        refresh: "LearnedU | None" = None) -> dict:
    """Plain updates θ ← θ − η P g̃ (no momentum) from `start`; stops in the box |x|, |y| < 0.05 when `stop`.

    With `refresh`, U is re-learned on its schedule before the step, from the average geometry at θ.
    """
    gen = torch.Generator().manual_seed(seed)
    std = math.sqrt(noise_variance)
    theta = torch.tensor(start, dtype=torch.float64)
    cfg, state = SAMConfig(mode="sam", rho=RHO), SAMState()
    geometry = u if method.u_in_perturbation else None
    eta = ETA * method.lr_scale
    path, max_radius, steps, escaped = 0.0, 0.0, 0, False
    trajectory = [theta.tolist()]

    def noisy_grad(at: torch.Tensor) -> torch.Tensor:
        return grad(at) + std * torch.randn(2, generator=gen, dtype=torch.float64)

    for steps in range(1, max_steps + 1):  # noqa: B007  (steps is read after the loop)
        if refresh is not None:
            refresh.maybe_update(steps - 1, theta)
        g = noisy_grad(theta)
        if method.sam:
            eps = compute_perturbation(cfg, state, NAMES, [theta], [g], RHO, geometry).eps[0]
            g = noisy_grad(theta + eps)
        step = eta * (u.apply(NAMES, [g])[0] if method.u_on_update else g)
        theta = theta - step
        path += float(step.norm())
        max_radius = max(max_radius, float(theta.norm()))
        if steps % keep_every == 0:
            trajectory.append(theta.tolist())
        if stop and abs(float(theta[0])) < STOP_BOX and abs(float(theta[1])) < STOP_BOX:
            escaped = True
            break
    return {"escaped": escaped, "steps": steps, "path_length": path, "max_radius": max_radius,
            "final": theta.tolist(), "trajectory": trajectory}


class _Theta(torch.nn.Module):
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
            self.preconditioner.fit_problem({"theta": self.hbar * theta},
                                            lambda v: {"theta": self.hbar * v["theta"]}, step=step)

    def diagonal(self) -> list[float]:
        return self.preconditioner.apply(NAMES, [torch.ones(2, dtype=torch.float64)])[0].tolist()


# Learned-U settings: the package defaults, and a fast one (refresh every 10 steps, no EMA memory, larger inner lr).
LEARNED = {
    "llqr_sam_learned_default": {},
    "llqr_sam_learned_fast": {"update_interval": 10, "ema_decay": 0.0, "inner_lr": 0.05},
}


def summarize(results: dict[str, dict[str, list]]) -> str:
    lines = ["| method | escaped | median steps (escaped) | max steps (escaped) | median path length |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        esc = [s for s, e in zip(r["steps"], r["escaped"], strict=True) if e]
        med = f"{statistics.median(esc):.0f}" if esc else "–"
        worst = f"{max(esc)}" if esc else "–"
        lines.append(f"| {name} | {sum(r['escaped'])}/{len(r['escaped'])} | {med} | {worst} | "
                     f"{statistics.median(r['path_length']):.3g} |")
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
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    os.makedirs(args.output_dir, exist_ok=True)
    u = FixedDiagonal(U_DIAG)

    results: dict[str, dict[str, list]] = {}
    trajectories: dict[str, list] = {}
    for name in methods:
        runs = [run(METHODS[name], seed, (0.0, Y_STAR), u, args.max_steps, keep_every=7) for seed in
                range(args.seeds)]
        results[name] = {k: [r[k] for r in runs] for k in ("escaped", "steps", "path_length")}
        trajectories[name] = runs[0]["trajectory"]
        print(f"{name:10s} escaped {sum(results[name]['escaped'])}/{args.seeds}", flush=True)

    learned = {}
    for name, settings in LEARNED.items():
        runs = []
        for seed in range(args.learned_seeds):
            refresh = LearnedU(**settings)
            r = run(METHODS["llqr_sam"], seed, (0.0, Y_STAR), refresh.preconditioner, args.max_steps,
                    refresh=refresh, keep_every=args.max_steps)
            runs.append({"escaped": r["escaped"], "steps": r["steps"], "u_final": refresh.diagonal()})
        learned[name] = {"settings": settings, "runs": runs}
        print(f"{name:28s} escaped {sum(r['escaped'] for r in runs)}/{len(runs)}; final U {runs[0]['u_final']}"
              if runs else name, flush=True)

    extras = {
        "learned_u": learned,
        "flat_basin_max_radius": {name: run(METHODS[name], 0, (0.0, 0.0), u, args.max_steps, stop=False,
                                            keep_every=args.max_steps)["max_radius"]
                                  for name in ("sam", "llqr_sam") if name in methods},
        "llqr_sam_zero_noise": {k: v for k, v in run(METHODS["llqr_sam"], 0, (0.0, Y_STAR), u, args.max_steps,
                                noise_variance=0.0).items() if k in ("escaped", "steps")},
        "constants": {"y_star": Y_STAR, "kappa": KAPPA, "eta": ETA, "rho": RHO, "u": list(U_DIAG),
                      "noise_variance": NOISE_VARIANCE, "max_steps": args.max_steps, "seeds": args.seeds},
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
