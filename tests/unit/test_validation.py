"""Argument-time validation, table-driven: every bad value fails when the arguments are built, naming the flag.

`BAD` holds the rejected configurations (kwargs, a `match=` regex naming the flag), run through the Python API of
both argument classes; `BAD_CLI` runs a subset as `HfArgumentParser` argv, and through `parse_args`, which turns the
error into one line and exit code 2; `VALID` must construct without error and without an ignored-flag warning;
`IGNORED` constructs with exactly one warning naming every ignored flag.
"""

import dataclasses
import math
import re
import subprocess
import sys
import typing
import warnings

import numpy as np
import pytest
from transformers import HfArgumentParser

from hf_llqrsam import LLQRSAMSeq2SeqTrainingArguments, LLQRSAMTrainingArguments
from hf_llqrsam.args import _RANGES, _UNBOUNDED, LLQRSAMFields, cli_errors, parse_args, validate_llqrsam_args
from hf_llqrsam.modes import MODES

HINTS = typing.get_type_hints(LLQRSAMFields)
DEFAULTS = {f.name: f.default for f in dataclasses.fields(LLQRSAMFields)}
LITERALS = {name: typing.get_args(hint) for name, hint in HINTS.items() if typing.get_origin(hint) is typing.Literal}
FLOATS = [name for name, hint in HINTS.items() if float in (hint, *typing.get_args(hint))]
INTS = [name for name, hint in HINTS.items() if int in (hint, *typing.get_args(hint))]
BOOLS = [name for name, hint in HINTS.items() if hint is bool]


# ---------------------------------------------------------------------------------------------- the table

BAD: list[tuple[dict, str]] = []

# every Literal flag with a case typo, and a value of the wrong type
BAD += [
    ({name: allowed[0].capitalize()}, rf"Invalid {name}='{allowed[0].capitalize()}'\. Must be one of '{allowed[0]}'")
    for name, allowed in LITERALS.items()
]
BAD += [
    ({"sam_mode": "SAM"}, r"Invalid sam_mode='SAM'\. Must be one of 'none', 'sam', 'asam', 'fsam'"),
    ({"sam_mode": "sharp"}, r"Invalid sam_mode='sharp'\. Must be one of"),
    ({"sam_mode": None}, r"Invalid sam_mode=None\. Must be one of"),
    ({"sam_mode": 1}, r"Invalid sam_mode=1\. Must be one of"),
    ({"sam_accumulation": "Window"}, r"Invalid sam_accumulation='Window'\. Must be one of 'window', 'micro'\.$"),
    ({"sam_bn_stats": "third"}, r"Invalid sam_bn_stats='third'\. Must be one of 'second', 'first'\."),
    ({"llqr_apply": "Update"}, r"Invalid llqr_apply='Update'\. Must be one of 'gradient', 'update'\."),
    ({"llqr_structure": "kfac "}, r"Invalid llqr_structure='kfac '\. Must be one of"),
    (
        {"llqr_divergence": "kl"},
        r"Invalid llqr_divergence='kl'\. Must be one of 'ngd', 'newton', 'renyi', 'reverse_kl'",
    ),
]

# every float flag with inf, -inf and nan
BAD += [({name: math.inf}, rf"Invalid {name}=inf\. Must be a finite float") for name in FLOATS]
BAD += [({name: math.nan}, rf"Invalid {name}=nan\. Must be a finite float") for name in FLOATS]
BAD += [
    ({name: -math.inf}, rf"Invalid {name}=-inf\. Must be a finite float")
    for name in ("sam_rho_min", "llqr_damping", "fsam_sigma", "gsam_alpha")
]

# wrong types
BAD += [
    ({"llqr": "no"}, r"Invalid llqr='no'\. Must be a bool \(True or False\)"),
    ({"llqr": 1}, r"Invalid llqr=1\. Must be a bool"),
    ({"llqr": None}, r"Invalid llqr=None\. Must be a bool"),
    ({"sam_same_dropout": 1}, r"Invalid sam_same_dropout=1\. Must be a bool"),
    ({"llqr_warm_start": "yes"}, r"Invalid llqr_warm_start='yes'\. Must be a bool"),
    ({"llqr_in_perturbation": 0}, r"Invalid llqr_in_perturbation=0\. Must be a bool"),
    ({"sam_interval": 1.5}, r"Invalid sam_interval=1\.5\. Must be an int\."),
    ({"sam_interval": 2.0}, r"Invalid sam_interval=2\.0\. Must be an int\."),
    ({"sam_start_step": True}, r"Invalid sam_start_step=True\. Must be an int\."),
    ({"llqr_inner_steps": 1.5}, r"Invalid llqr_inner_steps=1\.5\. Must be an int\."),
    ({"llqr_batch_size": "64"}, r"Invalid llqr_batch_size='64'\. Must be an int\."),
    ({"llqr_update_interval": None}, r"Invalid llqr_update_interval=None\. Must be an int\."),
    ({"llqr_update_until": 2.5}, r"Invalid llqr_update_until=2\.5\. Must be an int or None"),
    ({"llqr_chunk_size": "8"}, r"Invalid llqr_chunk_size='8'\. Must be an int or None"),
    ({"sam_rho": "0.1"}, r"Invalid sam_rho='0\.1'\. Must be a finite float"),
    ({"sam_rho": True, "sam_mode": "sam"}, r"Invalid sam_rho=True\. Must be a finite float"),
    ({"fsam_beta": None}, r"Invalid fsam_beta=None\. Must be a finite float\."),
    ({"fisher_sam_eta": "0.1"}, r"Invalid fisher_sam_eta='0\.1'\. Must be a finite float or None"),
    ({"llqr_damping": [0.1]}, r"Invalid llqr_damping=\[0\.1\]\. Must be a finite float"),
]

# ranges
BAD += [
    ({"sam_mode": "sam", "sam_rho": 0.0}, r"sam_rho=0.0\. Must be > 0 when sam_mode"),
    ({"sam_mode": "fsam", "sam_rho": -0.05}, r"sam_rho=-0.05\. Must be > 0 when sam_mode"),
    ({"sam_rho_min": -0.1}, r"sam_rho_min=-0.1\. Must be >= 0"),
    ({"sam_interval": 0}, r"sam_interval=0\. Must be >= 1"),
    ({"sam_start_step": -1}, r"sam_start_step=-1\. Must be >= 0"),
    ({"sam_eps": 0.0}, r"sam_eps=0.0\. Must be > 0"),
    ({"sam_eps": -1e-12}, r"sam_eps=-1e-12\. Must be > 0"),
    ({"fsam_beta": 1.0}, r"fsam_beta=1.0\. Must be in \[0, 1\)"),
    ({"fsam_beta": -0.1}, r"fsam_beta=-0.1\. Must be in \[0, 1\)"),
    ({"asam_eta": -0.1}, r"asam_eta=-0.1\. Must be >= 0"),
    ({"fisher_sam_eta": 0.0}, r"fisher_sam_eta=0.0\. Must be > 0"),
    ({"fisher_sam_eta": -1.0}, r"fisher_sam_eta=-1.0\. Must be > 0"),
    ({"gsam_alpha": -1.0}, r"gsam_alpha=-1.0\. Must be >= 0"),
    ({"vasso_theta": 0.0}, r"vasso_theta=0.0\. Must be in \(0, 1\]"),
    ({"vasso_theta": 1.5}, r"vasso_theta=1.5\. Must be in \(0, 1\]"),
    ({"infosam_alpha": 1.0}, r"infosam_alpha=1.0\. Must be in \[0, 1\)"),
    ({"infosam_damping": 0.0}, r"infosam_damping=0.0\. Must be > 0"),
    ({"sam_rho_schedule": "lr_proportional", "sam_rho_min": 0.5}, r"sam_rho_min=0.5\. Must be <= sam_rho"),
    ({"llqr_update_interval": 0}, r"llqr_update_interval=0\. Must be >= 1"),
    ({"llqr_update_until": -1}, r"llqr_update_until=-1\. Must be >= 1"),
    ({"llqr_update_until": 0}, r"llqr_update_until=0\. Must be >= 1 .*U = I for the whole run"),  # issue 22 item 10
    ({"llqr_batch_size": 0}, r"llqr_batch_size=0\. Must be >= 1"),
    ({"llqr_inner_steps": -1}, r"llqr_inner_steps=-1\. Must be >= 0"),
    ({"llqr_inner_lr": 0.0}, r"llqr_inner_lr=0.0\. Must be > 0"),
    ({"llqr_inner_lr": -1e-3}, r"llqr_inner_lr=-0.001\. Must be > 0"),
    ({"llqr_inner_momentum": 1.0}, r"llqr_inner_momentum=1.0\. Must be in \[0, 1\)"),
    ({"llqr_clip_norm": 0.0}, r"llqr_clip_norm=0.0\. Must be > 0"),
    ({"llqr_ema_decay": 1.5}, r"llqr_ema_decay=1.5\. Must be in \[0, 1\]"),
    ({"llqr_ema_decay": -0.1}, r"llqr_ema_decay=-0.1\. Must be in \[0, 1\]"),
    ({"llqr_damping": -1.0}, r"llqr_damping=-1.0\. Must be >= 0"),
    ({"llqr_min_diag": 0.0}, r"llqr_min_diag=0.0\. Must be > 0"),
    ({"llqr_renyi_alpha": 1.0}, r"llqr_renyi_alpha=1.0\. Must be > 0 and != 1"),
    ({"llqr_renyi_alpha": 0.0}, r"llqr_renyi_alpha=0.0\. Must be > 0 and != 1"),
    ({"llqr_identity_scaling": 0.0}, r"llqr_identity_scaling=0.0\. Must be > 0"),
    ({"llqr_chunk_size": 0}, r"llqr_chunk_size=0\. Must be >= 1"),
]

# the LLQR inner solvers, schedules, milestones and structures (issue 10, LLQR side)
BAD += [
    (
        {"llqr_inner_solver": "cg_back_pr+"},
        r"Invalid llqr_inner_solver='cg_back_pr\+'\. Must be one of 'momentum', 'sgd', 'adam', 'cg'\.",
    ),
    ({"llqr_cg_beta": "pr+"}, r"Invalid llqr_cg_beta='pr\+'\. Must be one of 'reference', 'polak_ribiere'\."),
    ({"llqr_inner_lr_schedule": "cosine_annealing"}, r"llqr_inner_lr_schedule='cosine_annealing'\. Must be one of"),
    ({"llqr_ema_schedule": "step_warmup"}, r"Invalid llqr_ema_schedule='step_warmup'\. Must be one of 'constant'"),
    ({"llqr_structure": "psd-e-kfac"}, r"Invalid llqr_structure='psd-e-kfac'\. Must be one of .*'psd_ekfac'"),
    ({"llqr_inner_lr_schedule_value": -1e-3}, r"llqr_inner_lr_schedule_value=-0\.001\. Must be >= 0"),
    ({"llqr_inner_lr_schedule_steps": 0}, r"llqr_inner_lr_schedule_steps=0\. Must be >= 1"),
    ({"llqr_inner_lr_schedule_steps": 2.5}, r"llqr_inner_lr_schedule_steps=2\.5\. Must be an int or None"),
    ({"llqr_ema_schedule_value": 1.5}, r"llqr_ema_schedule_value=1\.5\. Must be in \[0, 1\]"),
    ({"llqr_ema_schedule_value": -0.1}, r"llqr_ema_schedule_value=-0\.1\. Must be in \[0, 1\]"),
    ({"llqr_ema_schedule_steps": 0}, r"llqr_ema_schedule_steps=0\. Must be >= 1"),
    ({"llqr_ema_schedule_steps": "100"}, r"llqr_ema_schedule_steps='100'\. Must be an int or None"),
    ({"llqr_update_interval_milestones": 15}, r"llqr_update_interval_milestones=15\. Must be a string or None"),
    (
        {"llqr": True, "llqr_update_interval_milestones": "15"},
        r"Invalid llqr_update_interval_milestones='15': '15' is not 'step:interval'",
    ),
    ({"llqr": True, "llqr_update_interval_milestones": "0:10"}, r"milestones='0:10'.*the step must be >= 1"),
    ({"llqr": True, "llqr_update_interval_milestones": "5:0"}, r"milestones='5:0'.*the interval >= 1"),
    ({"llqr": True, "llqr_update_interval_milestones": "20:10,10:5"}, r"the steps must strictly increase"),
    (
        {"llqr": True, "llqr_ema_schedule": "cosine", "llqr_ema_schedule_value": 0.925},
        r"Invalid llqr_ema_schedule_steps=None with llqr_ema_schedule='cosine'",
    ),
    (
        {"llqr": True, "llqr_inner_lr_schedule": "warmup"},
        r"Invalid llqr_inner_lr_schedule_steps=None with llqr_inner_lr_schedule='warmup'",
    ),
]

# past-FSAM, LookSAM, WSAM, the layer norms and fsam_ema (issue 10, SAM side)
BAD += [
    ({"past_fsam_overlap": 1.0}, r"past_fsam_overlap=1.0\. Must be 1 - 1/K for an integer K"),
    ({"past_fsam_overlap": -0.1}, r"past_fsam_overlap=-0.1\. Must be 1 - 1/K"),
    ({"past_fsam_overlap": 0.3}, r"past_fsam_overlap=0.3\. Must be 1 - 1/K .*batch_size % "),
    ({"past_fsam_overlap": "0.5"}, r"past_fsam_overlap='0.5'\. Must be a finite float"),
    ({"looksam_interval": 0}, r"looksam_interval=0\. Must be >= 1"),
    ({"looksam_interval": 2.5}, r"looksam_interval=2.5\. Must be an int\."),
    ({"looksam_alpha": -0.1}, r"looksam_alpha=-0.1\. Must be >= 0"),
    ({"wsam_gamma": 1.0}, r"wsam_gamma=1.0\. Must be in \[0, 1\)"),
    ({"wsam_gamma": -0.5}, r"wsam_gamma=-0.5\. Must be in \[0, 1\)"),
    ({"wsam_decouple": 1}, r"wsam_decouple=1\. Must be a bool"),
    ({"fsam_ema": "ema_grad"}, r"fsam_ema='ema_grad'\. Must be one of 'grad', 'precond_grad', 'direction'"),
    ({"sam_norm": "layer_matrix_norm"}, r"sam_norm='layer_matrix_norm'\. Must be one of"),
    ({"sam_mode": "looksam", "sam_interval": 2}, r"sam_interval=2 with sam_mode='looksam'.*looksam_interval.*be 1"),
    ({"sam_mode": "past_fsam", "sam_interval": 3}, r"sam_interval=3 with sam_mode='past_fsam'.*must be 1"),
    ({"sam_mode": "asam", "sam_norm": "layer_euclidean"}, r"sam_norm='layer_euclidean' with sam_mode='asam'"),
    ({"sam_mode": "fisher_sam", "sam_norm": "layer_matrix"}, r"sam_norm='layer_matrix' with sam_mode='fisher"),
    ({"llqr": True, "sam_mode": "fsam", "fsam_ema": "grad"}, r"fsam_ema='grad' with llqr_in_perturbation=True"),
    ({"llqr": True, "sam_mode": "past_fsam", "fsam_ema": "grad"}, r"fsam_ema='grad'.*--no_llqr_in_perturbation"),
    (
        {"llqr": True, "sam_mode": "past_fsam", "sam_norm": "layer_matrix", "llqr_structure": "kfac"},
        r"sam_norm='layer_matrix' with llqr_structure='kfac'",
    ),
]

# the mode rules, from the ModeSpec records
BAD += [
    ({"sam_mode": m, "sam_accumulation": "micro"}, rf"sam_accumulation='micro' with sam_mode='{m}'.*must be 'window'")
    for m, spec in MODES.items()
    if spec.window_only
]
BAD += [
    ({"sam_mode": m, "sam_scope": "local"}, rf"sam_scope='local' with sam_mode='{m}'.*must be 'global'")
    for m, spec in MODES.items()
    if spec.global_only
]
BAD += [
    ({"sam_mode": m, "sam_norm": "matrix"}, rf"sam_norm='matrix' with sam_mode='{m}'.*must be 'euclidean'")
    for m, spec in MODES.items()
    if spec.own_normaliser
]

# LLQR with each incompatible mode, and where U enters
BAD += [
    ({"llqr": True, "sam_mode": m}, rf"llqr=True with sam_mode='{m}': LLQR enters neither")
    for m, spec in MODES.items()
    if not (spec.llqr_geometry or spec.llqr_descent)
]
BAD += [
    ({"llqr": True, "sam_mode": m}, rf"llqr_in_perturbation=True with sam_mode='{m}'.*--no_llqr_in_perturbation")
    for m, spec in MODES.items()
    if spec.llqr_descent and not spec.llqr_geometry
]
BAD += [
    ({"llqr": True, "llqr_on_update": False}, r"llqr=True with U used nowhere"),
    ({"llqr": True, "sam_mode": "sam", "llqr_on_update": False, "llqr_in_perturbation": False}, r"U used nowhere"),
    ({"llqr": True, "sam_mode": "fsam", "llqr_on_update": False, "llqr_in_perturbation": False}, r"U used nowhere"),
    ({"llqr": True, "sam_mode": "asam", "llqr_on_update": False, "llqr_in_perturbation": False}, r"U used nowhere"),
    (
        {"llqr": True, "llqr_apply": "update", "llqr_on_update": False, "sam_mode": "sam"},
        r"llqr_apply='update'\. Requires llqr_on_update",
    ),
    (
        {"llqr": True, "sam_mode": "sam", "sam_norm": "matrix", "llqr_structure": "kfac"},
        r"sam_norm='matrix' with llqr_structure='kfac'",
    ),
    (
        {"llqr": True, "sam_mode": "fsam", "sam_norm": "matrix", "llqr_structure": "ekfac"},
        r"sam_norm='matrix' with llqr_structure='ekfac'",
    ),
    (
        {"llqr": True, "sam_mode": "sam", "sam_norm": "matrix", "llqr_structure": "sep_ekfac"},
        r"sam_norm='matrix' with llqr_structure='sep_ekfac'",
    ),
]

# the support matrix
BAD += [
    ({"sam_mode": "sam", "deepspeed": "ds.json"}, r"Invalid deepspeed='ds.json' with sam_mode/llqr"),
    ({"llqr": True, "deepspeed": {"train_batch_size": 8}}, r"Invalid deepspeed=\{'train_batch_size': 8\} with"),
    ({"sam_mode": "sam", "optim": "lomo"}, r"optim='lomo'"),
    ({"llqr": True, "optim": "adalomo"}, r"optim='adalomo'"),
    (
        {"sam_mode": "sam", "optim": "galore_adamw_layerwise", "optim_target_modules": ["attn"]},
        r"optim='galore_adamw_layerwise'",
    ),
    (
        {"sam_mode": "asam", "optim": "galore_adafactor_layerwise", "optim_target_modules": ["attn"]},
        r"optim='galore_adafactor_layerwise'",
    ),
    (
        {"sam_mode": "sam", "optim": "apollo_adamw_layerwise", "optim_target_modules": ["attn"]},
        r"optim='apollo_adamw_layerwise'",
    ),
    ({"sam_mode": "sam", "ddp_static_graph": True}, r"ddp_static_graph=True"),
    ({"llqr": True, "ddp_static_graph": True}, r"ddp_static_graph=True"),
    ({"sam_mode": "sam", "parallelism_config": object()}, r"Invalid parallelism_config"),
    ({"sam_mode": "sam", "fsdp": True, "use_cpu": True}, r"fsdp=True with use_cpu=True"),
    ({"sam_mode": "sam", "fsdp": True, "fsdp_config": {"version": 1}}, r"fsdp_config version=1.*Use version 2"),
    ({"sam_mode": "sam", "sam_scope": "local", "fsdp": True}, r"sam_scope='local' with fsdp: FSDP2 shards every"),
    (
        {"sam_mode": "sam", "llqr": True, "llqr_structure": "kfac", "fsdp": True, "fsdp_config": {"version": 2}},
        r"llqr_structure='kfac' with fsdp: Kronecker factors act on both sides",
    ),
    ({"llqr": True, "llqr_structure": "ekfac", "fsdp": True}, r"llqr_structure='ekfac' with fsdp: Kronecker"),
]


def _ids(table):
    return [f"{i:03d}-" + "-".join(f"{k}={v}" for k, v in kwargs.items())[:60] for i, (kwargs, _) in enumerate(table)]


def test_table_size():
    assert len(BAD) >= 100, len(BAD)
    assert len(BAD_CLI) >= 15 and len(VALID) >= 10


@pytest.mark.parametrize("cls", [LLQRSAMTrainingArguments, LLQRSAMSeq2SeqTrainingArguments])
@pytest.mark.parametrize(("kwargs", "match"), BAD, ids=_ids(BAD))
def test_bad_configuration_rejected(tmp_path, cls, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        cls(output_dir=str(tmp_path), report_to="none", **kwargs)
    assert "\n" not in str(info.value)  # one line, so the CLI can print it as one


OUR_BAD = [(kwargs, match) for kwargs, match in BAD if set(kwargs) <= set(DEFAULTS)]


@pytest.mark.parametrize(("kwargs", "match"), OUR_BAD, ids=_ids(OUR_BAD))
def test_fields_changed_after_construction_are_refused_by_the_recheck(tmp_path, kwargs, match):
    """Issue 22 item 10: validation cannot be bypassed. Every bad value of our fields in the table, set on valid
    arguments after construction, is refused by `validate_llqrsam_args` (which the trainer runs when it is built
    and when `train()` starts) with the message construction gives."""
    args = LLQRSAMTrainingArguments(output_dir=str(tmp_path), report_to="none")
    validate_llqrsam_args(args, warn=False)
    for name, value in kwargs.items():
        setattr(args, name, value)
    with pytest.raises(ValueError, match=match):
        validate_llqrsam_args(args, warn=False)


def test_recheck_names_the_field_set_after_construction(tmp_path):
    args = LLQRSAMTrainingArguments(output_dir=str(tmp_path), report_to="none", sam_mode="sam", sam_rho=0.05)
    args.sam_rho = float("nan")
    with pytest.raises(ValueError, match=r"^Invalid sam_rho=nan\. Must be a finite float\.$"):
        validate_llqrsam_args(args, warn=False)
    args.sam_rho, args.llqr, args.llqr_update_until = 0.05, True, 0
    with pytest.raises(ValueError, match=r"^Invalid llqr_update_until=0\. Must be >= 1"):
        validate_llqrsam_args(args, warn=False)
    args.llqr_update_until, args.sam_mode = None, "gsam"  # a cross-field rule, not a range
    with pytest.raises(ValueError, match=r"Invalid llqr=True with sam_mode='gsam'"):
        validate_llqrsam_args(args, warn=False)


def test_recheck_warns_only_when_asked(tmp_path):
    args = LLQRSAMTrainingArguments(output_dir=str(tmp_path), report_to="none")
    args.fsam_beta = 0.5  # ignored under sam_mode='none'
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_llqrsam_args(args, warn=False)
    with pytest.warns(UserWarning, match=r"fsam_beta=0\.5 \(only used with sam_mode='fsam'"):
        validate_llqrsam_args(args)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # TRL's default
def test_recheck_of_the_dpo_config_refuses_llqr(tmp_path):
    trl = pytest.importorskip("hf_llqrsam.integrations.trl")
    config = trl.LLQRSAMDPOConfig(output_dir=str(tmp_path), report_to="none", sam_mode="sam")
    validate_llqrsam_args(config, warn=False)
    config.llqr = True
    with pytest.raises(ValueError, match=r"Invalid llqr=True with DPO: .* no labels"):
        validate_llqrsam_args(config, warn=False)


def test_the_table_covers_every_literal_and_float_flag():
    typos = {name for kwargs, _ in BAD for name, v in kwargs.items() if name in LITERALS and v not in LITERALS[name]}
    assert typos == set(LITERALS)
    for bad in (math.inf, math.nan):
        hit = {name for kwargs, _ in BAD for name, v in kwargs.items() if isinstance(v, float) and v is bad}
        assert hit == set(FLOATS), set(FLOATS) - hit
    assert len(LITERALS) == 22 and len(FLOATS) == 25  # 22: llqr_update_probe_scale; 25: bi_lora_lr


def test_every_number_has_a_range_rule():
    """A new numeric flag must get a range rule (or be declared unbounded on purpose)."""
    assert set(FLOATS) | set(INTS) == set(_RANGES) | _UNBOUNDED
    assert not set(_RANGES) & _UNBOUNDED


# ---------------------------------------------------------------------------------------------- the CLI

BAD_CLI: list[tuple[list[str], str]] = [
    (["--llqr", "--llqr_ema_schedule", "cosine"], r"llqr_ema_schedule_steps=None with llqr_ema_schedule='cosine'"),
    (["--llqr", "--llqr_update_interval_milestones", "15000:"], r"milestones='15000:'.*is not 'step:interval'"),
    (["--sam_mode", "sam", "--sam_rho", "1e400"], r"Invalid sam_rho=inf\. Must be a finite float"),
    (["--sam_rho", "inf"], r"Invalid sam_rho=inf\. Must be a finite float"),
    (["--fsam_sigma", "nan"], r"Invalid fsam_sigma=nan\. Must be a finite float"),
    (["--llqr_damping", "inf"], r"Invalid llqr_damping=inf\."),
    (["--llqr_min_diag", "1e400"], r"Invalid llqr_min_diag=inf\."),
    (["--fisher_sam_eta=-inf"], r"Invalid fisher_sam_eta=-inf\. Must be a finite float or None"),
    (["--sam_mode", "fsam", "--sam_accumulation", "micro"], r"sam_accumulation='micro' with sam_mode='fsam'"),
    (["--sam_mode", "gsam", "--sam_scope", "local"], r"sam_scope='local' with sam_mode='gsam'"),
    (["--sam_mode", "asam", "--sam_norm", "matrix"], r"sam_norm='matrix' with sam_mode='asam'"),
    (["--llqr", "--sam_mode", "gsam"], r"llqr=True with sam_mode='gsam'"),
    (["--llqr", "--sam_mode", "asam"], r"llqr_in_perturbation=True with sam_mode='asam'"),
    (["--llqr", "--no_llqr_on_update"], r"U used nowhere"),
    (["--fsam_beta", "1.0"], r"fsam_beta=1.0\. Must be in \[0, 1\)"),
    (["--sam_interval", "0"], r"sam_interval=0\. Must be >= 1"),
    (["--llqr_inner_lr", "0"], r"llqr_inner_lr=0.0\. Must be > 0"),
    (["--llqr_update_until", "-1"], r"llqr_update_until=-1\. Must be >= 1"),
    (["--llqr", "--llqr_update_until", "0"], r"llqr_update_until=0\. Must be >= 1"),
    (["--sam_mode", "sam", "--sam_rho", "0"], r"sam_rho=0.0\. Must be > 0"),
    (["--sam_mode", "sam", "--optim", "lomo"], r"optim='lomo'"),
    (["--sam_mode", "sam", "--ddp_static_graph", "true"], r"ddp_static_graph=True"),
    (["--sam_mode", "sam", "--deepspeed", "ds.json"], r"deepspeed='ds.json'"),
    (["--sam_mode", "looksam", "--sam_interval", "2"], r"sam_interval=2 with sam_mode='looksam'"),
    (["--past_fsam_overlap", "0.3"], r"past_fsam_overlap=0.3\. Must be 1 - 1/K"),
]


@pytest.mark.parametrize(("argv", "match"), BAD_CLI, ids=[" ".join(a)[:50] for a, _ in BAD_CLI])
def test_bad_cli_rejected(tmp_path, argv, match):
    parser = HfArgumentParser(LLQRSAMTrainingArguments)
    with pytest.raises(ValueError, match=match):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--report_to", "none", *argv])


@pytest.mark.parametrize(("argv", "match"), BAD_CLI, ids=[" ".join(a)[:50] for a, _ in BAD_CLI])
def test_parse_args_exits_2_with_one_line(tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit) as info:
        parse_args(LLQRSAMSeq2SeqTrainingArguments, ["--output_dir", str(tmp_path), "--report_to", "none", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: Invalid " in err
    assert re.search(match, err)


def test_cli_one_line_error_without_traceback(tmp_path):
    code = (
        "import sys; from hf_llqrsam.args import LLQRSAMTrainingArguments as A, parse_args; "
        "parse_args(A, sys.argv[1:])"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "--output_dir",
            str(tmp_path),
            "--report_to",
            "none",
            "--sam_mode",
            "sam",
            "--sam_rho",
            "1e400",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip() and "[transformers]" not in line]
    assert lines == ["-c: error: Invalid sam_rho=inf. Must be a finite float."], out.stderr
    assert "Traceback" not in out.stderr


def test_cli_errors_with_an_existing_parser(tmp_path, capsys):
    parser = HfArgumentParser(LLQRSAMTrainingArguments, prog="train.py")
    parser.set_defaults(sam_mode="fsam")
    with pytest.raises(SystemExit) as info, cli_errors(parser):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--sam_accumulation", "micro"])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("train.py: error: Invalid sam_accumulation='micro' with sam_mode='fsam'")
    (args,) = parse_args(parser, ["--output_dir", str(tmp_path), "--report_to", "none"])
    assert args.sam_mode == "fsam"


ARGPARSE_BAD: list[tuple[list[str], str]] = [
    (["--sam_mode", "sharp"], r"argument --sam_mode\S*: invalid choice: 'sharp'"),
    (["--sam_accumulation", "Window"], r"argument --sam_accumulation\S*: invalid choice: 'Window'"),
    (["--llqr_apply", "Update"], r"argument --llqr_apply\S*: invalid choice: 'Update'"),
    (["--sam_interval", "1.5"], r"argument --sam_interval\S*: invalid int value: '1.5'"),
    (["--llqr_inner_steps", "1.5"], r"argument --llqr_inner_steps\S*: invalid int value: '1.5'"),
    (["--llqr", "maybe"], r"argument --llqr\S*: .*maybe"),
    (["--sam_rho", "abc"], r"argument --sam_rho\S*: invalid float value: 'abc'"),
    (["--sam_rhoo", "0.1"], r"Some specified arguments are not used by the HfArgumentParser: \['--sam_rhoo', '0.1'\]"),
]


@pytest.mark.parametrize(("argv", "match"), ARGPARSE_BAD, ids=[" ".join(a) for a, _ in ARGPARSE_BAD])
def test_parse_args_shortens_argparse_errors_to_one_line(tmp_path, capsys, argv, match):
    """argparse's own errors (bad choice, bad int) would print the usage of every flag first; parse_args does not."""
    parser = HfArgumentParser(LLQRSAMTrainingArguments)
    with pytest.raises(SystemExit) as info:
        parse_args(parser, ["--output_dir", str(tmp_path), "--report_to", "none", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err and re.search(match, err), err
    assert "error" not in vars(parser)  # the parser is left as it was


def test_cli_errors_leaves_other_errors_alone():
    with pytest.raises(KeyError), cli_errors():
        raise KeyError("not an argument error")


# ---------------------------------------------------------------------------------------------- valid controls

VALID: list[dict] = [
    {},
    {"sam_mode": "sam"},
    {"sam_mode": "sam", "sam_rho": 1},  # an int is a fine float
    {"sam_mode": "sam", "sam_rho": np.float64(0.05), "sam_interval": np.int64(2)},  # numpy scalars too
    {"sam_mode": "sam", "sam_accumulation": "micro", "sam_scope": "local", "sam_norm": "matrix"},
    {"sam_mode": "asam", "sam_accumulation": "micro", "asam_eta": 0.0},
    {"sam_mode": "fsam", "fsam_beta": 0.0, "fsam_sigma": -0.5, "fsam_init": "first_grad"},
    {"sam_mode": "fisher_sam", "fisher_sam_form": "paper", "fisher_sam_eta": 2.0},
    {"sam_mode": "gsam", "gsam_alpha": 0.0, "sam_rho_schedule": "lr_proportional", "sam_rho_min": 0.1},
    {"sam_mode": "vasso", "vasso_theta": 1.0},
    {"sam_mode": "infosam", "infosam_variance": "ema", "infosam_alpha": 0.0},
    {"llqr": True},
    {"llqr": True, "sam_mode": "sam", "sam_norm": "matrix", "llqr_structure": "scalar"},
    {"llqr": True, "sam_mode": "sam", "sam_norm": "matrix", "llqr_structure": "kfac", "llqr_in_perturbation": False},
    {"llqr": True, "sam_mode": "fsam", "llqr_structure": "kfac", "llqr_on_update": False},
    {"llqr": True, "sam_mode": "asam", "llqr_in_perturbation": False},
    {"llqr": True, "sam_mode": "sam", "llqr_apply": "update", "optim": "sgd"},
    {"llqr": True, "llqr_divergence": "renyi", "llqr_renyi_alpha": 2.0, "llqr_update_until": 1, "llqr_chunk_size": 1},
    {"llqr": True, "llqr_ema_decay": 1.0, "llqr_inner_momentum": 0.0, "llqr_inner_steps": 0, "llqr_damping": 0.5},
    {"sam_mode": "sam", "fsdp": True},  # FSDP2, window mode
    {"sam_mode": "sam", "sam_accumulation": "micro", "fsdp": True},  # FSDP2, micro mode (every pass 2 syncs)
    {"sam_mode": "sam", "llqr": True, "fsdp": True, "fsdp_config": {"version": 2}},  # LLQR+SAM under FSDP2
    {"llqr": True, "llqr_structure": "scalar", "fsdp": True},
    {"deepspeed": None, "optim": "lomo", "ddp_static_graph": True},  # the stock path checks nothing
    {"llqr": True, "llqr_inner_solver": "cg", "llqr_cg_beta": "polak_ribiere", "llqr_structure": "psd_ekfac"},
    {"llqr": True, "llqr_inner_solver": "adam", "llqr_inner_lr_schedule": "cosine", "llqr_inner_lr_schedule_steps": 9},
    {
        "llqr": True,
        "llqr_ema_decay": 0.8,
        "llqr_ema_schedule": "cosine",
        "llqr_ema_schedule_value": 0.925,
        "llqr_ema_schedule_steps": 133 * 1100,
        "llqr_update_interval_milestones": "5865:10000",
    },
    {
        "llqr": True,
        "llqr_inner_solver": "sgd",
        "llqr_structure": "sym_kfac",
        "llqr_ema_schedule": "warmup",
        "llqr_ema_schedule_steps": 10,
        "llqr_update_interval_milestones": " 10:5 , 20:2 ",
    },
    {"sam_mode": "past_fsam", "past_fsam_overlap": 0.75, "fsam_beta": 0.5, "fsam_ema": "direction"},
    {"sam_mode": "past_fsam", "past_fsam_overlap": 2 / 3, "fsam_sigma": 0.5},
    {"sam_mode": "looksam", "looksam_interval": 1, "looksam_alpha": 0.0, "sam_norm": "layer_euclidean"},
    {"sam_mode": "wsam", "wsam_gamma": 0.0, "wsam_decouple": False, "sam_norm": "layer_matrix"},
    {"sam_mode": "fsam", "fsam_ema": "grad"},  # without U in the perturbation, grad and precond_grad agree
    {"llqr": True, "sam_mode": "fsam", "fsam_ema": "grad", "llqr_in_perturbation": False},
    {"llqr": True, "sam_mode": "past_fsam", "sam_norm": "layer_matrix", "fsam_ema": "direction"},
]


@pytest.mark.parametrize("kwargs", VALID, ids=[f"{i:02d}" for i in range(len(VALID))])
def test_valid_configuration_constructs_without_warning(tmp_path, kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = LLQRSAMTrainingArguments(output_dir=str(tmp_path), report_to="none", **kwargs)
    ours = [str(w.message) for w in caught if "hf_llqrsam" in str(w.message)]
    assert not ours
    validate_llqrsam_args(args, warn=False)  # the trainer's re-check accepts what construction accepted
    assert args.to_sam_config().mode == args.sam_mode
    assert (args.to_llqr_config() is None) == (not args.llqr)


# ---------------------------------------------------------------------------------------------- ignored flags

IGNORED: list[tuple[dict, list[str]]] = [
    (
        {"llqr": True, "llqr_inner_solver": "cg", "llqr_inner_lr": 0.01, "llqr_inner_momentum": 0.5},
        [
            "llqr_inner_lr=0.01 (llqr_inner_solver='cg' takes the line-search step on the unclipped U-gradient)",
            "llqr_inner_momentum=0.5 (only used with llqr_inner_solver='momentum')",
        ],
    ),
    (
        {"llqr": True, "llqr_cg_beta": "polak_ribiere", "llqr_ema_schedule_steps": 5, "llqr_inner_solver": "adam"},
        [
            "llqr_cg_beta='polak_ribiere' (only used with llqr_inner_solver='cg')",
            "llqr_ema_schedule_steps=5 (llqr_ema_schedule='constant')",
        ],
    ),
    ({"llqr_inner_solver": "adam"}, ["llqr_inner_solver='adam' (llqr=False)"]),
    ({"sam_mode": "sam", "fsam_beta": 0.5}, ["fsam_beta=0.5 (only used with sam_mode='fsam' or 'past_fsam')"]),
    (
        {"sam_mode": "sam", "looksam_alpha": 0.5, "past_fsam_overlap": 0.5, "wsam_decouple": False},
        [
            "looksam_alpha=0.5 (only used with sam_mode='looksam')",
            "past_fsam_overlap=0.5 (only used with sam_mode='past_fsam')",
            "wsam_decouple=False (only used with sam_mode='wsam')",
        ],
    ),
    ({"sam_mode": "wsam", "fsam_ema": "direction"}, ["fsam_ema='direction' (only used with sam_mode='fsam' or"]),
    ({"sam_rho": 0.2}, ["sam_rho=0.2 (sam_mode='none')"]),
    ({"llqr_damping": 0.1}, ["llqr_damping=0.1 (llqr=False)"]),
    (
        {"sam_mode": "vasso", "infosam_variance": "ema", "gsam_alpha": 0.1, "vasso_theta": 0.2},
        [
            "infosam_variance='ema' (only used with sam_mode='infosam')",
            "gsam_alpha=0.1 (only used with sam_mode='gsam')",
        ],
    ),
    (
        {"sam_mode": "sam", "sam_rho_min": 0.01},
        ["sam_rho_min=0.01 (only used with sam_rho_schedule='lr_proportional')"],
    ),
    (
        {"llqr": True, "llqr_in_perturbation": False},
        ["llqr_in_perturbation=False (sam_mode='none' has no perturbation)"],
    ),
    ({"llqr": True, "llqr_renyi_alpha": 0.3}, ["llqr_renyi_alpha=0.3 (only used with llqr_divergence='renyi')"]),
    (
        {"llqr": True, "llqr_divergence": "newton", "llqr_ngd_scaling": "mean"},
        ["llqr_ngd_scaling='mean' (only used with llqr_divergence='ngd')"],
    ),
    (
        {"llqr": True, "llqr_update_probe_scale": "none"},
        ["llqr_update_probe_scale='none' (only used with llqr_apply='update')"],
    ),
    (
        {"sam_accumulation": "micro", "sam_same_dropout": True, "fisher_sam_eta": 0.2, "llqr_structure": "kfac"},
        [
            "sam_accumulation='micro' (sam_mode='none')",
            "sam_same_dropout=True (sam_mode='none')",
            "fisher_sam_eta=0.2 (only used with sam_mode='fisher_sam')",
            "llqr_structure='kfac' (llqr=False)",
        ],
    ),
]


@pytest.mark.parametrize(("kwargs", "names"), IGNORED, ids=[f"{i:02d}" for i in range(len(IGNORED))])
def test_ignored_flags_get_one_warning_naming_all(tmp_path, kwargs, names):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LLQRSAMTrainingArguments(output_dir=str(tmp_path), report_to="none", **kwargs)
    ours = [w for w in caught if "hf_llqrsam" in str(w.message)]
    assert len(ours) == 1 and ours[0].category is UserWarning
    message = str(ours[0].message)
    assert all(name in message for name in names), message
    assert message.count("(") == len(names) + 1  # nothing else named: "(sam_mode=..., llqr=...)" plus one per flag
    assert ours[0].filename == __file__  # points at the caller, not at hf_llqrsam


def test_ignored_flag_warning_is_a_warning_not_an_error(tmp_path):
    with pytest.warns(UserWarning, match=r"no effect in this run.*fsam_beta=0.5"):
        args = LLQRSAMTrainingArguments(output_dir=str(tmp_path), report_to="none", sam_mode="sam", fsam_beta=0.5)
    assert args.fsam_beta == 0.5


def test_every_mode_hyperparameter_is_a_field():
    for spec in MODES.values():
        assert set(spec.hyperparameters) <= set(DEFAULTS), spec.name
