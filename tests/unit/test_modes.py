"""The mode records: one per SAM mode, consistent with the flags and the math (the table is checked in test_docs)."""

import subprocess
import sys
import typing

import pytest

from hf_llqrsam.args import LLQRSAMFields
from hf_llqrsam.modes import MODES, SAM_MODE_NAMES


def test_every_mode_hyperparameter_is_a_flag_of_that_mode():
    flags = set(typing.get_type_hints(LLQRSAMFields))
    for spec in MODES.values():
        assert set(spec.hyperparameters) <= flags, spec.name
        assert all(h.startswith(spec.name + "_") for h in spec.hyperparameters), spec.name
    owned = [h for spec in MODES.values() for h in spec.hyperparameters]
    prefixes = {"asam", "fsam", "fisher", "gsam", "vasso", "infosam", "past", "looksam", "wsam", "flat", "bi"}
    per_mode = {f for f in flags if f.split("_")[0] in prefixes}
    assert sorted(owned) == sorted(per_mode)  # every per-mode flag has exactly one owner
    for spec in MODES.values():  # a borrowed flag is another mode's own flag
        assert set(spec.borrows) <= set(owned) - set(spec.hyperparameters), spec.name


@pytest.mark.parametrize("name", list(MODES))
def test_record_is_consistent(name):
    spec = MODES[name]
    assert spec.name == name and name in SAM_MODE_NAMES
    if spec.descent != "plain" or spec.state or spec.passes != "two":
        assert spec.window_only  # they need the window gradient, once per optimizer step
    if spec.descent in ("gsam", "looksam", "wsam") or spec.passes == "one":
        assert spec.global_only  # the clean g (or the stored g̃) must be in the all-reduced units of the descent
    if spec.llqr_geometry:
        assert spec.geometry == "preconditioner"  # C = U replaces C = I, nothing else
    if spec.own_normaliser:  # ASAM, Fisher SAM; Flat-LoRA and Bi-LoRA build no ε = ρ·Cv/ν at all
        assert spec.geometry in ("asam", "fisher") or spec.acts_on_lora


def test_math_modules_import_without_transformers():
    """`import hf_llqrsam.llqr` used to take 8.5 s and import transformers and datasets; it needs torch only."""
    code = (
        "import sys, hf_llqrsam, hf_llqrsam.llqr, hf_llqrsam.sam, hf_llqrsam.modes, hf_llqrsam.step, "
        "hf_llqrsam.schedules, hf_llqrsam.config; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'datasets', 'accelerate')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lazy_top_level_names_resolve():
    import hf_llqrsam

    assert hf_llqrsam.LLQRSAMTrainer.__name__ == "LLQRSAMTrainer"
    assert all(getattr(hf_llqrsam, name) is not None for name in hf_llqrsam.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hf_llqrsam.nope  # noqa: B018
