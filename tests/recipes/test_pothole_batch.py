"""The vectorised pothole runs equal the per-seed reference loop through `compute_perturbation`."""

import pytest
import torch

from recipes.pothole.run_pothole import LEARNED, METHODS, U_DIAG, FixedDiagonal, LearnedU, Row, run, run_batch


def _close(a, b):
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-12)


def test_one_batch_of_every_method_and_seed_equals_the_reference_loop():
    """All methods × 2 seeds as one batch (plus a flat-basin row) == each run alone through compute_perturbation."""
    steps, seeds = 200, [0, 1]
    rows = [Row(METHODS[name], seed, stop=False) for name in METHODS for seed in seeds]
    rows.append(Row(METHODS["sam"], 0, start=(0.0, 0.0), stop=False))
    batch = run_batch(rows, U_DIAG, steps, keep_every=1)
    for row, got in zip(rows, batch, strict=True):
        ref = run(row.method, row.seed, row.start, FixedDiagonal(U_DIAG), steps, stop=False)
        _close(got["final"], ref["final"])
        _close(got["trajectory"], ref["trajectory"])
        assert got["path_length"] == pytest.approx(ref["path_length"], rel=1e-12)
        assert got["max_radius"] == pytest.approx(ref["max_radius"], rel=1e-12)


@pytest.mark.parametrize("learned", ["llqr_sam_learned_fast", "llqr_sam_learned_scheduled"])
def test_batched_stop_and_learned_u_equal_the_reference(learned):
    """Stopping in the box (LLQR+SAM escapes), zero noise, and per-seed learned U (a fixed E, or the milestone and
    LR/EMA schedules), batched vs one run at a time (which asks `is_due` at every step)."""
    steps, seeds = 400, [0, 1]
    settings = LEARNED[learned]
    rows = [Row(METHODS["llqr_sam"], seed, refresh=LearnedU(**settings)) for seed in seeds]
    rows += [Row(METHODS["llqr_sam"], 0), Row(METHODS["llqr_sam"], 0, noise_variance=0.0), Row(METHODS["sam"], 0)]
    batch = run_batch(rows, U_DIAG, steps, keep_every=7)
    for row, got in zip(rows, batch, strict=True):
        refresh = None if row.refresh is None else LearnedU(**settings)
        u = FixedDiagonal(U_DIAG) if refresh is None else refresh.preconditioner
        ref = run(
            row.method, row.seed, row.start, u, steps, noise_variance=row.noise_variance, keep_every=7, refresh=refresh
        )
        assert (got["escaped"], got["steps"]) == (ref["escaped"], ref["steps"])
        _close(got["final"], ref["final"])
        _close(got["trajectory"], ref["trajectory"])
    assert [got["escaped"] for got in batch] == [True, True, True, True, False]  # both outcomes are exercised
