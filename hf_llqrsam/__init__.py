"""hf_llqrsam: LLQR+SAM and the SAM family as a Hugging Face Trainer integration.

The top-level names are loaded lazily (module `__getattr__`, PEP 562): `import hf_llqrsam.sam` or
`import hf_llqrsam.llqr` costs torch only, and transformers is imported the first time a Trainer or an
arguments class is asked for.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("hf-llqrsam")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

# public name -> submodule that defines it
_EXPORTS = {
    "LLQRSAMSeq2SeqTrainingArguments": "args",
    "LLQRSAMTrainingArguments": "args",
    "LLQRSAMFields": "args",
    "SAM": "api",
    "SAMEngine": "engine",
    "SAMConfig": "config",
    "LLQRConfig": "llqr",
    "LLQRPreconditioner": "llqr",
    "curvature_problem": "llqr",
    "MODES": "modes",
    "ModeSpec": "modes",
    "IdentityPreconditioner": "sam",
    "Preconditioner": "sam",
    "SAMState": "sam",
    "compute_perturbation": "sam",
    "LLQRSAMSeq2SeqTrainer": "trainer",
    "LLQRSAMTrainer": "trainer",
    "LLQRSAMTrainerMixin": "trainer",
}

__all__ = [
    "IdentityPreconditioner",
    "LLQRConfig",
    "LLQRPreconditioner",
    "LLQRSAMFields",
    "LLQRSAMSeq2SeqTrainer",
    "LLQRSAMSeq2SeqTrainingArguments",
    "LLQRSAMTrainer",
    "LLQRSAMTrainerMixin",
    "LLQRSAMTrainingArguments",
    "MODES",
    "ModeSpec",
    "Preconditioner",
    "SAM",
    "SAMConfig",
    "SAMEngine",
    "SAMState",
    "compute_perturbation",
    "curvature_problem",
    "__version__",
]

if TYPE_CHECKING:
    from .api import SAM
    from .args import LLQRSAMFields, LLQRSAMSeq2SeqTrainingArguments, LLQRSAMTrainingArguments
    from .config import SAMConfig
    from .engine import SAMEngine
    from .llqr import LLQRConfig, LLQRPreconditioner, curvature_problem
    from .modes import MODES, ModeSpec
    from .sam import IdentityPreconditioner, Preconditioner, SAMState, compute_perturbation
    from .trainer import LLQRSAMSeq2SeqTrainer, LLQRSAMTrainer, LLQRSAMTrainerMixin


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_llqrsam' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
