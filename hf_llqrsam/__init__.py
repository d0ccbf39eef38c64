"""hf_llqrsam: LLQR+SAM and the SAM family as a Hugging Face Trainer integration."""

from importlib.metadata import PackageNotFoundError, version

from .args import LLQRSAMSeq2SeqTrainingArguments, LLQRSAMTrainingArguments
from .config import SAMConfig
from .llqr import LLQRConfig, LLQRPreconditioner, curvature_problem
from .sam import IdentityPreconditioner, Preconditioner, SAMState, compute_perturbation
from .trainer import LLQRSAMSeq2SeqTrainer, LLQRSAMTrainer, LLQRSAMTrainerMixin

try:
    __version__ = version("hf-llqrsam")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "LLQRConfig",
    "LLQRPreconditioner",
    "curvature_problem",
    "IdentityPreconditioner",
    "Preconditioner",
    "SAMState",
    "compute_perturbation",
    "LLQRSAMSeq2SeqTrainer",
    "LLQRSAMSeq2SeqTrainingArguments",
    "LLQRSAMTrainer",
    "LLQRSAMTrainerMixin",
    "LLQRSAMTrainingArguments",
    "SAMConfig",
    "__version__",
]
