"""The FSDP2 checkpoint pieces that need no process group (`hf_llqrsam/sharded_state.py`, format 3 of
`llqrsam_state.pt`); the DCP round trip itself runs in tests/distributed/test_fsdp2_cpu.py."""

import pytest
import torch

from hf_llqrsam.checkpoint import FORMAT_VERSION, SHARDED_FORMAT_VERSION, load_state, save_state
from hf_llqrsam.sharded_state import PLACEHOLDER, has_placeholders, load_sharded, split_dtensors


def _state(u):
    return {
        "sam": {"ascents": 1, "skipped_ascent": 0, "buffers": {}},
        "llqr": {"blocks": {"w": {"d": u}}},
        "config": {"sam_mode": "sam", "llqr": True},
    }


def test_plain_state_has_nothing_to_shard():
    state = _state(torch.ones(3))
    out, shards = split_dtensors(state)
    assert shards == {} and out == state and not has_placeholders(out)
    assert out["llqr"]["blocks"]["w"]["d"] is state["llqr"]["blocks"]["w"]["d"]  # tensors are shared, not copied


def test_sharded_file_is_format_3_and_loads_with_weights_only(tmp_path):
    state = _state({PLACEHOLDER: "llqr/blocks/w/d"})
    save_state(str(tmp_path), state, sharded=True)
    loaded = load_state(str(tmp_path))
    assert loaded["format_version"] == SHARDED_FORMAT_VERSION == FORMAT_VERSION + 1
    assert has_placeholders(loaded) and loaded["llqr"]["blocks"]["w"]["d"] == {PLACEHOLDER: "llqr/blocks/w/d"}
    save_state(str(tmp_path), _state(torch.ones(3)))
    assert load_state(str(tmp_path))["format_version"] == FORMAT_VERSION  # no shards: the format older code reads


def test_missing_shard_directory_is_a_clear_error(tmp_path):
    state = _state({PLACEHOLDER: "llqr/blocks/w/d"})
    with pytest.raises(ValueError, match=r"refers to 1 sharded tensors \(an FSDP2 checkpoint\) but .*llqrsam_dcp"):
        load_sharded(str(tmp_path), state, lambda path, size, dtype: torch.empty(size, dtype=dtype))
