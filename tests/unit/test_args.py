"""The flags: native to HfArgumentParser, serialisable, and every bad value rejected naming the flag."""

import ast
import dataclasses
import inspect
import json
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import torch
from transformers import HfArgumentParser

from hf_llqrsam import LLQRSAMSeq2SeqTrainingArguments, LLQRSAMTrainer, LLQRSAMTrainingArguments
from hf_llqrsam.args import SAM_MODES, LLQRSAMFields, flags_markdown
from hf_llqrsam.compat import validate_setup_args
from hf_llqrsam.config import SAMConfig
from hf_llqrsam.llqr.config import LLQRConfig
from hf_llqrsam.modes import MODES, SAM_MODE_NAMES
from tests.utils import image_dataset, tiny_vit


@pytest.mark.parametrize("cls", [LLQRSAMTrainingArguments, LLQRSAMSeq2SeqTrainingArguments])
def test_parser_round_trip(tmp_path, cls):
    parser = HfArgumentParser(cls)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--sam_mode",
            "fsam",
            "--sam_rho",
            "0.07",
            "--fsam_beta",
            "0.8",
            "--llqr",
            "--llqr_structure",
            "kfac",
            "--no_llqr_warm_start",
            "--llqr_update_until",
            "40",
            "--report_to",
            "none",
        ]
    )
    assert (args.sam_mode, args.sam_rho, args.fsam_beta) == ("fsam", 0.07, 0.8)
    assert args.llqr and args.llqr_structure == "kfac" and not args.llqr_warm_start
    assert args.llqr_update_until == 40 and args.llqr_chunk_size is None
    as_json = json.loads(args.to_json_string())
    assert as_json["sam_mode"] == "fsam" and as_json["llqr_structure"] == "kfac"
    (again,) = parser.parse_dict(
        {
            k: v
            for k, v in as_json.items()
            if k in {f.name for f in __import__("dataclasses").fields(cls)} and not k.startswith("_")
        }
    )
    assert again.sam_rho == 0.07 and again.llqr_update_until == 40


def _pairs() -> list[tuple[type, type]]:
    """(stock class, ours) for the two argument classes and both TRL configs."""
    from transformers import Seq2SeqTrainingArguments, TrainingArguments

    pairs: list[tuple[type, type]] = [
        (TrainingArguments, LLQRSAMTrainingArguments),
        (Seq2SeqTrainingArguments, LLQRSAMSeq2SeqTrainingArguments),
    ]
    trl = pytest.importorskip("trl")
    from hf_llqrsam.integrations.trl import LLQRSAMDPOConfig, LLQRSAMSFTConfig

    return [*pairs, (trl.SFTConfig, LLQRSAMSFTConfig), (trl.DPOConfig, LLQRSAMDPOConfig)]


# TRL's configs default gradient_checkpointing=True, which transformers 5 warns about, on the stock class as on ours
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("index", range(4), ids=["TrainingArguments", "Seq2Seq", "SFTConfig", "DPOConfig"])
def test_positional_construction_means_what_it_means_on_the_stock_class(tmp_path, index):
    """Issue 22 item 1: `Ours("out")` is output_dir="out", as on the stock class (our fields are keyword-only)."""
    stock, ours = _pairs()[index]
    positional = [name for name, p in inspect.signature(stock).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    ours_positional = [
        name for name, p in inspect.signature(ours).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    assert ours_positional == positional  # the same positional slots, in the same order, and none of ours
    values = (str(tmp_path / "out"), 4, 2.0, 7, 0.01, "cosine")  # output_dir, batch size, epochs, max_steps, lr, ...
    assert positional[: len(values)] == [
        "output_dir",
        "per_device_train_batch_size",
        "num_train_epochs",
        "max_steps",
        "learning_rate",
        "lr_scheduler_type",
    ]
    kwargs = {"report_to": "none", "bf16": False}  # bf16: TRL's unset default needs a bf16 device
    expected, got = stock(*values, **kwargs), ours(*values, **kwargs)
    differ = [f.name for f in dataclasses.fields(stock) if getattr(expected, f.name) != getattr(got, f.name)]
    assert not differ
    assert got.output_dir == str(tmp_path / "out") and got.max_steps == 7 and got.sam_mode == "none"
    with pytest.raises(TypeError):  # one positional argument too many fails as on the stock class
        ours(*[getattr(expected, name) for name in positional], "sam")
    (parsed,) = HfArgumentParser(ours).parse_args_into_dataclasses(
        ["--sam_mode", "sam", "--output_dir", str(tmp_path / "x"), "--report_to", "none", "--bf16", "false"]
    )
    assert parsed.sam_mode == "sam" and parsed.output_dir == str(tmp_path / "x")


def test_help_renders_and_bad_choice_exits_2(tmp_path):
    code = "from transformers import HfArgumentParser; from hf_llqrsam import LLQRSAMTrainingArguments as A; "
    help_out = subprocess.run(
        [sys.executable, "-c", code + "HfArgumentParser(A).parse_args_into_dataclasses()", "--help"],
        capture_output=True,
        text=True,
    )
    assert help_out.returncode == 0 and "--sam_mode" in help_out.stdout and "--llqr_ema_decay" in help_out.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-c",
            code + "HfArgumentParser(A).parse_args_into_dataclasses()",
            "--output_dir",
            str(tmp_path),
            "--sam_mode",
            "sharp",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "sam_mode" in bad.stderr and "fsam" in bad.stderr


BAD = [
    ({"sam_mode": "sam", "sam_rho": 0.0}, r"sam_rho=0.0\. Must be > 0 when sam_mode"),
    ({"sam_interval": 0}, r"sam_interval=0\. Must be >= 1"),
    ({"sam_start_step": -1}, r"sam_start_step=-1\. Must be >= 0"),
    ({"sam_eps": 0.0}, r"sam_eps=0.0\. Must be > 0"),
    ({"fsam_beta": 1.0}, r"fsam_beta=1.0\. Must be in \[0, 1\)"),
    ({"asam_eta": -0.1}, r"asam_eta=-0.1\. Must be >= 0"),
    ({"fisher_sam_eta": 0.0}, r"fisher_sam_eta=0.0\. Must be > 0"),
    ({"gsam_alpha": -1.0}, r"gsam_alpha=-1.0\. Must be >= 0"),
    ({"vasso_theta": 0.0}, r"vasso_theta=0.0\. Must be in \(0, 1\]"),
    ({"infosam_alpha": 1.0}, r"infosam_alpha=1.0\. Must be in \[0, 1\)"),
    ({"infosam_damping": 0.0}, r"infosam_damping=0.0\. Must be > 0"),
    ({"sam_mode": "asam", "sam_norm": "matrix"}, r"sam_norm='matrix' with sam_mode='asam'"),
    ({"sam_mode": "fisher_sam", "sam_norm": "matrix"}, r"sam_norm='matrix' with sam_mode='fisher_sam'"),
    ({"sam_mode": "fsam", "sam_accumulation": "micro"}, r"sam_accumulation='micro' with sam_mode='fsam'"),
    ({"sam_mode": "infosam", "sam_accumulation": "micro"}, r"sam_accumulation='micro' with sam_mode='infosam'"),
    ({"sam_mode": "gsam", "sam_scope": "local"}, r"sam_scope='local' with sam_mode='gsam'"),
    ({"sam_rho_schedule": "lr_proportional", "sam_rho_min": 0.5}, r"sam_rho_min=0.5\. Must be <= sam_rho"),
    ({"llqr_update_interval": 0}, r"llqr_update_interval=0\. Must be >= 1"),
    ({"llqr_batch_size": 0}, r"llqr_batch_size=0\. Must be >= 1"),
    ({"llqr_inner_steps": -1}, r"llqr_inner_steps=-1\. Must be >= 0"),
    ({"llqr_inner_momentum": 1.0}, r"llqr_inner_momentum=1.0\. Must be in \[0, 1\)"),
    ({"llqr_clip_norm": 0.0}, r"llqr_clip_norm=0.0\. Must be > 0"),
    ({"llqr_ema_decay": 1.5}, r"llqr_ema_decay=1.5\. Must be in \[0, 1\]"),
    ({"llqr_ema_decay": -0.1}, r"llqr_ema_decay=-0.1\. Must be in \[0, 1\]"),
    ({"llqr_damping": -1.0}, r"llqr_damping=-1.0\. Must be >= 0"),
    ({"llqr_min_diag": 0.0}, r"llqr_min_diag=0.0\. Must be > 0"),
    ({"llqr_renyi_alpha": 1.0}, r"llqr_renyi_alpha=1.0\. Must be > 0 and != 1"),
    ({"llqr_identity_scaling": 0.0}, r"llqr_identity_scaling=0.0\. Must be > 0"),
    ({"llqr_chunk_size": 0}, r"llqr_chunk_size=0\. Must be >= 1"),
    ({"llqr": True, "sam_mode": "gsam"}, r"llqr=True with sam_mode='gsam'"),
    ({"llqr": True, "sam_mode": "fisher_sam"}, r"llqr=True with sam_mode='fisher_sam'"),
    ({"llqr": True, "sam_mode": "asam"}, r"llqr_in_perturbation=True with sam_mode='asam'"),
    ({"llqr": True, "llqr_on_update": False}, r"U used nowhere"),
    (
        {"llqr": True, "llqr_apply": "update", "llqr_on_update": False, "sam_mode": "sam"},
        r"llqr_apply='update'\. Requires llqr_on_update",
    ),
    (
        {"llqr": True, "sam_mode": "sam", "sam_norm": "matrix", "llqr_structure": "kfac"},
        r"sam_norm='matrix' with llqr_structure='kfac'",
    ),
    ({"sam_mode": "sam", "optim": "lomo"}, r"optim='lomo'"),
    (
        {"sam_mode": "sam", "optim": "galore_adamw_layerwise", "optim_target_modules": ["attn"]},
        r"optim='galore_adamw_layerwise'",
    ),
    ({"sam_mode": "sam", "ddp_static_graph": True}, r"ddp_static_graph=True"),
]


@pytest.mark.parametrize(("overrides", "match"), BAD, ids=[m.split("\\")[0][:40] for _, m in BAD])
def test_bad_configuration_rejected_naming_the_flag(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        LLQRSAMTrainingArguments(output_dir=str(tmp_path), report_to="none", **overrides)


def test_unknown_sam_mode_rejected_in_python(tmp_path):
    with pytest.raises(ValueError, match=r"Invalid sam_mode='sharp'\. Must be one of 'none', 'sam', 'asam'"):
        LLQRSAMTrainingArguments(output_dir=str(tmp_path), report_to="none", sam_mode="sharp")


def _namespace(tmp_path, **overrides):
    args = LLQRSAMTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    return types.SimpleNamespace(**{**vars(args), **overrides})


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"sam_mode": "sam", "deepspeed": "ds.json"}, ValueError, "deepspeed='ds.json' with sam_mode/llqr"),
        ({"llqr": True, "parallelism_config": object()}, ValueError, "parallelism_config"),
        ({"sam_mode": "sam", "fsdp": "full_shard", "fsdp_config": {"version": 2}}, ValueError, "use_cpu=True"),
        (
            {"sam_mode": "sam", "fsdp": "full_shard", "fsdp_config": {"version": 1}, "use_cpu": False},
            ValueError,
            "FSDP1",
        ),
        (
            {
                "sam_mode": "sam",
                "llqr": True,
                "llqr_structure": "sep_ekfac",
                "fsdp": "full_shard",
                "fsdp_config": {},
                "use_cpu": False,
            },
            ValueError,
            "llqr_structure='sep_ekfac' with fsdp: Kronecker",
        ),
        (
            {"sam_mode": "sam", "sam_scope": "local", "fsdp": "full_shard", "fsdp_config": {}, "use_cpu": False},
            ValueError,
            "sam_scope='local' with fsdp",
        ),
    ],
)
def test_unsupported_setup_rejected(tmp_path, overrides, error, match):
    """Setups TrainingArguments itself cannot build here (no DeepSpeed, no GPU) are checked on a copy."""
    with pytest.raises(error, match=match):
        validate_setup_args(_namespace(tmp_path, **overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        {"sam_mode": "sam", "llqr": True},
        {"sam_mode": "fsam", "llqr": True, "llqr_structure": "scalar", "llqr_apply": "update", "optim": "sgd"},
        {"sam_mode": "asam", "sam_accumulation": "micro"},
        {"sam_mode": "infosam", "gradient_accumulation_steps": 2},
    ],
)
def test_fsdp2_setups_accepted(tmp_path, overrides):
    """What the FSDP2 CPU tests prove (tests/distributed/test_fsdp2_cpu.py) passes the argument checks on GPUs."""
    args = _namespace(tmp_path, fsdp="full_shard", fsdp_config={"version": 2}, use_cpu=False, **overrides)
    validate_setup_args(args)


def test_fsdp_from_the_accelerate_config_is_checked_too(tmp_path):
    """`accelerate launch --config_file fsdp2.yaml` gives the Trainer an FSDP plugin without any --fsdp argument."""
    from hf_llqrsam.compat import validate_fsdp_plugin

    v1, v2 = types.SimpleNamespace(fsdp_version=1), types.SimpleNamespace(fsdp_version=2)
    with pytest.raises(ValueError, match=r"fsdp_version=1 in the Accelerate config .* FSDP1 is not supported"):
        validate_fsdp_plugin(_namespace(tmp_path, sam_mode="sam"), v1)
    with pytest.raises(ValueError, match=r"sam_scope='local' under Accelerate's FSDP2"):
        validate_fsdp_plugin(_namespace(tmp_path, sam_mode="sam", sam_scope="local"), v2)
    validate_fsdp_plugin(_namespace(tmp_path, sam_mode="sam", llqr=True), v2)
    validate_fsdp_plugin(_namespace(tmp_path, sam_mode="sam", sam_scope="local"), None)
    validate_fsdp_plugin(_namespace(tmp_path, sam_scope="local"), v1)  # the stock path checks nothing


def test_setup_checks_are_off_on_the_stock_path(tmp_path):
    validate_setup_args(_namespace(tmp_path, deepspeed="ds.json", ddp_static_graph=True))


def test_trainer_rejects_plain_training_arguments(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="LLQRSAMTrainingArguments"):
        LLQRSAMTrainer(model=tiny_vit(), args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda m: m.to(torch.bfloat16), "half-precision trainable parameters"),
        (lambda m: setattr(m.config, "problem_type", "regression"), "problem_type='regression'"),
        (lambda m: setattr(m.config, "_attn_implementation", "flash_attention_2"), "flash attention"),
    ],
)
def test_llqr_rejects_unsupported_models(tmp_path, mutate, match):
    model = tiny_vit()
    mutate(model)
    args = LLQRSAMTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, llqr=True)
    with pytest.raises(ValueError, match=match):
        LLQRSAMTrainer(model=model, args=args, train_dataset=image_dataset(8))


def test_llqr_rejects_iterable_dataset(tmp_path):
    args = LLQRSAMTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, llqr=True, max_steps=1)
    with pytest.raises(ValueError, match="IterableDataset"):
        LLQRSAMTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(8).to_iterable_dataset())


# ---------------------------------------------------------------------------------------------- the config builders


def _args(tmp_path, **overrides):
    return LLQRSAMTrainingArguments(output_dir=str(tmp_path), report_to="none", **overrides)


def test_sam_config_defaults_equal_the_cli_defaults(tmp_path):
    """The two sources of defaults cannot drift: SAMConfig() is the CLI defaults' config (mode aside)."""
    built = _args(tmp_path, sam_mode="sam").to_sam_config()
    assert dataclasses.replace(built, mode=SAMConfig().mode) == SAMConfig()
    assert dataclasses.replace(_args(tmp_path).to_sam_config(), mode=SAMConfig().mode) == SAMConfig()


def test_llqr_config_defaults_equal_the_cli_defaults(tmp_path):
    """LLQRConfig() is the CLI defaults' config, apart from the fields that come from TrainingArguments."""
    from_training_args = {"label_smoothing"}
    built = _args(tmp_path, llqr=True, label_smoothing_factor=0.25).to_llqr_config()
    assert built is not None and built.label_smoothing == 0.25
    assert dataclasses.replace(built, **{k: getattr(LLQRConfig(), k) for k in from_training_args}) == LLQRConfig()
    assert _args(tmp_path).to_llqr_config() is None


def test_config_types_equal_the_cli_types():
    """The configs' Literal types are the CLI fields' types, so the allowed values cannot drift either."""
    cli = typing.get_type_hints(LLQRSAMFields)
    for name, hint in typing.get_type_hints(SAMConfig).items():
        if name == "seed":  # TrainingArguments.seed
            continue
        source = f"sam_{name}" if f"sam_{name}" in cli else name
        expected = float if name == "fisher_sam_eta" else cli[source]  # resolved: never None in the config
        assert hint == expected, name
    for name, hint in typing.get_type_hints(LLQRConfig).items():
        if name != "label_smoothing":
            assert hint == cli[f"llqr_{name}"], name


class _Recorder:
    """Stands in for the arguments: answers every attribute with a distinct sentinel and records the reads."""

    def __init__(self, **fixed):
        self.fixed, self.read = fixed, []

    def __getattr__(self, name):
        self.read.append(name)
        return self.fixed.get(name, f"<{name}>")


def test_every_field_is_consumed_by_exactly_one_builder():
    names = [f.name for f in dataclasses.fields(LLQRSAMFields)]
    sam, llqr = _Recorder(fisher_sam_eta=0.3), _Recorder(llqr=True)
    LLQRSAMFields.to_sam_config(sam)  # type: ignore[arg-type]
    LLQRSAMFields.to_llqr_config(llqr)  # type: ignore[arg-type]
    read_sam, read_llqr = set(sam.read) & set(names), set(llqr.read) & set(names) - {"llqr"}
    assert not read_sam & read_llqr
    assert read_sam | read_llqr | {"llqr"} == set(names), set(names) - read_sam - read_llqr
    assert set(llqr.read) - set(names) == {"label_smoothing_factor"}


def test_builders_map_each_field_to_its_namesake():
    """`sam_x` -> `x` (or the per-mode name) in SAMConfig, `llqr_x` -> `x` in LLQRConfig, values passed through."""
    sam = LLQRSAMFields.to_sam_config(_Recorder(fisher_sam_eta=0.3))  # type: ignore[arg-type]
    for f in dataclasses.fields(SAMConfig):
        cli = "sam_mode" if f.name == "mode" else (f"sam_{f.name}" if f.name in _SAM_PREFIXED else f.name)
        assert getattr(sam, f.name) == (0.3 if f.name == "fisher_sam_eta" else f"<{cli}>"), f.name
    llqr = LLQRSAMFields.to_llqr_config(_Recorder(llqr=True))  # type: ignore[arg-type]
    assert llqr is not None
    for f in dataclasses.fields(LLQRConfig):
        cli = "label_smoothing_factor" if f.name == "label_smoothing" else f"llqr_{f.name}"
        assert getattr(llqr, f.name) == f"<{cli}>", f.name


_SAM_PREFIXED = {
    "rho",
    "rho_schedule",
    "rho_min",
    "start_step",
    "end_step",
    "interval",
    "norm",
    "eps",
    "accumulation",
    "scope",
    "bn_stats",
    "same_dropout",
}


@pytest.mark.parametrize(("form", "eta"), [("reference", 0.1), ("paper", 1.0)])
def test_fisher_sam_eta_is_resolved(tmp_path, form, eta):
    args = _args(tmp_path, sam_mode="fisher_sam", fisher_sam_form=form)
    assert args.to_sam_config().fisher_sam_eta == eta
    assert (
        _args(tmp_path, sam_mode="fisher_sam", fisher_sam_form=form, fisher_sam_eta=0.5).to_sam_config().fisher_sam_eta
        == 0.5
    )


def test_sam_modes_come_from_the_mode_records():
    assert SAM_MODES == SAM_MODE_NAMES == ("none", *MODES)
    assert typing.get_args(typing.get_type_hints(LLQRSAMFields)["sam_mode"]) == SAM_MODE_NAMES
    assert typing.get_args(typing.get_type_hints(SAMConfig)["mode"]) == SAM_MODE_NAMES


def test_docstring_lists_every_field():
    doc = LLQRSAMFields.__doc__ or ""
    missing = [f.name for f in dataclasses.fields(LLQRSAMFields) if f"    {f.name} (`" not in doc]
    assert not missing
    assert all(f.metadata.get("help") for f in dataclasses.fields(LLQRSAMFields))


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_help_docstring_and_flag_reference_read_the_one_source(monkeypatch):
    """Issue 18: a flag's description lives in its field's `metadata["help"]` only; the CLI `--help`, the class
    docstring and the docs' flag page (`flags_markdown`) all carry it, word for word."""
    monkeypatch.setenv("COLUMNS", "100000")  # argparse wraps help at the terminal width (and may split at hyphens)
    cli = _flat(HfArgumentParser(LLQRSAMTrainingArguments).format_help())
    doc, markdown = _flat(LLQRSAMFields.__doc__ or ""), _flat(flags_markdown())
    hints = typing.get_type_hints(LLQRSAMFields)
    for f in dataclasses.fields(LLQRSAMFields):
        text = _flat(f.metadata["help"])
        assert f"--{f.name} " in cli and text in cli, f.name
        shown = json.dumps(f.default) if isinstance(f.default, str) else repr(f.default)
        default = "" if f.default is None else f", defaults to `{shown}`"
        assert f"{f.name} (`" in doc and f"*optional*{default}): {text}" in doc, f.name
        assert f"- **`--{f.name}`** (" in markdown and f"): {text}" in markdown, f.name
        if typing.get_origin(hints[f.name]) is typing.Literal:  # the page lists the allowed values
            line = next(x for x in flags_markdown().splitlines() if x.startswith(f"- **`--{f.name}`**"))
            assert all(repr(v) in line for v in typing.get_args(hints[f.name])), f.name
    # the hand-written copy is gone: the class has no docstring literal, its __doc__ is generated
    tree = ast.parse(Path(inspect.getsourcefile(LLQRSAMFields)).read_text())
    (cls,) = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "LLQRSAMFields"]
    assert ast.get_docstring(cls) is None


def test_configs_stay_pure():
    """config.py and llqr/config.py import nothing but the standard library (no transformers, no torch)."""
    for path in ("hf_llqrsam/config.py", "hf_llqrsam/llqr/config.py"):
        source = (Path(__file__).parents[2] / path).read_text()
        imports = {
            line.split()[1].split(".")[0]
            for line in source.splitlines()
            if line.startswith(("import ", "from ")) and not line.startswith("from .")
        }
        assert imports <= {"dataclasses", "typing"}, (path, imports)


def test_the_typed_configs_do_not_repeat_the_flag_descriptions():
    """One source per flag description (issue 18): SAMConfig and LLQRConfig name the flags their fields mirror and
    carry no second copy of the help texts."""
    from hf_llqrsam.config import SAMConfig
    from hf_llqrsam.llqr import LLQRConfig

    helps = [f.metadata.get("help", "") for f in dataclasses.fields(LLQRSAMFields)]
    for cls in (SAMConfig, LLQRConfig):
        doc = cls.__doc__ or ""
        assert "Args:" not in doc and "docs/reference/flags.md" in doc
        assert not [h for h in helps if len(h) > 40 and h[:40] in doc]
