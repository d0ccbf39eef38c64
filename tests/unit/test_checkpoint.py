"""`llqrsam_state.pt`: round trip, atomic save, and a clear error (with the full path) for every unusable file."""

import os
import pickle

import pytest
import torch
from torch import nn

from hf_llqrsam.checkpoint import (
    FORMAT_VERSION,
    STATE_FILE,
    LLQRSAMStateError,
    describe_state,
    load_state,
    save_state,
)
from hf_llqrsam.llqr import LLQRConfig, LLQRPreconditioner


def _state(llqr: bool = True, buffers: bool = True) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))  # large enough to cut in half
    pre = LLQRPreconditioner(model, LLQRConfig(identity_scaling=2.0))
    sam = {"ascents": 3, "skipped_ascent": 0, "buffers": {"fsam_ema": {"0.weight": torch.randn(64, 64)}}}
    if not buffers:
        sam = {"ascents": 0, "skipped_ascent": 0, "buffers": {}}
    return {
        "sam": sam,
        "llqr": pre.state_dict() if llqr else None,
        "config": {"sam_mode": "fsam", "llqr": llqr, "structure": "diagonal"},
    }


def _refused(directory, *needles: str) -> str:
    path = os.path.abspath(os.path.join(directory, STATE_FILE))
    with pytest.raises(LLQRSAMStateError) as err:
        load_state(str(directory))
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert path in msg, msg
    assert all(n in msg for n in needles), msg
    return msg


def test_round_trip_and_missing_file(tmp_path):
    assert load_state(str(tmp_path)) is None  # a stock Trainer checkpoint
    path = save_state(str(tmp_path), _state())
    assert path == os.path.join(str(tmp_path), STATE_FILE) and os.listdir(tmp_path) == [STATE_FILE]  # no temp left
    state = load_state(str(tmp_path))
    assert state["format_version"] == FORMAT_VERSION == 2
    assert state["llqr"]["fingerprint"]["identity_scaling"] == 2.0
    assert torch.equal(
        state["sam"]["buffers"]["fsam_ema"]["0.weight"], _state()["sam"]["buffers"]["fsam_ema"]["0.weight"]
    )


def test_save_refuses_a_state_that_load_would_refuse(tmp_path):
    with pytest.raises(ValueError, match=r"missing keys \['config'\]"):
        save_state(str(tmp_path), {"sam": {}, "llqr": None})
    assert os.listdir(tmp_path) == []


def test_an_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    save_state(str(tmp_path), _state())
    good = (tmp_path / STATE_FILE).read_bytes()

    def crash(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_state(str(tmp_path), _state())
    assert (tmp_path / STATE_FILE).read_bytes() == good and os.listdir(tmp_path) == [STATE_FILE]


def test_truncated_file(tmp_path):
    save_state(str(tmp_path), _state())
    data = (tmp_path / STATE_FILE).read_bytes()
    assert len(data) > 10_000
    for cut in (len(data) // 2, 100):
        (tmp_path / STATE_FILE).write_bytes(data[:cut])
        msg = _refused(tmp_path, "corrupt or truncated", "Delete", "resume from another checkpoint")
        assert "weights_only=False" not in msg.replace("never loads this file with weights_only=False", "")


def test_empty_file(tmp_path):
    (tmp_path / STATE_FILE).write_bytes(b"")
    _refused(tmp_path, "corrupt or truncated", "empty (0 bytes)", "Delete")


def test_random_bytes(tmp_path):
    (tmp_path / STATE_FILE).write_bytes(os.urandom(4096))
    _refused(tmp_path, "corrupt or truncated", "Delete")


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_a_pickle_that_weights_only_refuses(tmp_path):
    torch.save(
        {"format_version": FORMAT_VERSION, "sam": {}, "llqr": None, "config": {}, "x": _Evil()}, tmp_path / STATE_FILE
    )
    msg = _refused(tmp_path, "refuses it", "UnpicklingError", "unsupported GLOBAL", "never loads this file")
    assert "Re-running" not in msg  # torch's advice to load with weights_only=False is not passed on
    plain = pickle.dumps({"format_version": FORMAT_VERSION}, protocol=2)  # a plain pickle, not a torch zip file
    (tmp_path / STATE_FILE).write_bytes(plain)
    _refused(tmp_path, "corrupt or truncated")


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ([1, 2, 3], "holds a list, not a dict"),
        ({"sam": {}, "llqr": None, "config": {}}, "format_version=None"),
        ({"format_version": 4, "sam": {}, "llqr": None, "config": {}}, "format_version=4, written by a newer"),
        ({"format_version": "2", "sam": {}, "llqr": None, "config": {}}, "format_version='2'"),
        ({"format_version": 2, "sam": {}, "llqr": None}, "missing keys ['config']"),
        ({"format_version": 2, "sam": [], "llqr": None, "config": {}}, "['sam'] are not dicts"),
        ({"format_version": 2, "sam": {}, "llqr": 1.0, "config": {}}, "['llqr'] are not dicts"),
    ],
)
def test_files_that_are_not_state_files(tmp_path, payload, needle):
    torch.save(payload, tmp_path / STATE_FILE)
    _refused(tmp_path, needle, "Delete")


def test_format_version_1(tmp_path):
    """Version 1 had no fingerprint: its U is refused, but a SAM-only file (no U) still resumes."""
    old = _state()
    del old["llqr"]["fingerprint"]
    torch.save({"format_version": 1, **old}, tmp_path / STATE_FILE)
    _refused(tmp_path, "format_version=1", "no fingerprint", "llqr_identity_scaling", "hf_llqrsam version", "Delete")
    torch.save({"format_version": 1, **_state(llqr=False)}, tmp_path / STATE_FILE)
    state = load_state(str(tmp_path))
    assert state["format_version"] == 1 and state["llqr"] is None and state["sam"]["ascents"] == 3


def test_describe_state():
    assert describe_state(_state()) == {"sam": True, "llqr": True}
    assert describe_state(_state(llqr=False)) == {"sam": True, "llqr": False}
    assert describe_state(_state(llqr=False, buffers=False)) == {"sam": False, "llqr": False}
    counters_only = _state(buffers=False)
    counters_only["sam"]["ascents"] = 2  # plain SAM: counters, no buffers
    assert describe_state(counters_only) == {"sam": True, "llqr": True}
    empty_kind = _state(buffers=False)
    empty_kind["sam"]["buffers"] = {"fsam_ema": {}}
    assert describe_state(empty_kind)["sam"] is False
