"""Flat-LoRA and Bi-LoRA through `LLQRSAMTrainer` on PEFT LoRA models (issue 19 item 1).

On a tiny GPT-2 (LoRA on c_attn, c_fc: transformers' Conv1D, fan_in_fan_out) and a tiny ViT (LoRA on q/v plus a
trained classifier copy): the frozen base weights are bit-identical after training; the Trainer's Flat-LoRA steps
equal a hand-written loop that adds the noise to W in place as the reference code does (on its own copy); resume from
a checkpoint is bit-exact (3 + 3 steps == 6, Bi-LoRA's auxiliary adapter included); the auxiliary adapter is in the
checkpoint's SAM state and never in the saved adapter; a non-finite step is skipped with the weights and the state as
a run that stopped before it; and what does not fit is refused naming the flag.
"""

import math

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")

from hf_llqrsam import LLQRSAMTrainer
from hf_llqrsam.checkpoint import STATE_FILE
from hf_llqrsam.lora_sam import flat_lora_noise, lora_layers, merged_weight, noise_seed
from tests.lm_utils import lm_dataset, lora, tiny_gpt2
from tests.utils import SequentialTrainer, image_dataset, make_args, tiny_vit

MODES = ["flat_lora", "bi_lora"]


def _gpt2_lora(seed: int = 0):
    return lora(tiny_gpt2(dropout=0.1), ["c_attn", "c_fc"], seed=seed)


def _vit_lora(seed: int = 0):
    return lora(tiny_vit(dropout=0.1), ["q_proj", "v_proj"], modules_to_save=["classifier"], seed=seed)


CASES = {"gpt2": (_gpt2_lora, lambda: lm_dataset(24)), "vit": (_vit_lora, lambda: image_dataset(24))}


def _args(tmp_path, mode, **overrides):
    base = dict(
        optim="adamw_torch",
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        seed=7,
        sam_mode=mode,
        sam_rho=0.05,
        bi_lora_lr=0.05 if mode == "bi_lora" else None,
    )
    return make_args(tmp_path, **{**base, **overrides})


def _frozen(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", MODES)
def test_frozen_base_weights_are_bit_identical_after_training(tmp_path, mode, case):
    make_model, make_data = CASES[case]
    model = make_model()
    frozen, before = _frozen(model), _trainable(model)
    trainer = LLQRSAMTrainer(model=model, args=_args(tmp_path, mode), train_dataset=make_data())
    trainer.train()
    assert frozen and all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert trainer.sam_state.ascents == 6
    assert all("forward" not in vars(layer.base) for layer in trainer.engine.lora)  # base forwards are back


def test_flat_lora_trainer_equals_the_reference_loop(tmp_path):
    """3 SGD steps: the Trainer's forward-time noise == the reference's W += ξ; loss; backward; W −= ξ, done by hand
    on a second model (`github.com/nblt/Flat-LoRA`, `logTrainer.py`), with the same noise seeds."""
    ds, steps, rho, lr = lm_dataset(12), 3, 0.3, 0.1
    model, ref = lora(tiny_gpt2(), ["c_attn", "c_fc"]), lora(tiny_gpt2(), ["c_attn", "c_fc"])
    args = make_args(
        tmp_path, sam_mode="flat_lora", sam_rho=rho, max_steps=steps, flat_lora_ramp_steps=4, seed=3, learning_rate=lr
    )
    SequentialTrainer(model=model, args=args, train_dataset=ds).train()

    optimizer = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=lr)
    layers = lora_layers(ref, "flat_lora")
    for t in range(steps):
        batch = {k: ds[4 * t : 4 * t + 4][k] for k in ("input_ids", "labels")}
        sigma = rho * 0.5 * (1 - math.cos(math.pi * t / 4))
        noise = []
        for i, layer in enumerate(layers):
            merged = merged_weight(layer)
            std = (sigma + 1e-16) / math.sqrt(merged.shape[1]) * merged.norm(dim=1, keepdim=True)
            noise.append(flat_lora_noise(std, merged.shape[1], noise_seed(3, t, i)))
        saved = [layer.base.weight.detach().clone() for layer in layers]
        with torch.no_grad():
            for layer, xi in zip(layers, noise, strict=True):
                layer.base.weight.add_(xi.t() if layer.fan_in_fan_out else xi)
        ref.train()
        ref(**batch).loss.backward()
        with torch.no_grad():
            for layer, w in zip(layers, saved, strict=True):
                layer.base.weight.copy_(w)
        optimizer.step()
        optimizer.zero_grad()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


@pytest.mark.parametrize("mode", MODES)
def test_resume_is_bit_exact(tmp_path, mode):
    ds = lm_dataset(24)
    full_dir = tmp_path / "full"
    full = LLQRSAMTrainer(
        model=_gpt2_lora(), args=_args(full_dir, mode, save_strategy="steps", save_steps=3), train_dataset=ds
    )
    full.train()
    resumed = LLQRSAMTrainer(model=_gpt2_lora(seed=5), args=_args(tmp_path / "resumed", mode), train_dataset=ds)
    resumed.train(resume_from_checkpoint=str(full_dir / "checkpoint-3"))
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert full.sam_state.ascents == resumed.sam_state.ascents == 6
    for kind, buffers in full.sam_state.buffers.items():
        assert buffers and all(torch.equal(t, resumed.sam_state.buffers[kind][n]) for n, t in buffers.items())


def test_bi_lora_auxiliary_adapter_is_checkpointed_but_never_exported(tmp_path):
    model = _gpt2_lora()
    adapter = {n for n, p in model.named_parameters() if p.requires_grad}
    trainer = LLQRSAMTrainer(
        model=model, args=_args(tmp_path, "bi_lora", max_steps=3, save_strategy="steps", save_steps=3),
        train_dataset=lm_dataset(24),
    )  # fmt: skip
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    state = torch.load(tmp_path / "checkpoint-3" / STATE_FILE, weights_only=True)
    aux = state["sam"]["buffers"]["aux"]
    assert set(aux) == adapter - {n for n in adapter if "lora_" not in n} and aux
    assert all(torch.equal(aux[n].to(t.device), t) for n, t in trainer.sam_state.buffers["aux"].items())
    for folder in (tmp_path / "checkpoint-3", tmp_path / "final"):
        saved = load_file(folder / "adapter_model.safetensors")
        assert len(saved) == len(adapter)  # the primary adapter's tensors only
        assert not any(torch.equal(t, a.cpu()) for t in saved.values() for a in aux.values() if t.shape == a.shape)


class _NaNAtStep(LLQRSAMTrainer):
    """A non-finite loss on every pass of optimizer step `bad`."""

    bad = 1

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if self.state.global_step == self.bad:
            loss = loss * float("nan") if not isinstance(loss, tuple) else loss
        return loss


@pytest.mark.parametrize("mode", MODES)
def test_a_nonfinite_step_is_skipped_with_weights_and_state_intact(tmp_path, mode):
    """2 steps with step 1 non-finite == 1 step: the adapter, the optimizer's moments and the SAM state (Bi-LoRA's
    auxiliary adapter) are bit-identical, and the skip is counted."""
    ds = lm_dataset(24)
    common = dict(lr_scheduler_type="constant", gradient_accumulation_steps=1, flat_lora_ramp_steps=4)
    common = {k: v for k, v in common.items() if mode == "flat_lora" or k != "flat_lora_ramp_steps"}
    bad = _NaNAtStep(model=_gpt2_lora(), args=_args(tmp_path / "a", mode, max_steps=2, **common), train_dataset=ds)
    bad.train()
    one = LLQRSAMTrainer(model=_gpt2_lora(), args=_args(tmp_path / "b", mode, max_steps=1, **common), train_dataset=ds)
    one.train()
    for (n, p), (_, q) in zip(bad.model.named_parameters(), one.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    for kind, buffers in one.sam_state.buffers.items():
        assert all(torch.equal(t, bad.sam_state.buffers[kind][n]) for n, t in buffers.items())
    opt_bad, opt_one = bad.optimizer.state_dict()["state"], one.optimizer.state_dict()["state"]
    assert opt_bad.keys() == opt_one.keys() and opt_one
    assert all(torch.equal(opt_bad[k][s], opt_one[k][s]) for k in opt_one for s in ("exp_avg", "exp_avg_sq", "step"))
    assert sum(e.get("sam/skipped", 0) for e in bad.state.log_history) == 1


@pytest.mark.parametrize("mode", ["flat_lora", "bi_lora"])
def test_a_model_without_lora_is_refused_when_the_trainer_is_built(tmp_path, mode):
    with pytest.raises(ValueError, match=rf"Invalid sam_mode='{mode}': the model has no LoRA layer"):
        LLQRSAMTrainer(model=tiny_vit(), args=_args(tmp_path, mode), train_dataset=image_dataset(8))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"llqr": True}, r"Invalid llqr=True with sam_mode='flat_lora': LLQR enters neither"),
        ({"sam_accumulation": "micro"}, r"Invalid sam_accumulation='micro' with sam_mode='flat_lora'"),
        ({"sam_interval": 2}, r"Invalid sam_interval=2 with sam_mode='flat_lora'"),
        ({"sam_norm": "matrix"}, r"Invalid sam_norm='matrix' with sam_mode='flat_lora'"),
        ({"max_steps": -1, "num_train_epochs": 1}, r"Invalid flat_lora_ramp_steps=None with sam_mode='flat_lora'"),
        ({"flat_lora_ramp_steps": 0}, r"Invalid flat_lora_ramp_steps=0\. Must be >= 1"),
    ],
)
def test_flat_lora_settings_that_do_not_fit_are_refused_at_argument_time(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _args(tmp_path, "flat_lora", **overrides)


def test_bi_lora_lr_is_validated(tmp_path):
    with pytest.raises(ValueError, match=r"Invalid bi_lora_lr=0\.0\. Must be > 0"):
        _args(tmp_path, "bi_lora", bi_lora_lr=0.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.filterwarnings("ignore:`[a-z_]*gradient_checkpointing[a-z_]*` is deprecated:FutureWarning")
def test_trl_sft_trainer_keeps_the_base_and_resumes_bit_exact(tmp_path, mode):
    """Through TRL's SFT trainer on a PEFT model: W bit-identical, and 3 + 3 steps == 6 (the auxiliary adapter too)."""
    pytest.importorskip("trl")
    from hf_llqrsam.integrations.trl import LLQRSAMSFTTrainer
    from tests.integration.test_trl import _sft_config, _texts
    from tests.utils import tiny_tokenizer

    tokenizer, ds = tiny_tokenizer(), _texts()
    extra = {"sam_mode": mode, "bi_lora_lr": 0.05 if mode == "bi_lora" else None}
    model = lora(tiny_gpt2(), ["c_attn", "c_fc"])
    frozen = _frozen(model)
    full = LLQRSAMSFTTrainer(
        model=model, args=_sft_config(tmp_path / "full", **extra), train_dataset=ds, processing_class=tokenizer
    )
    full.train()
    assert all(torch.equal(p, frozen[n]) for n, p in full.model.named_parameters() if not p.requires_grad)
    resumed = LLQRSAMSFTTrainer(
        model=lora(tiny_gpt2(), ["c_attn", "c_fc"], seed=4), args=_sft_config(tmp_path / "resumed", **extra),
        train_dataset=ds, processing_class=tokenizer,
    )  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    a, b = dict(full.model.named_parameters()), dict(resumed.model.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    for kind, buffers in full.sam_state.buffers.items():
        assert all(torch.equal(t, resumed.sam_state.buffers[kind][n]) for n, t in buffers.items())


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_equals_eager(tmp_path, mode):
    """`torch_compile=True` (aot_eager): the forward-time noise and the auxiliary branch run through the compiled
    model (the base layers' forwards are swapped under it) and give the eager weights."""
    weights = []
    for compiled in (False, True):
        model = lora(tiny_gpt2(), ["c_attn", "c_fc"])
        extra = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
        args = _args(tmp_path / str(compiled), mode, max_steps=3, gradient_accumulation_steps=1, **extra)
        LLQRSAMTrainer(model=model, args=args, train_dataset=lm_dataset(12)).train()
        weights.append(_trainable(model))
    assert all(torch.allclose(weights[0][n], weights[1][n], rtol=0, atol=1e-6) for n in weights[0])


@pytest.mark.parametrize("mode", ["flat_lora", "bi_lora"])
def test_fsdp2_is_refused_for_the_lora_modes_naming_the_mode(mode):
    """The same check runs for `fsdp` arguments and for a model sharded with `fully_shard` before the Trainer."""
    from types import SimpleNamespace

    from hf_llqrsam.compat import validate_fsdp2

    args = SimpleNamespace(sam_mode=mode, sam_scope="global", llqr=False)
    with pytest.raises(ValueError, match=rf"Invalid sam_mode='{mode}' under FSDP2: .*merged weight.*Use DDP"):
        validate_fsdp2(args, "under FSDP2")
