"""`hf_llqrsam.engine`: the step schedule and the commit-on-finite rule, against hand-written expectations."""

import pytest
import torch
from torch import nn

from hf_llqrsam.config import SAMConfig
from hf_llqrsam.engine import SAMEngine, step_kind


@pytest.mark.parametrize(
    ("config", "kinds"),
    [
        (None, "pppppp"),
        (SAMConfig(mode="sam"), "tttttt"),
        (SAMConfig(mode="sam", start_step=2), "pptttt"),
        (SAMConfig(mode="sam", interval=2), "tptptp"),
        (SAMConfig(mode="sam", start_step=1, interval=2), "ptptpt"),
        (SAMConfig(mode="looksam", looksam_interval=3), "trrtrr"),
        (SAMConfig(mode="looksam", looksam_interval=2, start_step=1), "ptrtrt"),
        (SAMConfig(mode="past_fsam"), "oooooo"),
        (SAMConfig(mode="past_fsam", start_step=3), "pppooo"),
    ],
)
def test_step_kind_follows_the_record_and_the_schedule(config, kinds):
    letter = {"plain": "p", "two": "t", "reuse": "r", "one": "o"}
    assert "".join(letter[step_kind(config, s)] for s in range(6)) == kinds


def _engine(mode: str) -> tuple[SAMEngine, nn.Linear]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    return SAMEngine(model, SAMConfig(mode=mode, rho=0.1)), model


def _backward(model: nn.Linear, scale: float = 1.0) -> None:
    x = torch.arange(6.0).reshape(2, 3)
    (model(x).pow(2).sum() * scale).backward()


@pytest.mark.parametrize("mode", ["fsam", "vasso", "infosam"])
def test_the_ascent_writes_nothing_until_the_descent_commits(mode):
    """`ascend` keeps the mode state pending; a finite `descend` commits it, a non-finite one leaves it untouched."""
    engine, model = _engine(mode)
    for step, scale in enumerate([1.0, 1.0, float("nan")]):
        engine.begin(step)
        _backward(model)
        before = {k: {n: t.clone() for n, t in v.items()} for k, v in engine.state.buffers.items()}
        ascents = engine.state.ascents
        assert engine.ascend(0.1)
        assert engine.state.ascents == ascents and engine.state.buffers.keys() == before.keys()  # nothing written
        with engine.perturbed():
            _backward(model, scale)
        taken = engine.descend()
        engine.end(record_losses=False)
        assert taken == (scale == 1.0)
        if taken:
            assert engine.state.ascents == ascents + 1 and engine.state.buffers
        else:  # a NaN pass 2: the state is bit-identical and p.grad is cleared for the optimizer
            assert engine.state.ascents == ascents
            assert all(torch.equal(t, engine.state.buffers[k][n]) for k, v in before.items() for n, t in v.items())
            assert all(p.grad is None for p in model.parameters())
        model.zero_grad(set_to_none=True)


def test_perturbed_restores_the_weights_bit_exactly():
    engine, model = _engine("sam")
    before = [p.detach().clone() for p in model.parameters()]
    engine.begin(0)
    _backward(model)
    engine.ascend(0.1)
    with engine.perturbed():
        assert not torch.equal(model.weight, before[0])  # θ + ε inside the block
        _backward(model)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_a_step_without_begin_is_refused_clearly():
    engine, _ = _engine("sam")
    with pytest.raises(RuntimeError, match=r"begin\(step\)"):
        engine.ascend(0.1)
