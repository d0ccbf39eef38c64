"""The unit tests mirror the package: `hf_llqrsam/<path>/<m>.py` is tested in `tests/unit/<path>/test_<m>.py`, or in
the one file named below that exercises it through a larger path (and imports it); every other unit test file is a
named cross-module topic."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE, UNIT = ROOT / "hf_llqrsam", ROOT / "tests" / "unit"

# module (relative to hf_llqrsam/) -> the test file that covers it through a larger path
TESTED_ELSEWHERE = {
    "api.py": "tests/integration/test_api.py",
    "causal.py": "tests/integration/test_shift_labels.py",
    "compat.py": "tests/unit/test_launch.py",
    "config.py": "tests/unit/test_sam.py",
    "data.py": "tests/integration/test_llqr_trainer.py",
    "distributed.py": "tests/distributed/workers/sam_fsdp2.py",
    "schedules.py": "tests/unit/test_sam_reference_parity.py",
    "step.py": "tests/unit/test_modes.py",
    "trainer.py": "tests/integration/test_trainer_equivalence.py",
    "trainer_support.py": "tests/integration/test_shift_labels.py",
    "integrations/trl.py": "tests/integration/test_trl.py",
    "llqr/config.py": "tests/unit/test_args.py",
    "llqr/layout.py": "tests/unit/llqr/test_structures.py",
    "llqr/refresh.py": "tests/unit/llqr/test_preconditioner.py",
    "llqr/registry.py": "tests/unit/llqr/test_structures.py",
}
# unit test files about a topic that spans modules
TOPICS = {
    "test_docs.py",
    "test_launch.py",
    "test_layout.py",
    "test_private_api.py",
    "test_sam_reference_parity.py",
    "test_validation.py",
    "llqr/test_fast_refresh.py",
    "llqr/test_hf_smoke.py",
    "llqr/test_layering.py",
    "llqr/test_riccati.py",
}


def _modules() -> list[str]:
    return sorted(
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    )


def _mirror(module: str) -> pathlib.Path:
    path = pathlib.PurePosixPath(module)
    return UNIT / path.parent / f"test_{path.name}"


def _imports(test: pathlib.Path, module: str) -> bool:
    """Whether `test` imports `module`: by its dotted name, or a name the package exports from it."""
    import hf_llqrsam

    text = test.read_text(encoding="utf-8")
    dotted = module[: -len(".py")].replace("/", ".")
    exported = [name for name, source in hf_llqrsam._EXPORTS.items() if source == dotted]
    return f"hf_llqrsam.{dotted}" in text or any(f"import {n}" in text or f" {n}," in text for n in exported)


def test_every_module_has_its_unit_test_or_names_the_test_that_covers_it():
    missing = []
    for module in _modules():
        if _mirror(module).is_file():
            continue
        elsewhere = TESTED_ELSEWHERE.get(module)
        if elsewhere is None or not _imports(ROOT / elsewhere, module):
            missing.append(module)
    assert not missing, (
        f"modules without tests/unit/<path>/test_<module>.py or a covering test that imports them: {missing}"
    )


def test_every_unit_test_file_mirrors_a_module_or_is_a_topic():
    modules = set(_modules())
    stray = []
    for test in sorted(UNIT.rglob("test_*.py")):
        rel = test.relative_to(UNIT)
        module = str(rel.parent / rel.name[len("test_") :]) if rel.parent != pathlib.Path(".") else rel.name[5:]
        if module not in modules and str(rel) not in TOPICS:
            stray.append(str(rel))
    assert not stray, f"unit test files that mirror no module and are no named topic: {stray}"


def test_the_tables_name_real_files():
    assert all((ROOT / path).is_file() for path in TESTED_ELSEWHERE.values())
    assert all((UNIT / topic).is_file() for topic in TOPICS)
    assert not set(TESTED_ELSEWHERE) - set(_modules())  # no entry for a module that is gone
