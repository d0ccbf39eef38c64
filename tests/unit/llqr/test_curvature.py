"""T1/T2: g and G·v of `curvature_problem` against dense Hessian oracles (`docs/algorithm.md` §3–4, §13), float64."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hf_llqrsam.llqr import DiagonalStructure, LLQRConfig, curvature_problem, logits_and_targets
from hf_llqrsam.llqr.fit import surrogate_gradient
from hf_llqrsam.llqr.layout import clip_groups, tensor_layouts
from tests.oracles.dense_llqr import (
    TanhNet,
    dense_curvature,
    dense_objective,
    explicit_ggn_sum,
    flatten,
    mean_ce,
    unflatten,
)

N_ROWS, DAMPING = 7, 0.3


def _setup(seed: int = 0, pad_rows: tuple[int, ...] = ()):
    model = TanhNet((5, 4, 3, 3), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(N_ROWS, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N_ROWS,), generator=gen)
    y[list(pad_rows)] = -100
    return model, x, y


def _dense(gv, model) -> torch.Tensor:
    """Materialise v ↦ (G + λI)v column by column."""
    names = [n for n, p in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    n = sum(p.numel() for p in params)
    cols = []
    for j in range(n):
        e = torch.zeros(n, dtype=torch.float64)
        e[j] = 1.0
        out = gv(dict(zip(names, unflatten(e, params), strict=True)))
        cols.append(flatten([out[k] for k in names]))
    return torch.stack(cols, dim=1)


def _problem(model, x, y, **kw):
    g, gv = curvature_problem(model, {"x": x, "labels": y}, LLQRConfig(**kw))
    return flatten(g.values()), gv


CASES = [
    dict(divergence="newton"),
    dict(divergence="ngd", ngd_scaling="sum"),
    dict(divergence="ngd", ngd_scaling="mean"),
    dict(divergence="renyi", renyi_alpha=0.5),
    dict(divergence="renyi", renyi_alpha=2.5),
    dict(divergence="reverse_kl"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_quadratic_identity_matches_dense_hessians(case):
    """T1: J_impl(diag d) = gᵀδ + ½δᵀ(G_D + λI)δ with G_D the Hessian of Φ through the network."""
    model, x, y = _setup()
    g_impl, gv = _problem(model, x, y, damping=DAMPING, **case)
    g_ref, G_ref = dense_curvature(
        model, x, y, case["divergence"], case.get("ngd_scaling", "sum"), case.get("renyi_alpha", 0.5)
    )
    torch.testing.assert_close(g_impl, g_ref, rtol=1e-12, atol=1e-14)
    G_impl = _dense(gv, model) - DAMPING * torch.eye(len(g_ref), dtype=torch.float64)
    torch.testing.assert_close(G_impl, G_ref, rtol=1e-10, atol=1e-12)

    layouts = tensor_layouts(model)
    structure = DiagonalStructure(layouts, clip_groups(layouts, "module"), dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    for blk in structure.blocks:
        blk["d"].copy_(0.2 + 1.8 * torch.rand(blk["d"].shape, generator=gen, dtype=torch.float64))
    d = flatten([blk["d"] for blk in structure.blocks])
    for t in structure.parameters():
        t.requires_grad_(True)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    objective, _ = surrogate_gradient(
        structure,
        unflatten(g_impl, params),
        lambda v: list(gv(dict(zip(names, v, strict=True))).values()),
    )
    expected = dense_objective(g_ref, G_ref, DAMPING, torch.diag(d))
    torch.testing.assert_close(objective, expected, rtol=1e-10, atol=0.0)


def test_ngd_sum_is_n_times_ggn_mean():
    """T2: G_ngd(sum) = Σ_r J_rᵀ F_r J_r (relative error < 1e-12); mean = /N; renyi = α/N; reverse_kl = sum."""
    model, x, y = _setup(seed=4)
    ggn_sum = explicit_ggn_sum(model, x, torch.ones(N_ROWS, dtype=torch.bool))
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    G_sum = _dense(_problem(model, x, y, divergence="ngd")[1], model)
    assert rel(G_sum, ggn_sum) < 1e-12
    G_mean = _dense(_problem(model, x, y, divergence="ngd", ngd_scaling="mean")[1], model)
    assert rel(G_mean, ggn_sum / N_ROWS) < 1e-12
    assert rel(G_sum, N_ROWS * G_mean) < 1e-12  # catches a 1/N regression
    G_renyi = _dense(_problem(model, x, y, divergence="renyi", renyi_alpha=0.7)[1], model)
    assert rel(G_renyi, 0.7 * ggn_sum / N_ROWS) < 1e-12
    G_rkl = _dense(_problem(model, x, y, divergence="reverse_kl")[1], model)
    assert rel(G_rkl, ggn_sum) < 1e-12


@pytest.mark.parametrize("divergence", ["ngd", "newton"])
def test_row_mask_excludes_pad_rows(divergence):
    """T2: rows with label −100 enter neither g nor G, and N counts the valid rows only."""
    pads = (1, 4)
    model, x, y = _setup(seed=5, pad_rows=pads)
    valid = y != -100
    g_impl, gv = _problem(model, x, y, divergence=divergence, ngd_scaling="mean")
    g_ref, G_ref = dense_curvature(model, x, y, divergence, "mean")
    torch.testing.assert_close(g_impl, g_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(_dense(gv, model), G_ref, rtol=1e-10, atol=1e-12)
    if divergence == "ngd":
        torch.testing.assert_close(G_ref, explicit_ggn_sum(model, x, valid) / int(valid.sum()), rtol=1e-10, atol=0)
        # dropping the pad rows from the batch gives the same problem
        g_drop, gv_drop = _problem(model, x[valid], y[valid], divergence="ngd", ngd_scaling="mean")
        torch.testing.assert_close(g_impl, g_drop, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(_dense(gv, model), _dense(gv_drop, model), rtol=1e-12, atol=1e-14)


def test_include_pad_rows_counts_every_row():
    """`include_pad_rows=True`: the Fisher includes pad rows and N is the padded count (`docs/algorithm.md` §4.1)."""
    model, x, y = _setup(seed=6, pad_rows=(0, 2))
    g_impl, gv = _problem(model, x, y, divergence="ngd", ngd_scaling="mean", include_pad_rows=True)
    _, G_ref = dense_curvature(model, x, y, "ngd", "mean", include_pad_rows=True)
    torch.testing.assert_close(_dense(gv, model), G_ref, rtol=1e-10, atol=1e-12)
    # linear term: the valid rows' CE summed, divided by all N rows
    g_valid, _ = dense_curvature(model, x, y, "ngd")
    torch.testing.assert_close(g_impl, g_valid * int((y != -100).sum()) / N_ROWS, rtol=1e-12, atol=1e-14)
    # with a pad target id, pad rows "predict pad" (the reference's analytic CE path)
    g_pad, _ = curvature_problem(model, {"x": x, "labels": y}, LLQRConfig(include_pad_rows=True), pad_token_id=1)
    y_pad = torch.where(y == -100, torch.ones_like(y), y)
    g_ref, _ = dense_curvature(model, x, y_pad, "ngd")
    torch.testing.assert_close(flatten(g_pad.values()), g_ref, rtol=1e-12, atol=1e-14)


def test_label_smoothing_enters_g_only():
    model, x, y = _setup(seed=7)
    g_ls, gv_ls = _problem(model, x, y, divergence="ngd", label_smoothing=0.1)
    g_ref, G_ref = dense_curvature(model, x, y, "ngd", label_smoothing=0.1)
    torch.testing.assert_close(g_ls, g_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(_dense(gv_ls, model), G_ref, rtol=1e-10, atol=1e-12)
    # newton uses the label-smoothed loss itself
    g_n, gv_n = _problem(model, x, y, divergence="newton", label_smoothing=0.1)
    g_ref, H_ref = dense_curvature(model, x, y, "newton", label_smoothing=0.1)
    torch.testing.assert_close(_dense(gv_n, model), H_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", ["ngd", "newton", "renyi"])
def test_chunked_problem_is_exact(divergence):
    """§4.5: recomputing per chunk and summing gives the same g and G·v."""
    model, x, y = _setup(seed=8, pad_rows=(3,))
    g_full, gv_full = _problem(model, x, y, divergence=divergence, damping=0.2)
    g_chunk, gv_chunk = _problem(model, x, y, divergence=divergence, damping=0.2, chunk_size=3)
    torch.testing.assert_close(g_chunk, g_full, rtol=1e-12, atol=1e-14)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in model.named_parameters()}
        torch.testing.assert_close(flatten(gv_chunk(v).values()), flatten(gv_full(v).values()), rtol=1e-12, atol=1e-13)


class _TinyLM(nn.Module):
    def __init__(self, vocab: int = 6, dim: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim, dtype=torch.float64)
        self.head = nn.Linear(dim, vocab, dtype=torch.float64)

    def forward(self, input_ids, labels=None):
        assert labels is None, "labels must be popped before the forward"
        return SimpleNamespace(logits=self.head(torch.tanh(self.emb(input_ids))))


def test_logits_and_targets_flattens_and_shifts():
    model = _TinyLM()
    ids = torch.tensor([[1, 2, 3, 4], [5, 0, 1, 2]])
    labels = ids.clone()
    labels[1, 3] = -100
    logits, targets, mask = logits_and_targets(model, {"input_ids": ids, "labels": labels})
    assert logits.shape == (8, 6) and targets.tolist() == labels.reshape(-1).tolist()
    assert mask.tolist() == (labels.reshape(-1) != -100).tolist()
    logits_s, targets_s, mask_s = logits_and_targets(model, {"input_ids": ids, "labels": labels}, shift_labels=True)
    full = model(ids).logits
    torch.testing.assert_close(logits_s, full[:, :-1].reshape(-1, 6))
    assert targets_s.tolist() == labels[:, 1:].reshape(-1).tolist()
    assert int(mask_s.sum()) == 5
    # the causal-LM g is the mean CE of the shifted pairs
    g, _ = curvature_problem(model, {"input_ids": ids, "labels": labels}, shift_labels=True)
    params = list(model.parameters())
    loss = mean_ce(full[:, :-1].reshape(-1, 6), labels[:, 1:].reshape(-1))
    ref = torch.autograd.grad(loss, params)
    torch.testing.assert_close(flatten(g.values()), flatten(ref), rtol=1e-12, atol=1e-14)


def test_frozen_and_tied_parameters():
    """Only `requires_grad` tensors, tied ones once under their first name."""
    model = _TinyLM()
    model.head.weight = model.emb.weight  # tie (vocab, dim)
    model.head.bias.requires_grad_(False)
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    g, gv = curvature_problem(model, {"input_ids": ids, "labels": ids})
    assert list(g) == ["emb.weight"]
    out = gv({"emb.weight": torch.ones(6, 4, dtype=torch.float64)})
    assert list(out) == ["emb.weight"] and torch.isfinite(out["emb.weight"]).all()
    logits = model(ids).logits.reshape(-1, 6)
    (ref,) = torch.autograd.grad(mean_ce(logits, ids.reshape(-1)), [model.emb.weight])
    torch.testing.assert_close(g["emb.weight"], ref, rtol=1e-12, atol=1e-14)


def test_invalid_divergence_raises():
    model, x, y = _setup()
    with pytest.raises(ValueError, match=r"LLQRConfig\.divergence='gauss_newton'"):
        curvature_problem(model, {"x": x, "labels": y}, LLQRConfig(divergence="gauss_newton"))  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_diagnostics_count_rows_with_a_nonfinite_loss(chunk_size):
    """A NaN input gives NaN logits in its row only, yet g is NaN everywhere (0·NaN in the masked backward)."""
    model, x, y = _setup(seed=8, pad_rows=(5,))
    x = x.clone()
    x[4, 0] = float("nan")
    x[5, 0] = float("nan")  # a pad row (not counted in N) still poisons g
    diagnostics: dict = {}
    g, _ = curvature_problem(model, {"x": x, "labels": y}, LLQRConfig(chunk_size=chunk_size), diagnostics=diagnostics)
    assert int(diagnostics["rows"]) == N_ROWS and int(diagnostics["nonfinite_rows"]) == 2
    assert all(not torch.isfinite(t).any() for t in g.values())
    clean: dict = {}
    curvature_problem(model, {"x": x[:4], "labels": y[:4]}, LLQRConfig(chunk_size=chunk_size), diagnostics=clean)
    assert int(clean["rows"]) == 4 and int(clean["nonfinite_rows"]) == 0
