"""`llqr_shift_labels`: causal LMs pair logits at t with labels at t + 1 in the curvature problem, decided from the
model (through PEFT / compile wrappers), never from a class-name list; undecidable models raise naming the flag.

Checked on the resolver, on the public `llqr_logits_and_targets` override point (against a hand-shifted pairing)
and through a real refresh (the curvature problem's g against a hand-shifted gradient).
"""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    DataCollatorForSeq2Seq,
    GenerationMixin,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PretrainedConfig,
    PreTrainedModel,
    default_data_collator,
)
from transformers.modeling_outputs import CausalLMOutput

from hf_llqrsam import LLQRSAMTrainer
from hf_llqrsam.causal import resolve_shift_labels, underlying_model
from hf_llqrsam.llqr import LLQRPreconditioner
from hf_llqrsam.trainer_support import curvature_batch
from tests.lm_utils import VOCAB, lm_dataset, lora, shifted_grads, tiny_gpt2, tiny_llama
from tests.utils import image_dataset, make_args, tiny_marian, tiny_tokenizer, tiny_vit, translation_dataset

LLQR = dict(llqr=True, llqr_batch_size=8, llqr_inner_steps=1, llqr_inner_lr=1e-2)


class UserLM(GPT2LMHeadModel):
    """A user's subclass: its class name is in no transformers mapping."""


class RemoteConfig(PretrainedConfig):
    model_type = "remote-lm-test"

    def __init__(self, vocab_size: int = VOCAB, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size


class RemoteLM(PreTrainedModel, GenerationMixin):
    """A remote-code style decoder: an unregistered config type, generative through GenerationMixin."""

    config_class = RemoteConfig

    def __init__(self, config: RemoteConfig):
        super().__init__(config)
        self.emb = nn.Embedding(config.vocab_size, 8)
        self.head = nn.Linear(8, config.vocab_size)

    def forward(self, input_ids, labels=None, **kwargs):
        return SimpleNamespace(logits=self.head(torch.tanh(self.emb(input_ids))))


class PlainLM(nn.Module):
    """(B, T, V) logits with (B, T) labels and no config: nothing says whether it is causal."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, input_ids, labels=None):
        logits = self.head(torch.tanh(self.emb(input_ids)))
        loss = None if labels is None else F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss, logits=logits)


def _gpt2_classifier():
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(tiny_gpt2().config)


LABELS_2D = torch.zeros(2, 4, dtype=torch.long)
LABELS_1D = torch.zeros(2, dtype=torch.long)

# (id, model factory, labels, expected shift)
AUTO = [
    ("gpt2", tiny_gpt2, LABELS_2D, True),
    ("llama", tiny_llama, LABELS_2D, True),
    ("user-subclass", lambda: tiny_gpt2(cls=UserLM), LABELS_2D, True),
    ("peft-lora-gpt2", lambda: lora(tiny_gpt2(), ["c_attn"]), LABELS_2D, True),
    ("peft-lora-llama", lambda: lora(tiny_llama(), ["q_proj", "v_proj"]), LABELS_2D, True),
    ("compiled-gpt2", lambda: torch.compile(tiny_gpt2()), LABELS_2D, True),
    ("remote-code", lambda: RemoteLM(RemoteConfig()), LABELS_2D, True),
    ("vit", tiny_vit, LABELS_1D, False),
    ("vit-no-labels", tiny_vit, None, False),
    ("peft-lora-vit", lambda: lora(tiny_vit(), ["q_proj", "v_proj"], ["classifier"]), LABELS_1D, False),
    ("marian", lambda: tiny_marian(tiny_tokenizer()), LABELS_2D, False),
    ("gpt2-classifier", _gpt2_classifier, LABELS_1D, False),
    ("plain-classifier", lambda: nn.Linear(4, 3), LABELS_1D, False),
]


@pytest.mark.parametrize(("factory", "labels", "shift"), [a[1:] for a in AUTO], ids=[a[0] for a in AUTO])
def test_auto_decides_from_the_model(factory, labels, shift):
    decided, why = resolve_shift_labels("auto", factory(), labels)
    assert decided is shift, why


def test_wrappers_are_looked_through():
    base = tiny_gpt2()
    peft_model = lora(base, ["c_attn"])
    assert underlying_model(peft_model) is base
    assert underlying_model(torch.compile(peft_model)) is base
    tuner = SimpleNamespace(base_model=SimpleNamespace(model=base))  # a wrapper without get_base_model
    assert underlying_model(tuner) is base


def test_auto_raises_naming_the_flag_when_it_cannot_tell():
    with pytest.raises(ValueError, match=r"Invalid llqr_shift_labels='auto' for PlainLM and labels of shape \(2, 4\)"):
        resolve_shift_labels("auto", PlainLM(), LABELS_2D)


def test_true_and_false_are_taken_as_given():
    assert resolve_shift_labels("true", PlainLM(), LABELS_2D)[0] is True
    assert resolve_shift_labels("false", tiny_gpt2(), LABELS_2D)[0] is False
    with pytest.raises(ValueError, match=r"Invalid llqr_shift_labels='true' with labels of shape \(2,\)"):
        resolve_shift_labels("true", tiny_vit(), LABELS_1D)


def test_bad_value_is_rejected_at_argument_time(tmp_path):
    with pytest.raises(ValueError, match=r"Invalid llqr_shift_labels='yes'\. Must be one of 'auto', 'true', 'false'"):
        make_args(tmp_path, llqr=True, llqr_shift_labels="yes")


# --- the public override point ------------------------------------------------------------------------------------


def _lm_batch(n: int = 4) -> dict:
    return default_data_collator([lm_dataset(n)[i] for i in range(n)])


@pytest.mark.parametrize(
    "factory",
    [tiny_gpt2, tiny_llama, lambda: tiny_gpt2(cls=UserLM), lambda: lora(tiny_gpt2(), ["c_attn"])],
    ids=["gpt2", "llama", "user-subclass", "peft-lora-gpt2"],
)
def test_llqr_logits_and_targets_shifts_causal_lms(tmp_path, factory):
    model = factory()
    trainer = LLQRSAMTrainer(model=model, args=make_args(tmp_path, **LLQR), train_dataset=lm_dataset())
    batch = _lm_batch()
    logits, targets, mask = trainer.llqr_logits_and_targets(model, batch)
    full = model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(logits, full[:, :-1].reshape(-1, VOCAB))
    assert torch.equal(targets, batch["labels"][:, 1:].reshape(-1))  # labels at t + 1
    assert torch.equal(mask, targets != -100)


def test_llqr_logits_and_targets_leaves_vit_and_marian_unshifted(tmp_path):
    vit = tiny_vit()
    ds = image_dataset(8)
    trainer = LLQRSAMTrainer(model=vit, args=make_args(tmp_path, **LLQR), train_dataset=ds)
    batch = {"pixel_values": ds[:4]["pixel_values"], "labels": ds[:4]["labels"]}
    logits, targets, _ = trainer.llqr_logits_and_targets(vit, batch)
    assert logits.shape == (4, 3) and torch.equal(targets, batch["labels"])

    tokenizer = tiny_tokenizer()
    marian = tiny_marian(tokenizer)
    ds = translation_dataset(tokenizer, n=4)
    trainer = LLQRSAMTrainer(model=marian, args=make_args(tmp_path, **LLQR), train_dataset=ds)
    batch = DataCollatorForSeq2Seq(tokenizer, model=marian)([ds[i] for i in range(4)])
    logits, targets, _ = trainer.llqr_logits_and_targets(marian, dict(batch))
    assert torch.equal(targets, batch["labels"].reshape(-1)) and logits.shape[0] == targets.numel()


def test_undecidable_model_fails_at_the_first_refresh_naming_the_flag(tmp_path):
    model = PlainLM()
    trainer = LLQRSAMTrainer(model=model, args=make_args(tmp_path, **LLQR), train_dataset=lm_dataset())
    with pytest.raises(ValueError, match="Pass --llqr_shift_labels true for a causal LM"):
        trainer.train()
    forced = LLQRSAMTrainer(
        model=PlainLM(), args=make_args(tmp_path, llqr_shift_labels="true", **LLQR), train_dataset=lm_dataset()
    )
    forced.train()
    assert forced.preconditioner.num_updates == 1


# --- through a real refresh ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory",
    [tiny_gpt2, tiny_llama, lambda: lora(tiny_gpt2(), ["c_attn"])],
    ids=["gpt2", "llama", "peft-lora-gpt2"],
)
def test_refresh_fits_u_to_the_shifted_problem(tmp_path, monkeypatch, factory):
    """g handed to the inner loop at step 0 == the hand-shifted mean-CE gradient, and != the unshifted one."""
    captured = {}
    fit = LLQRPreconditioner.fit_problem

    def capture(self, g_dict, *args, **kwargs):
        captured.setdefault("g", {n: t.detach().clone() for n, t in g_dict.items()})
        return fit(self, g_dict, *args, **kwargs)

    monkeypatch.setattr(LLQRPreconditioner, "fit_problem", capture)
    model = factory()
    initial = copy.deepcopy(model)
    trainer = LLQRSAMTrainer(
        model=model, args=make_args(tmp_path, max_steps=1, sam_mode="sam", **LLQR), train_dataset=lm_dataset()
    )
    trainer.train()
    batch = curvature_batch(trainer, 0)  # a pure function of (seed, step)
    shifted, unshifted = shifted_grads(initial, batch), shifted_grads(copy.deepcopy(initial), batch, shift=False)
    g = captured["g"]
    assert list(g) == trainer.preconditioner.names == list(shifted)
    for name in g:
        torch.testing.assert_close(g[name], shifted[name], rtol=1e-5, atol=1e-7, msg=name)
    gap = max(float((shifted[n] - unshifted[n]).abs().max()) for n in g)
    assert gap > 1e-3  # the unshifted problem is a different one
