"""The label-noise results store (one JSON, resumable), the runs it still lacks (`execute`), the ρ chosen from its
tuning runs (`choose`, `complete`) and its cost table (`complete_cost`)."""

import json
import os
import statistics
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed

from .protocol import ALL, METHODS, Cell, run_key
from .run import measure_cost, run_one


class Store:
    """The JSON of all runs, rewritten (atomically) after every run; runs already in it are not run again."""

    def __init__(self, path: str, meta: dict) -> None:
        self.path = path
        self.data: dict = {"meta": meta, "runs": {}}
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            self.data["runs"] = old.get("runs", {})
            if "cost" in old:
                self.data["cost"] = old["cost"]
        self.data["meta"] = meta

    def has(self, key: str) -> bool:
        return key in self.data["runs"]

    def add(self, r: dict) -> None:
        self.data["runs"][run_key(r)] = r
        self.save()

    def merge(self, path: str) -> None:
        """Add the runs of another store's JSON (another process's `--output_dir`); a run both hold must agree."""
        with open(path) as f:
            runs = json.load(f)["runs"]
        for key, r in runs.items():
            mine = self.data["runs"].setdefault(key, r)
            if mine["test_acc"] != r["test_acc"] or mine["val_acc"] != r["val_acc"]:
                raise ValueError(f"{path}: run {key} disagrees with {self.path}")
        self.save()

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=float)
        os.replace(tmp, self.path)


def execute(store: Store, jobs: list[tuple], workers: int) -> None:
    todo = [
        j
        for j in jobs
        if not store.has(
            run_key(dict(zip(("task", "noise", "method", "opt", "rho", "seed", "epochs"), j[:7], strict=True)))
        )
    ]
    if not todo:
        return
    print(f"{len(todo)} runs to do ({len(jobs) - len(todo)} already done)", flush=True)
    if workers <= 1:
        for j in todo:
            r = run_one(*j)
            store.add(r)
            print(f"  {run_key(r)}: val {r['val_acc']:.3f} test {r['test_acc']:.3f} {r['seconds']:.1f}s", flush=True)
        return
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(run_one, *j) for j in todo]
        for fut in as_completed(futures):
            r = fut.result()
            store.add(r)
            print(f"  {run_key(r)}: val {r['val_acc']:.3f} test {r['test_acc']:.3f} {r['seconds']:.1f}s", flush=True)


def choose(
    store: Store, cell: Cell, method: str, grid: Sequence[float], epochs: int, tuning_seeds: Sequence[int]
) -> tuple[float, dict]:
    """The grid value of best mean validation accuracy over the tuning seeds (ties: the smaller ρ); a cell's fixed ρ
    where it has one (no curve)."""
    fixed = cell.fixed_rho(method)
    if fixed is not None:
        return fixed, {}
    curve = {}
    for rho in grid:
        accs = [store.data["runs"][cell.run_key_of(method, rho, s, epochs)]["val_acc"] for s in tuning_seeds]
        curve[rho] = statistics.fmean(accs)
    best = max(grid, key=lambda r: (curve[r], -r))
    return best, curve


def complete(
    store: Store,
    cell: Cell,
    method: str,
    grid: Sequence[float],
    epochs: int,
    tuning_seeds: Sequence[int],
    seeds: Sequence[int],
) -> bool:
    """Whether the method's tuning runs and its reported runs at the chosen ρ are all in the store."""

    def has(rho: float, s: int) -> bool:
        return store.has(cell.run_key_of(method, rho, s, epochs))

    if METHODS[method].tuned:
        if cell.fixed_rho(method) is None and not all(has(r, s) for r in grid for s in tuning_seeds):
            return False
        rho = choose(store, cell, method, grid, epochs, tuning_seeds)[0]
    else:
        rho = 0.0
    return all(has(rho, s) for s in seeds)


def complete_cost(store: Store, epochs: int) -> None:
    """The store's cost table for every method: measured whole (`measure_cost`) the first time; methods added later
    are timed against a fresh SAM over a full run (their cadence may change), one round, and recorded as `added`."""
    if "cost" not in store.data:
        store.data["cost"] = measure_cost(ALL)
        store.save()
        return
    cost = store.data["cost"]
    missing = [m for m in ALL if m not in cost["seconds_per_epoch"]]
    if missing:
        extra = measure_cost(("sam", *missing), epochs=epochs, rounds=1)
        cost.setdefault("added", []).append(extra)
        for m in missing:
            cost["seconds_per_epoch"][m] = extra["seconds_per_epoch"][m]
            cost["ratio_to_sam"][m] = extra["ratio_to_sam"][m]
        store.save()
