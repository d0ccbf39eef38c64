"""Canary: every private transformers/accelerate API hf_llqrsam still uses, pinned by name and signature.

An upstream rename or signature change fails here, loudly, instead of silently dropping the SAM/LLQR state (a
renamed `_save_optimizer_and_scheduler` would simply never be called). Studied on transformers 5.23–5.24 and
accelerate 1.15 (`docs/integration.md` §2, §9, §13).
"""

import ast
import inspect
import pathlib

import pytest
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer

import hf_llqrsam

PACKAGE = pathlib.Path(hf_llqrsam.__file__).parent

# Trainer private methods overridden or called, with the parameter names we rely on.
PINNED_TRAINER = {
    "_save_optimizer_and_scheduler": ["self", "output_dir"],  # overridden: writes llqrsam_state.pt beside it
    "_load_optimizer_and_scheduler": ["self", "checkpoint"],  # overridden: reads it on resume
    "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],  # overridden: #43701 workaround
    "_remove_unused_columns": ["self", "dataset", "description"],  # the curvature batch's column filtering
    "_get_collator_with_removed_columns": ["self", "data_collator", "description"],
    "_prepare_inputs": ["self", "inputs"],  # the curvature batch onto the device
    "_hp_search_setup": ["self", "trial"],  # overridden: a trial's values reach the SAM/LLQR configs
}

# Call sites inside Trainer that must still reach the overrides (method -> the private calls in its body).
CALLERS = {
    "_save_checkpoint": ["self._save_optimizer_and_scheduler("],
    "_prepare_for_training": ["self._load_optimizer_and_scheduler(", "self._load_from_checkpoint("],
    "train": ["self._load_from_checkpoint(", "self._hp_search_setup("],
}


@pytest.mark.parametrize("name", sorted(PINNED_TRAINER))
def test_pinned_trainer_method_exists_with_its_signature(name):
    method = getattr(Trainer, name, None)
    assert method is not None, f"transformers.Trainer.{name} is gone: hf_llqrsam's override would be dead code"
    assert list(inspect.signature(method).parameters) == PINNED_TRAINER[name]


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_trainer_still_calls_the_overridden_hooks(caller):
    source = inspect.getsource(getattr(Trainer, caller))
    for call in CALLERS[caller]:
        assert call in source, f"Trainer.{caller} no longer calls {call}: SAM/LLQR state would not be saved/loaded"


def test_pinned_accelerate_and_torch_attributes():
    assert isinstance(inspect.getattr_static(Accelerator, "sync_gradients"), property)
    assert "scaler" in inspect.signature(AcceleratedOptimizer.__init__).parameters
    assert "require_backward_grad_sync" in inspect.getsource(DistributedDataParallel._pre_forward)


def _private_trainer_uses(path: pathlib.Path) -> set[str]:
    """Names `_x` used as `self._x` or `super()._x` in a module, that are attributes of `transformers.Trainer`."""
    used = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            is_self = isinstance(owner, ast.Name) and owner.id == "self"
            is_super = isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super"
            if (is_self or is_super) and hasattr(Trainer, node.attr):
                used.add(node.attr)
    return used


def test_every_private_trainer_api_used_is_pinned():
    used = set().union(*(_private_trainer_uses(p) for p in PACKAGE.rglob("*.py")))
    assert used, "the scan found nothing: it would not notice a new private use either"
    assert used <= set(PINNED_TRAINER), f"unpinned private Trainer APIs: {sorted(used - set(PINNED_TRAINER))}"


def test_the_scan_sees_a_private_use(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("class T:\n    def f(self):\n        return self._get_train_sampler()\n")
    assert _private_trainer_uses(probe) == {"_get_train_sampler"}
