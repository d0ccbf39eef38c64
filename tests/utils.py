"""Shared test helpers: tiny models built from configs, fixed data, and a trainer factory."""

import os
import subprocess
import sys

import datasets
import torch
from torch.utils.data import SequentialSampler
from transformers import ViTConfig, ViTForImageClassification

from hf_llqrsam import LLQRSAMTrainer, LLQRSAMTrainingArguments

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_vit(seed: int = 0, dropout: float = 0.0, num_labels: int = 3) -> ViTForImageClassification:
    torch.manual_seed(seed)
    cfg = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return ViTForImageClassification(cfg)


def image_dataset(n: int = 16, seed: int = 1, num_labels: int = 3) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, num_labels, (n,), generator=g)
    return datasets.Dataset.from_dict({"pixel_values": x.tolist(), "labels": y.tolist()}).with_format("torch")


def batches(ds: datasets.Dataset, bs: int) -> list[dict]:
    return [
        {"pixel_values": ds[i : i + bs]["pixel_values"], "labels": ds[i : i + bs]["labels"]}
        for i in range(0, len(ds), bs)
    ]


class SequentialTrainer(LLQRSAMTrainer):
    """Visits the training set in order, so a hand-written loop can see the same batches."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset or self.train_dataset)


def make_args(tmp_path, **overrides) -> LLQRSAMTrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        per_device_train_batch_size=4,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        max_steps=3,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return LLQRSAMTrainingArguments(**kwargs)


def params_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def run_torchrun(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Launch `script` on 2 CPU processes with torchrun (gloo); raises with the workers' output on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


GERMAN = ["eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun", "zehn"]
ENGLISH = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
WORDS = GERMAN + ENGLISH


def tiny_tokenizer():
    """A word-level fast tokenizer over a few number words, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_marian(tokenizer, seed: int = 0, dropout: float = 0.0):
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(seed)
    cfg = MarianConfig(
        vocab_size=len(tokenizer),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        dropout=dropout,
        attention_dropout=dropout,
        activation_dropout=dropout,
        max_length=12,
        num_beams=1,
    )
    return MarianMTModel(cfg)


def translation_dataset(tokenizer, n: int = 16, seed: int = 0) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        k = int(torch.randint(1, 4, (1,), generator=g))
        idx = torch.randint(0, 10, (k,), generator=g).tolist()
        src, tgt = " ".join(WORDS[i] for i in idx), " ".join(WORDS[10 + i] for i in idx)
        rows.append({"input_ids": tokenizer(src)["input_ids"], "labels": tokenizer(tgt)["input_ids"]})
    return datasets.Dataset.from_list(rows)
