"""Integrations with trainer libraries built on [`~transformers.Trainer`].

Each submodule imports its library on import and raises an `ImportError` that says how to install it when the
library is missing; importing `hf_llqrsam.integrations` itself imports nothing.

- [`hf_llqrsam.integrations.trl`]: `LLQRSAMSFTConfig` / `LLQRSAMSFTTrainer` (TRL's `SFTTrainer`) and
  `LLQRSAMDPOConfig` / `LLQRSAMDPOTrainer` (TRL's `DPOTrainer`, SAM only); `pip install "hf-llqrsam[trl]"`.
"""

__all__: list[str] = []
