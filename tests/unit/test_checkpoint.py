"""`llqrsam_state.pt`: round trip, atomic save, and a clear error (with the full path) for every unusable file."""

import math
import os
import pickle

import pytest
import torch
from torch import nn

from hf_llqrsam.checkpoint import (
    FORMAT_VERSION,
    STATE_FILE,
    LLQRSAMStateError,
    checkpoint_problem,
    describe_state,
    last_complete_checkpoint,
    load_state,
    save_state,
    validate_sam_state,
)
from hf_llqrsam.llqr import LLQRConfig, LLQRPreconditioner
from hf_llqrsam.sam import SAMState


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


# ---------------------------------------------------------------------------------------------- the SAM part


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def _sam_file(tmp_path, mode: str = "fsam", kinds: tuple[str, ...] = ("gbar",), batches: bool = False) -> dict:
    """A state file as the trainer writes it (`SAMState.state_dict`), with a buffer per kind for every parameter."""
    params = dict(_model().named_parameters())
    sam = SAMState()
    for i, kind in enumerate(kinds):
        sam.set(kind, list(params), [torch.full_like(p, 0.1 * (i + 1)) for p in params.values()])
    sam.ascents, sam.skipped_ascent = 4, 1
    if batches:
        sam.batches = [
            {"inputs": [{"x": torch.ones(2, 4), "labels": torch.zeros(2, dtype=torch.long)}], "num_items": 2}
        ]
    state = {"sam": sam.state_dict(), "llqr": None, "config": {"sam_mode": mode, "llqr": False}}
    save_state(str(tmp_path), state)
    loaded = load_state(str(tmp_path))
    assert loaded is not None
    return loaded


def _sam_refused(tmp_path, state: dict, mode: str, *needles: str) -> str:
    """`state` on disk is refused, by `load_state` or by `validate_sam_state`, naming the file and the fix."""
    torch.save(state, tmp_path / STATE_FILE)
    path = os.path.abspath(tmp_path / STATE_FILE)
    with pytest.raises(LLQRSAMStateError) as err:
        loaded = load_state(str(tmp_path))
        validate_sam_state(loaded, path, mode=mode, params=dict(_model().named_parameters()))
    msg = str(err.value)
    assert path in msg and "Delete" in msg and "\n" not in msg, msg
    assert all(n in msg for n in needles), msg
    return msg


def _edit(path: str, value):
    """A mutation of the state file: the entry at `path` (keys joined by `|`; a list is indexed by a number) becomes
    `value` (called, if callable, for a fresh object); `DELETE` removes it."""

    def apply(state: dict) -> None:
        *keys, last = path.split("|")
        target = state
        for key in keys:
            target = target[int(key)] if isinstance(target, list) else target[key]
        last = int(last) if isinstance(target, list) else last
        if value is DELETE:
            del target[last]
        else:
            target[last] = value() if callable(value) else value

    return apply


def _int_kind(state: dict) -> None:
    state["sam"]["buffers"][0] = {}


DELETE = object()
W = "sam|buffers|gbar|0.weight"  # FSAM's gbar of the first Linear's weight, shape (3, 4)

# (id, run mode, file's mode and kinds, mutation, a phrase of the message)
MALFORMED = [
    ("no-config-sam_mode", "fsam", _edit("config|sam_mode", DELETE), "config has no 'sam_mode'"),
    ("sam_mode-int", "fsam", _edit("config|sam_mode", 3), "config.sam_mode=3"),
    ("sam_mode-unknown", "fsam", _edit("config|sam_mode", "sharp"), "config.sam_mode='sharp'"),
    ("sam_mode-None", "fsam", _edit("config|sam_mode", None), "config.sam_mode=None"),
    ("no-buffers", "fsam", _edit("sam|buffers", DELETE), "missing keys ['buffers']"),
    ("no-ascents", "fsam", _edit("sam|ascents", DELETE), "missing keys ['ascents']"),
    ("no-skipped_ascent", "fsam", _edit("sam|skipped_ascent", DELETE), "missing keys ['skipped_ascent']"),
    ("unknown-sam-key", "fsam", _edit("sam|momentum", lambda: torch.zeros(3)), "unknown keys ['momentum']"),
    ("ascents-negative", "fsam", _edit("sam|ascents", -1), "sam.ascents=-1 is not a non-negative int"),
    ("ascents-float", "fsam", _edit("sam|ascents", 2.0), "sam.ascents=2.0"),
    ("ascents-bool", "fsam", _edit("sam|ascents", True), "sam.ascents=True"),
    ("ascents-tensor", "fsam", _edit("sam|ascents", lambda: torch.tensor(3)), "sam.ascents=tensor(3)"),
    ("skipped-str", "fsam", _edit("sam|skipped_ascent", "0"), "sam.skipped_ascent='0'"),
    ("skipped-None", "fsam", _edit("sam|skipped_ascent", None), "sam.skipped_ascent=None"),
    ("buffers-list", "fsam", _edit("sam|buffers", lambda: [torch.zeros(3, 4)]), "sam.buffers is a list"),
    ("buffers-None", "fsam", _edit("sam|buffers", None), "sam.buffers is a NoneType"),
    ("kind-list", "fsam", _edit("sam|buffers|gbar", lambda: [torch.zeros(3, 4)]), "sam.buffers['gbar'] is a list"),
    ("kind-tensor", "fsam", _edit("sam|buffers|gbar", lambda: torch.zeros(3, 4)), "sam.buffers['gbar'] is a Tensor"),
    ("kind-int-key", "fsam", _int_kind, "sam.buffers[0]"),
    ("buffer-list", "fsam", _edit(W, lambda: [[0.0] * 4] * 3), "sam.buffers['gbar']['0.weight'] is a list"),
    ("buffer-float", "fsam", _edit(W, 0.0), "sam.buffers['gbar']['0.weight'] is a float"),
    ("buffer-dcp-placeholder", "fsam", _edit(W, {"__dcp__": "sam/gbar/0.weight"}), "is a dict, not a tensor"),
    ("extra-kind", "fsam", _edit("sam|buffers|d", lambda: {"0.bias": torch.zeros(3)}), "buffers ['d'] do not belong"),
    ("infosam-kind-under-fsam", "fsam", _edit("sam|buffers|m", lambda: {}), "buffers ['m'] do not belong"),
    ("kinds-under-sam", "sam", _edit("config|sam_mode", "sam"), "buffers ['gbar'] do not belong to sam_mode='sam'"),
    (
        "another-models-names",
        "fsam",
        _edit("sam|buffers|gbar", lambda: {"encoder.weight": torch.zeros(3, 4), "encoder.bias": torch.zeros(3)}),
        "keyed by 2 name(s) that are not trainable parameters of this model (e.g. 'encoder.weight')",
    ),
    ("one-unknown-name", "fsam", _edit("sam|buffers|gbar|head.weight", lambda: torch.zeros(2, 3)), "'head.weight'"),
    ("shape-wrong", "fsam", _edit(W, lambda: torch.zeros(3, 5)), "has shape (3, 5), the parameter (3, 4)"),
    ("shape-broadcast-row", "fsam", _edit(W, lambda: torch.zeros(1, 4)), "has shape (1, 4), the parameter (3, 4)"),
    ("shape-broadcast-vector", "fsam", _edit(W, lambda: torch.zeros(4)), "has shape (4,), the parameter (3, 4)"),
    ("shape-scalar", "fsam", _edit(W, lambda: torch.tensor(0.5)), "has shape (), the parameter (3, 4)"),
    ("shape-transposed", "fsam", _edit(W, lambda: torch.zeros(4, 3)), "has shape (4, 3)"),
    ("shape-flattened", "fsam", _edit(W, lambda: torch.zeros(12)), "has shape (12,)"),
    ("dtype-int", "fsam", _edit(W, lambda: torch.zeros(3, 4, dtype=torch.long)), "dtype torch.int64, not a floating"),
    ("dtype-bool", "fsam", _edit(W, lambda: torch.zeros(3, 4, dtype=torch.bool)), "dtype torch.bool"),
    ("dtype-complex", "fsam", _edit(W, lambda: torch.zeros(3, 4, dtype=torch.cfloat)), "dtype torch.complex64"),
    ("nan", "fsam", _edit(W, lambda: torch.full((3, 4), math.nan)), "buffer 'gbar' of '0.weight' holds non-finite"),
    ("inf", "fsam", _edit(W, lambda: torch.full((3, 4), math.inf)), "holds non-finite values"),
    (
        "minus-inf-bias",
        "fsam",
        _edit("sam|buffers|gbar|2.bias", lambda: torch.tensor([0.0, -math.inf])),
        "buffer 'gbar' of '2.bias' holds non-finite",
    ),
    ("batches-under-fsam", "fsam", _edit("sam|batches", lambda: []), "sam.batches (past-FSAM's overlap window)"),
    ("sam-not-dict", "fsam", _edit("sam", lambda: [1]), "['sam'] are not dicts"),
    ("config-not-dict", "fsam", _edit("config", "fsam"), "['config'] are not dicts"),
]
BATCH = "sam|batches|0"
MALFORMED_PAST = [  # past-FSAM files with an overlap window
    ("batches-dict", _edit("sam|batches", lambda: {"inputs": []}), "sam.batches is a dict, not a list"),
    ("batches-tensor", _edit("sam|batches", lambda: torch.zeros(2)), "sam.batches is a Tensor"),
    ("batch-list", _edit(BATCH, lambda: [torch.ones(2, 4)]), "sam.batches[0] is not"),
    ("batch-no-num_items", _edit(f"{BATCH}|num_items", DELETE), "sam.batches[0] is not"),
    ("batch-extra-key", _edit(f"{BATCH}|step", 3), "sam.batches[0] is not"),
    ("batch-inputs-dict", _edit(f"{BATCH}|inputs", lambda: {"x": torch.ones(2, 4)}), "sam.batches[0] is not"),
    ("batch-inputs-tensors", _edit(f"{BATCH}|inputs", lambda: [torch.ones(2, 4)]), "sam.batches[0] is not"),
    ("batch-num_items-float", _edit(f"{BATCH}|num_items", 2.5), "sam.batches[0] is not"),
    ("batch-num_items-negative", _edit(f"{BATCH}|num_items", -2), "sam.batches[0] is not"),
    ("g_last-broadcast", _edit("sam|buffers|g_last|2.weight", lambda: torch.zeros(1, 3)), "has shape (1, 3)"),
]


@pytest.mark.parametrize(("run_mode", "mutate", "needle"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_sam_state_is_refused_naming_the_file(tmp_path, run_mode, mutate, needle):
    """Issue 22 item 7: every malformed SAM part of a state file on disk is refused before any step runs, with an
    error that names the file, what is wrong and the fix (never a bare KeyError/TypeError, never a silent restart
    or broadcast)."""
    state = _sam_file(tmp_path)
    validate_sam_state(state, "f", mode=run_mode, params=dict(_model().named_parameters()))  # valid before
    mutate(state)
    _sam_refused(tmp_path, state, run_mode, needle)


@pytest.mark.parametrize(("mutate", "needle"), [m[1:] for m in MALFORMED_PAST], ids=[m[0] for m in MALFORMED_PAST])
def test_malformed_past_fsam_window_is_refused_naming_the_file(tmp_path, mutate, needle):
    state = _sam_file(tmp_path, "past_fsam", ("gbar", "g_last"), batches=True)
    validate_sam_state(state, "f", mode="past_fsam", params=dict(_model().named_parameters()))  # valid before
    mutate(state)
    _sam_refused(tmp_path, state, "past_fsam", needle)


def test_the_held_out_count_of_malformed_cases():
    assert len(MALFORMED) + len(MALFORMED_PAST) >= 30
    assert len({m[0] for m in MALFORMED} | {m[0] for m in MALFORMED_PAST}) == len(MALFORMED) + len(MALFORMED_PAST)


@pytest.mark.parametrize(
    ("run_mode", "file_mode", "kinds", "batches"),
    [
        ("fsam", "fsam", ("gbar",), False),
        ("fsam", "fsam", (), False),  # an FSAM run saved before its first ascent
        ("infosam", "infosam", ("m", "v"), False),
        ("vasso", "vasso", ("d",), False),
        ("looksam", "looksam", ("gv",), False),
        ("past_fsam", "past_fsam", ("gbar", "g_last"), True),
        ("sam", "sam", (), False),
        ("none", "none", (), False),  # LLQR alone: counters only
        ("sam", "fsam", ("gbar",), False),  # another mode's file: layout checked, the trainer starts SAM fresh
        ("fsam", "infosam", ("m", "v"), False),
    ],
)
def test_valid_sam_states_are_accepted(tmp_path, run_mode, file_mode, kinds, batches):
    state = _sam_file(tmp_path, file_mode, kinds, batches)
    validate_sam_state(state, "f", mode=run_mode, params=dict(_model().named_parameters()))


def test_buffers_of_some_parameters_and_low_precision_are_accepted(tmp_path):
    """A kind may cover some of the trainable parameters (those that had a gradient: the rest read as zeros), and a
    buffer may be any floating dtype; a file of another mode is not checked against this model."""
    state = _sam_file(tmp_path)
    del state["sam"]["buffers"]["gbar"]["0.bias"]
    state["sam"]["buffers"]["gbar"]["2.weight"] = torch.zeros(2, 3, dtype=torch.bfloat16)
    params = dict(_model().named_parameters())
    validate_sam_state(state, "f", mode="fsam", params=params)
    state["sam"]["buffers"]["gbar"]["other.weight"] = torch.zeros(7)
    validate_sam_state(state, "f", mode="sam", params=params)  # another mode's buffers are dropped, not read
    with pytest.raises(LLQRSAMStateError, match="'other.weight'"):
        validate_sam_state(state, "f", mode="fsam", params=params)


def test_a_buffer_is_checked_against_the_global_shape_of_its_parameter(tmp_path):
    """FSDP2: the live parameter is a DTensor whose `.shape` is the global shape; what is compared is `p.shape`."""

    state = _sam_file(tmp_path)
    params = {name: torch.empty(0) for name in dict(_model().named_parameters())}
    with pytest.raises(LLQRSAMStateError, match=r"has shape \(3, 4\), the parameter \(0,\)"):
        validate_sam_state(state, "f", mode="fsam", params=params)
    params = {name: torch.empty(p.shape, device="meta") for name, p in _model().named_parameters()}
    validate_sam_state(state, "f", mode="fsam", params=params)  # only the shape of the parameter is read


# ---------------------------------------------------------------------------------------------- complete checkpoints


def _checkpoint(out, step: int, *files: str, state: bytes | None = None) -> str:
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in files:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text("{}" if name.endswith(".json") else "weights")
    if state is not None:
        (path / STATE_FILE).write_bytes(state)
    return str(path)


def test_last_complete_checkpoint_skips_incomplete_ones_naming_them(tmp_path, caplog):
    good_state = tmp_path / "good"
    good_state.mkdir()
    save_state(str(good_state), _state(llqr=False))
    state_bytes = (good_state / STATE_FILE).read_bytes()
    out = tmp_path / "out"
    complete = _checkpoint(out, 3, "trainer_state.json", "model.safetensors", state=state_bytes)
    _checkpoint(out, 10, "trainer_state.json", "model.safetensors", state=b"")  # state file cut at 0 bytes
    _checkpoint(out, 8, "model.safetensors", "optimizer.pt")  # killed before trainer_state.json
    _checkpoint(out, 9, "trainer_state.json")  # no weights
    _checkpoint(out, 7, "model.safetensors")
    (out / "checkpoint-7" / "trainer_state.json").write_text('{"global_step": 7, "log_hi')  # a cut JSON
    _checkpoint(out, 2, "trainer_state.json", "model.safetensors")
    (out / "checkpoint-11").write_text("not a folder")
    (out / "checkpoint-final").mkdir()
    with caplog.at_level("WARNING", logger="hf_llqrsam.checkpoint"):
        assert last_complete_checkpoint(str(out)) == complete
    (message,) = [r.getMessage() for r in caplog.records if r.name == "hf_llqrsam.checkpoint"]
    order = [message.index(os.path.join(str(out), f"checkpoint-{n} (")) for n in (10, 9, 8, 7)]
    assert order == sorted(order), message  # newest first, each named with its reason
    assert "llqrsam_state.pt is unusable" in message and "no model or adapter weights" in message
    assert "no trainer_state.json: its save was interrupted" in message and "JSONDecodeError" in message
    assert f"Resuming from {complete} instead" in message
    assert os.path.isdir(out / "checkpoint-8")  # nothing is deleted


@pytest.mark.parametrize(
    "weights",
    [
        ["model.safetensors"],
        ["pytorch_model.bin"],
        ["model.safetensors.index.json"],
        ["adapter_model.safetensors"],
        ["adapter_model.bin"],
        ["pytorch_model_fsdp_0/__0_0.distcp"],  # FSDP SHARDED_STATE_DICT
        ["pytorch_model_fsdp.bin"],
        ["my_adapter/adapter_model.safetensors"],  # several PEFT adapters, one folder each
        ["global_step4/mp_rank_00_model_states.pt"],  # a DeepSpeed engine checkpoint
    ],
)
def test_what_counts_as_weights(tmp_path, caplog, weights):
    complete = _checkpoint(tmp_path, 4, "trainer_state.json", *weights)
    assert checkpoint_problem(complete) is None
    assert last_complete_checkpoint(str(tmp_path)) == complete and not caplog.records


def test_no_complete_checkpoint(tmp_path, caplog):
    assert last_complete_checkpoint(str(tmp_path / "missing")) is None
    assert last_complete_checkpoint(str(tmp_path)) is None and not caplog.records
    _checkpoint(tmp_path, 5, "model.safetensors")
    with caplog.at_level("WARNING", logger="hf_llqrsam.checkpoint"):
        assert last_complete_checkpoint(str(tmp_path)) is None
    assert "No complete checkpoint is left" in caplog.text and "checkpoint-5 (no trainer_state.json" in caplog.text
