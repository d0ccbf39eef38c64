"""TRL through the same mixin: `LLQRSAMSFTConfig` / `LLQRSAMSFTTrainer` and `LLQRSAMDPOConfig` / `LLQRSAMDPOTrainer`.

SFT with SAM and with LLQR+SAM on a tiny GPT-2 and a tiny text dataset: checkpoints carry `llqrsam_state.pt`, resume
is bit-exact (3 + 3 == 6 steps), the `sam/*` and `llqr/*` keys are logged with the values they must have, TRL's
`num_tokens` counts each token once although pass 2 reruns `compute_loss`, and the model card names the method and
its tags. DPO with SAM: one step equals a hand-written SAM step on TRL's own DPO loss. The configs validate like
our own arguments; the overrides take whatever TRL passes; the module says how to install TRL when it is missing.
"""

import copy
import importlib
import inspect
import math
import sys

import datasets
import pytest
import torch
from torch.utils.data import SequentialSampler

pytest.importorskip("trl")

from hf_llqrsam import LLQRSAMTrainerMixin
from hf_llqrsam.args import parse_args
from hf_llqrsam.checkpoint import STATE_FILE
from hf_llqrsam.integrations.trl import (
    LLQRSAMDPOConfig,
    LLQRSAMDPOTrainer,
    LLQRSAMSFTConfig,
    LLQRSAMSFTTrainer,
)
from tests.lm_utils import tiny_gpt2
from tests.utils import WORDS, tiny_tokenizer

# TRL 1.16 sets and calls `gradient_checkpointing`, `is_gradient_checkpointing`, `gradient_checkpointing_disable`:
# names transformers 5.24 deprecates (a FutureWarning, an error under pyproject's filterwarnings)
pytestmark = pytest.mark.filterwarnings("ignore:`[a-z_]*gradient_checkpointing[a-z_]*` is deprecated:FutureWarning")
RHO = 0.05
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only bf16 default")


def _words(g: torch.Generator, k: int) -> str:
    return " ".join(WORDS[i] for i in torch.randint(0, 20, (k,), generator=g).tolist())


def _texts(n: int = 16) -> datasets.Dataset:
    g = torch.Generator().manual_seed(0)
    return datasets.Dataset.from_dict({"text": [_words(g, 6) for _ in range(n)]})  # every row: the same length


def _sft_config(tmp_path, **overrides) -> LLQRSAMSFTConfig:
    kwargs = dict(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=6,
        save_steps=3,
        save_strategy="steps",
        logging_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        optim="adamw_torch",
        seed=0,
        disable_tqdm=True,
        max_length=16,
        sam_mode="sam",
        sam_rho=RHO,
    )
    return LLQRSAMSFTConfig(**{**kwargs, **overrides})


LLQR = dict(llqr=True, llqr_batch_size=8, llqr_inner_steps=2, llqr_inner_lr=1e-2, llqr_update_interval=2)


@pytest.mark.parametrize("llqr", [False, True], ids=["sam", "llqr-sam"])
def test_sft_logs_checkpoints_resumes_and_cards(tmp_path, llqr):
    extra = LLQR if llqr else {}
    tokenizer, ds = tiny_tokenizer(), _texts()
    full = LLQRSAMSFTTrainer(
        model=tiny_gpt2(), args=_sft_config(tmp_path / "full", **extra), train_dataset=ds, processing_class=tokenizer
    )
    full.train()

    # logged keys and their values; TRL's token count once per token (pass 2 records nothing)
    lengths = {len(row["input_ids"]) for row in full.train_dataset}
    assert len(lengths) == 1
    tokens_per_step = 4 * lengths.pop()
    logs = [h for h in full.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3, 4, 5, 6]
    for h in logs:
        assert h["sam/rho"] == RHO and math.isclose(h["sam/perturbation_norm"], RHO, rel_tol=1e-6)
        assert math.isclose(h["sam/sharpness"], h["sam/loss_perturbed"] - h["loss"], abs_tol=1e-4)
        assert h["num_tokens"] == tokens_per_step * h["step"]
        assert {"entropy", "mean_token_accuracy"} <= h.keys()
    refreshes = [(h["step"], h["llqr/updates"]) for h in logs if "llqr/updates" in h]
    assert refreshes == ([(1, 1), (3, 2), (5, 3)] if llqr else [])
    assert all(h["llqr/u_min"] > 0 for h in logs if "llqr/u_min" in h)

    # checkpoints carry the SAM/LLQR state
    checkpoint = tmp_path / "full" / "checkpoint-3"
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert state["sam"]["ascents"] == 3 and (state["llqr"] is not None) is llqr

    # the model card: TRL's card with our tags and the method section
    card = (tmp_path / "full" / "README.md").read_text()
    tags = ["hf-llqrsam", "sam", "trl", "sft"] + (["llqr"] if llqr else [])
    assert all(f"\n- {tag}\n" in card for tag in tags), card[:400]
    method = f"{'LLQR+' if llqr else ''}SAM (rho={RHO}) over adamw_torch"
    assert f"Trained with `hf_llqrsam`: **{method}**" in card and card.count("## Training method (hf_llqrsam)") == 1

    # resume: 3 + 3 == 6, from a differently initialised model
    resumed = LLQRSAMSFTTrainer(
        model=tiny_gpt2(seed=99),
        args=_sft_config(tmp_path / "resumed", **extra),
        train_dataset=ds,
        processing_class=tokenizer,
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = dict(full.model.named_parameters()), dict(resumed.model.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    if llqr:
        u_full, u_res = full.preconditioner.state_dict()["blocks"], resumed.preconditioner.state_dict()["blocks"]
        assert all(torch.equal(t, u_res[n][k]) for n, block in u_full.items() for k, t in block.items())


# --- the configs ---------------------------------------------------------------------------------------------------


def test_sft_config_validates_like_our_arguments(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"Invalid sam_mode='sharp'\. Must be one of 'none', 'sam'"):
        LLQRSAMSFTConfig(output_dir=str(tmp_path), report_to="none", sam_mode="sharp")
    with pytest.raises(ValueError, match=r"Invalid llqr_shift_labels='yes'"):
        LLQRSAMSFTConfig(output_dir=str(tmp_path), report_to="none", llqr=True, llqr_shift_labels="yes")
    with pytest.raises(ValueError, match=r"Invalid optim='lomo' with sam_mode/llqr"):  # the support matrix, after TRL
        LLQRSAMSFTConfig(output_dir=str(tmp_path), report_to="none", sam_mode="sam", optim="lomo")
    with pytest.warns(UserWarning, match=r"llqr_batch_size=8 \(llqr=False\)"):
        LLQRSAMSFTConfig(output_dir=str(tmp_path), report_to="none", llqr_batch_size=8)
    (args,) = parse_args(
        LLQRSAMSFTConfig,
        ["--output_dir", str(tmp_path), "--sam_mode", "sam", "--llqr", "--report_to", "none", "--max_length", "32"],
    )
    assert args.sam_mode == "sam" and args.llqr and args.max_length == 32 and args.to_llqr_config() is not None
    with pytest.raises(SystemExit):
        parse_args(LLQRSAMSFTConfig, ["--output_dir", str(tmp_path), "--sam_rho", "0", "--sam_mode", "sam"])
    assert "Invalid sam_rho=0.0" in capsys.readouterr().err


@CPU_ONLY
def test_unset_bf16_is_off_where_bf16_cannot_run(tmp_path):
    """TRL's default bf16=True would raise on a CPU-only machine; unset it becomes False, explicit True still raises
    (naming use_cpu), and with use_cpu=True TRL's default stands."""
    assert LLQRSAMSFTConfig(output_dir=str(tmp_path), report_to="none").bf16 is False
    assert LLQRSAMDPOConfig(output_dir=str(tmp_path), report_to="none").bf16 is False
    assert LLQRSAMSFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True).bf16 is True
    with pytest.raises(ValueError, match="You need to assign use_cpu"):
        LLQRSAMSFTConfig(output_dir=str(tmp_path), report_to="none", bf16=True)


def test_dpo_config_rejects_llqr(tmp_path):
    with pytest.raises(ValueError, match=r"Invalid llqr=True with DPO: .* no labels"):
        LLQRSAMDPOConfig(output_dir=str(tmp_path), report_to="none", sam_mode="sam", llqr=True)


@pytest.mark.parametrize("trainer", [LLQRSAMSFTTrainer, LLQRSAMDPOTrainer], ids=["sft", "dpo"])
def test_every_override_takes_the_base_signature(trainer):
    """Each Trainer method the mixin overrides either passes *args/**kwargs through or has exactly the parameters
    of the TRL trainer's own method (no hard-coded stock signature)."""
    trl_base = trainer.__mro__[trainer.__mro__.index(LLQRSAMTrainerMixin) + 1]
    overridden = [
        n
        for n, f in vars(LLQRSAMTrainerMixin).items()
        if callable(f) and hasattr(trl_base, n) and not n.startswith("__")
    ]
    expected = {
        "create_model_card",
        "log",
        "training_step",
        "floating_point_ops",
        "create_optimizer",
        "train",
        "_save_optimizer_and_scheduler",
        "_load_optimizer_and_scheduler",
        "_load_from_checkpoint",
    }
    assert expected <= set(overridden)
    for name in overridden:
        ours = inspect.signature(getattr(LLQRSAMTrainerMixin, name)).parameters
        kinds = {p.kind for p in ours.values()}
        if {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD} <= kinds:
            continue
        base = inspect.signature(getattr(trl_base, name)).parameters
        trainer_own = inspect.signature(getattr(trl_base.__mro__[-2], name)).parameters  # transformers.Trainer
        passthrough = set(base) <= {"self", "args", "kwargs"}  # TRL's own (*args, **kwargs) wrapper
        assert list(ours) == list(base) or (passthrough and list(ours) == list(trainer_own)), name


def test_import_without_trl_says_how_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "trl" or m.startswith("trl.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "hf_llqrsam.integrations.trl")
    with pytest.raises(ImportError, match=r'pip install "hf-llqrsam\[trl\]"'):
        importlib.import_module("hf_llqrsam.integrations.trl")


# --- DPO -----------------------------------------------------------------------------------------------------------


class SequentialDPO(LLQRSAMDPOTrainer):
    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset or self.train_dataset)


def test_dpo_sam_step_equals_a_hand_written_sam_step_on_trls_loss(tmp_path):
    """θ₁ = θ₀ − lr·∇L(θ₀ + ε), ε = ρ·g/‖g‖, g = ∇L(θ₀), with L TRL's DPO loss (reference model untouched)."""
    g = torch.Generator().manual_seed(0)
    ds = datasets.Dataset.from_dict({k: [_words(g, 3) for _ in range(8)] for k in ("prompt", "chosen", "rejected")})
    model = tiny_gpt2()
    ref = copy.deepcopy(model)
    args = LLQRSAMDPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=1,
        save_strategy="steps",
        save_steps=1,
        logging_steps=1,
        per_device_train_batch_size=4,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        seed=0,
        disable_tqdm=True,
        max_length=16,
        sam_mode="sam",
        sam_rho=RHO,
    )
    trainer = SequentialDPO(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tiny_tokenizer())
    initial = copy.deepcopy(trainer.model)  # as TRL prepared it (its fused LM head), before any step
    ref_before = [p.detach().clone() for p in trainer.ref_model.parameters()]
    trainer.train()
    assert (tmp_path / "checkpoint-1" / STATE_FILE).is_file()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert math.isclose(log["loss"], math.log(2), rel_tol=1e-5)  # policy == reference at θ₀
    assert all(torch.equal(a, b) for a, b in zip(ref_before, trainer.ref_model.parameters(), strict=True))

    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    params = [p for p in initial.parameters() if p.requires_grad]
    initial.train()
    grad = torch.autograd.grad(trainer.compute_loss(initial, inputs), params, allow_unused=True)
    grad = [torch.zeros_like(p) if d is None else d for p, d in zip(params, grad, strict=True)]
    norm = torch.sqrt(sum((d**2).sum() for d in grad) + 1e-12)
    with torch.no_grad():
        for p, d in zip(params, grad, strict=True):
            p.add_(RHO * d / norm)
    perturbed = trainer.compute_loss(initial, inputs)
    assert math.isclose(log["sam/loss_perturbed"], float(perturbed.detach()), rel_tol=1e-5)
    grad2 = torch.autograd.grad(perturbed, params, allow_unused=True)
    with torch.no_grad():
        for p, d, d2 in zip(params, grad, grad2, strict=True):
            p.sub_(RHO * d / norm)
            if d2 is not None:
                p.sub_(0.1 * d2)
    for (name, p), q in zip(trainer.model.named_parameters(), initial.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
