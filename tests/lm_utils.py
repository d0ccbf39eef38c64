"""Tiny causal LMs (GPT-2, Llama) built from configs, fixed token data, LoRA wrappers and a reference gradient."""

import warnings

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 23  # = len(tests.utils.tiny_tokenizer()): 3 specials + 20 number words
SEQ = 8


def tiny_gpt2(seed: int = 0, dropout: float = 0.0, cls: type = GPT2LMHeadModel) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    return cls(cfg)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def lm_dataset(n: int = 16, seed: int = 0) -> datasets.Dataset:
    """Fixed-length token rows; labels = input_ids with the first position ignored (-100), as a prompt mask would."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    labels = ids.clone()
    labels[:, 0] = -100
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()}).with_format("torch")


def lora(model, target_modules: list[str], modules_to_save: list[str] | None = None, seed: int = 0):
    """A LoRA-wrapped `model` (r=4) whose B factors start non-zero, so every adapter tensor has a gradient.

    Skips the calling test when peft is not installed (it comes with the `peft` extra)."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        init_lora_weights=False,
    )
    with warnings.catch_warnings():
        # peft 0.21 reads `is_gradient_checkpointing`, deprecated in transformers 5.24 (an error under pyproject's
        # filterwarnings); GPT-2's Conv1D makes peft switch fan_in_fan_out on, with a warning
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        warnings.filterwarnings("ignore", "fan_in_fan_out is set to False", UserWarning)
        return get_peft_model(model, config)


def shifted_grads(model, batch: dict, shift: bool = True) -> dict[str, torch.Tensor]:
    """The oracle g: mean cross-entropy of logits at t against labels at t + 1 (or t), by hand, in eval mode."""
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits, labels = model(**inputs).logits.float(), batch["labels"]
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: torch.zeros_like(p) if gr is None else gr for (n, p), gr in zip(named, grads, strict=True)}
