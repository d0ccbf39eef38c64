"""`hf_llqrsam.llqr.apply`: U·t out of place and in place, against the diagonal written out by hand."""

import torch
from torch import nn

from hf_llqrsam.llqr import LLQRConfig
from hf_llqrsam.llqr.apply import apply_u, apply_u_
from hf_llqrsam.llqr.state import UState


def _state() -> tuple[UState, list[str]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    u = UState(model, LLQRConfig())
    for block in u.structure.blocks:  # a non-trivial diagonal
        block["d"].copy_(torch.rand_like(block["d"]) + 0.5)
    return u, [n for n, _ in model.named_parameters()]


def test_apply_out_of_place_and_in_place_equal_the_hand_written_diagonal():
    u, names = _state()
    tensors = [torch.randn(b["d"].shape) for b in u.structure.blocks]
    expected = [t * b["d"] / u.structure.scale for t, b in zip(tensors, u.structure.blocks, strict=True)]
    out = apply_u(u, names, tensors)
    assert all(torch.allclose(o, e) for o, e in zip(out, expected, strict=True))
    copies = [t.clone() for t in tensors]
    apply_u_(u, names, copies)
    assert all(torch.allclose(c, e) for c, e in zip(copies, expected, strict=True))


def test_names_outside_u_are_left_as_they_are():
    u, names = _state()
    t = torch.randn(5)
    assert torch.equal(apply_u(u, ["not.a.param"], [t])[0], t)
    copy = t.clone()
    apply_u_(u, ["not.a.param"], [copy])
    assert torch.equal(copy, t)
