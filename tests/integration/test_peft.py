"""PEFT (LoRA) as a first-class path: SAM and LLQR act in the adapter subspace only.

On a tiny causal LM (GPT-2) and a tiny ViT (LoRA on q/v plus a trained classifier copy): the frozen base weights are
bit-identical after SAM+LLQR training; ε is applied to exactly the trainable (adapter) tensors; U has exactly the
adapter blocks; checkpoints hold `adapter_model.safetensors` and `llqrsam_state.pt` (no full model); and resume
from a checkpoint is bit-exact (3 + 3 steps == 6 steps), through the Trainer's PEFT adapter loading.
"""

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")

import hf_llqrsam.engine as engine_module
from hf_llqrsam import LLQRSAMTrainer
from hf_llqrsam.checkpoint import STATE_FILE
from tests.lm_utils import lm_dataset, lora, tiny_gpt2
from tests.utils import image_dataset, make_args, tiny_vit

LLQR = dict(
    llqr=True, llqr_batch_size=8, llqr_inner_steps=3, llqr_inner_lr=1.0, llqr_ema_decay=0.5, llqr_update_interval=2
)


def _gpt2_lora(seed: int = 0):
    return lora(tiny_gpt2(dropout=0.1), ["c_attn", "c_fc"], seed=seed)


def _vit_lora(seed: int = 0):
    return lora(tiny_vit(dropout=0.1), ["q_proj", "v_proj"], modules_to_save=["classifier"], seed=seed)


CASES = {
    "gpt2": (_gpt2_lora, lambda: lm_dataset(20), ("lora_",)),
    "vit": (_vit_lora, lambda: image_dataset(20), ("lora_", "modules_to_save")),
}


def _args(tmp_path, **overrides):
    base = dict(
        optim="adamw_torch",
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        max_steps=6,
        save_steps=3,
        save_strategy="steps",
        per_device_train_batch_size=4,
        seed=7,
        sam_mode="sam",
        sam_rho=0.05,
        **LLQR,
    )
    return make_args(tmp_path, **{**base, **overrides})


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", list(CASES))
def test_sam_and_llqr_act_on_the_adapter_only(tmp_path, monkeypatch, case):
    make_model, make_data, adapter_marks = CASES[case]
    model = make_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert frozen and trainable and all(any(m in n for m in adapter_marks) for n in trainable)
    by_id = {id(p): n for n, p in model.named_parameters()}

    perturbed: list[list[str]] = []
    apply = engine_module.apply_perturbation_

    def record(params, eps):
        nonzero = [by_id[id(p)] for p, e in zip(params, eps, strict=True) if bool(e.abs().sum() > 0)]
        perturbed.append(nonzero)
        return apply(params, eps)

    monkeypatch.setattr(engine_module, "apply_perturbation_", record)
    before = _trainable(model)
    trainer = LLQRSAMTrainer(model=model, args=_args(tmp_path, save_strategy="no"), train_dataset=make_data())
    trainer.train()

    # ε on exactly the adapter tensors, at every one of the 6 SAM steps
    assert len(perturbed) == 6 and all(names == trainable for names in perturbed)
    # U: one block per adapter tensor, learned (not the identity) after refreshes at steps 0, 2, 4
    assert trainer.preconditioner.names == trainable and trainer.preconditioner.num_updates == 3
    ones = [torch.ones_like(before[n]) for n in trainable]
    u = torch.cat([t.reshape(-1) for t in trainer.preconditioner.apply(trainable, ones)])
    assert not torch.allclose(u, torch.ones_like(u))
    # frozen base weights bit-identical; every adapter tensor moved
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in frozen.items())
    assert all(not torch.equal(after[n], before[n]) for n in trainable)


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_holds_the_adapter_and_resume_is_bit_exact(tmp_path, case):
    make_model, make_data, _ = CASES[case]
    ds = make_data()
    full = LLQRSAMTrainer(model=make_model(), args=_args(tmp_path / "full"), train_dataset=ds)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", STATE_FILE, "optimizer.pt"} <= files
    assert "model.safetensors" not in files
    assert all("lora_" in k or "classifier" in k for k in load_file(checkpoint / "adapter_model.safetensors"))
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert state["llqr"] is not None and state["sam"]["ascents"] == 3

    # the same frozen base, a differently initialised adapter: everything trainable must come from the checkpoint
    resumed = LLQRSAMTrainer(model=make_model(seed=99), args=_args(tmp_path / "resumed"), train_dataset=ds)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = dict(full.model.named_parameters()), dict(resumed.model.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    u_full, u_res = full.preconditioner.state_dict()["blocks"], resumed.preconditioner.state_dict()["blocks"]
    assert all(torch.equal(t, u_res[n][k]) for n, block in u_full.items() for k, t in block.items())
    opt_full, opt_res = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_full[k]["exp_avg"], opt_res[k]["exp_avg"]) for k in opt_full)
