"""`hf_llqrsam.llqr.state`: U's state dict round-trips bit for bit, and a U of other settings is refused by its
fingerprint, naming the file and the setting."""

import pytest
import torch
from torch import nn

from hf_llqrsam.llqr import LLQRConfig
from hf_llqrsam.llqr.state import UState


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def test_state_dict_round_trips_bit_for_bit():
    saved = UState(_model(), LLQRConfig())
    for block in saved.structure.blocks:
        block["d"].copy_(torch.rand_like(block["d"]) + 0.5)
    saved.num_updates, saved.last_update_step = 3, 40
    loaded = UState(_model(), LLQRConfig())
    loaded.load_state_dict(saved.state_dict())
    assert (loaded.num_updates, loaded.last_update_step) == (3, 40)
    for a, b in zip(saved.structure.blocks, loaded.structure.blocks, strict=True):
        assert torch.equal(a["d"], b["d"])


def test_a_u_of_other_settings_is_refused_naming_the_setting_and_the_file():
    saved = UState(_model(), LLQRConfig(identity_scaling=1.0)).state_dict()
    other = UState(_model(), LLQRConfig(identity_scaling=2.0))
    with pytest.raises(ValueError, match=r"ckpt/llqrsam_state\.pt.*identity_scaling"):
        other.load_state_dict(saved, source="ckpt/llqrsam_state.pt")
