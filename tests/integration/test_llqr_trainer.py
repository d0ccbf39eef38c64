"""LLQR inside the Trainer: the reduction to stock, the wiring against a hand-written loop, cadence, resume,
llqr_apply="update", bf16 and seq2seq (docs/integration.md I4, I9, I14, I16, I17, I19)."""

import pytest
import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from hf_llqrsam import (
    LLQRSAMSeq2SeqTrainer,
    LLQRSAMSeq2SeqTrainingArguments,
    LLQRSAMTrainer,
    LLQRSAMTrainingArguments,
)
from hf_llqrsam.checkpoint import STATE_FILE
from hf_llqrsam.data import curvature_indices
from tests.oracles.sam_loop import OracleSAM
from tests.utils import (
    SequentialTrainer,
    batches,
    image_dataset,
    make_args,
    max_abs_diff,
    params_of,
    tiny_marian,
    tiny_tokenizer,
    tiny_vit,
    translation_dataset,
)

LLQR_FAST = dict(llqr=True, llqr_batch_size=8, llqr_inner_steps=5, llqr_inner_lr=1e-2)


def u_diagonal(trainer, model) -> torch.Tensor:
    """The learned diagonal U as one flat vector in `model.parameters()` order (U·1 for a diagonal U)."""
    names = [n for n, _ in model.named_parameters()]
    ones = [torch.ones_like(p) for p in model.parameters()]
    return torch.cat([t.reshape(-1) for t in trainer.preconditioner.apply(names, ones)])


def test_llqr_with_zero_inner_steps_is_stock_trainer_bitwise(tmp_path):
    """U stays I and the curvature batch is drawn: same params and RNG as stock (dropout, AdamW, GA 2)."""
    ds = image_dataset(24)
    common = dict(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        seed=3,
        disable_tqdm=True,
        optim="adamw_torch",
    )
    stock = tiny_vit(dropout=0.2)
    Trainer(model=stock, args=TrainingArguments(**common), train_dataset=ds).train()
    stock_rng = torch.get_rng_state()
    ours = tiny_vit(dropout=0.2)
    trainer = LLQRSAMTrainer(
        model=ours,
        args=LLQRSAMTrainingArguments(
            **common, llqr=True, llqr_inner_steps=0, llqr_update_interval=2, llqr_batch_size=8
        ),
        train_dataset=ds,
    )
    trainer.train()
    assert trainer.preconditioner.num_updates == 2  # the curvature batch really was drawn, twice
    assert all(torch.equal(a, b) for a, b in zip(params_of(stock), params_of(ours), strict=True))
    assert torch.equal(stock_rng, torch.get_rng_state())


@pytest.mark.parametrize("mode", ["sam", "fsam"])
def test_llqr_sam_with_learned_u_matches_hand_written_loop(tmp_path, mode):
    """After the step-0 refresh U is fixed (E large): the run equals the oracle with C = P = that U."""
    ds = image_dataset(16)
    model, ref = tiny_vit(), tiny_vit()
    trainer = SequentialTrainer(
        model=model, args=make_args(tmp_path, sam_mode=mode, max_steps=4, **LLQR_FAST), train_dataset=ds
    )
    trainer.train()
    u = u_diagonal(trainer, model)
    assert trainer.preconditioner.num_updates == 1 and not torch.allclose(u, torch.ones_like(u))
    oracle = OracleSAM(mode, 0.1, 0.1, u=u)
    for batch in batches(ds, 4):
        oracle.step(ref, batch)
    assert max_abs_diff(params_of(model), params_of(ref)) < 1e-6


def test_cadence_and_update_until(tmp_path):
    ds = image_dataset(24)
    trainer = LLQRSAMTrainer(
        model=tiny_vit(),
        args=make_args(tmp_path, max_steps=6, llqr_update_interval=2, llqr_update_until=5, **LLQR_FAST),
        train_dataset=ds,
    )
    trainer.train()
    assert trainer.preconditioner.num_updates == 3 and trainer.preconditioner.last_update_step == 4
    logged = [h["step"] for h in trainer.state.log_history if "llqr/updates" in h]
    assert logged == [1, 3, 5]  # refreshes before steps 0, 2, 4 are logged with those steps' logs
    until = LLQRSAMTrainer(
        model=tiny_vit(),
        args=make_args(tmp_path, max_steps=6, llqr_update_interval=2, llqr_update_until=4, **LLQR_FAST),
        train_dataset=ds,
    )
    until.train()
    assert until.preconditioner.num_updates == 2 and until.preconditioner.last_update_step == 2


def test_curvature_indices_are_a_pure_function_of_seed_and_step():
    assert curvature_indices(3, 10, 100, 8) == curvature_indices(3, 10, 100, 8)
    assert curvature_indices(3, 10, 100, 8) != curvature_indices(3, 11, 100, 8)
    assert curvature_indices(3, 10, 100, 8) != curvature_indices(4, 10, 100, 8)
    assert len(set(curvature_indices(0, 0, 5, 8))) == 5  # at most the dataset, without repeats


def test_resume_with_u_is_bit_exact(tmp_path):
    ds = image_dataset(20)
    kw = dict(
        optim="adamw_torch",
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        max_steps=6,
        save_steps=3,
        save_strategy="steps",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        seed=7,
        sam_mode="fsam",
        llqr_update_interval=2,
        **LLQR_FAST,
    )
    full = LLQRSAMTrainer(model=tiny_vit(dropout=0.1), args=make_args(tmp_path / "full", **kw), train_dataset=ds)
    full.train()
    state = torch.load(tmp_path / "full" / "checkpoint-3" / STATE_FILE, weights_only=True)
    assert state["llqr"]["num_updates"] == 2 and state["llqr"]["last_update_step"] == 2
    resumed = LLQRSAMTrainer(
        model=tiny_vit(seed=9, dropout=0.1), args=make_args(tmp_path / "res", **kw), train_dataset=ds
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed.preconditioner.num_updates == full.preconditioner.num_updates == 3
    assert all(torch.equal(a, b) for a, b in zip(params_of(full.model), params_of(resumed.model), strict=True))
    u_full, u_res = full.preconditioner.state_dict()["blocks"], resumed.preconditioner.state_dict()["blocks"]
    assert all(torch.equal(u_full[n][k], u_res[n][k]) for n in u_full for k in u_full[n])


def test_apply_update_preconditions_the_adamw_update(tmp_path):
    """llqr_apply='update': θ₁ = θ₀ + U·Δ_AdamW, where the first AdamW update is −lr·g/(|g| + ε)."""
    ds = image_dataset(16)
    model = tiny_vit()
    theta0 = params_of(model)
    trainer = SequentialTrainer(
        model=model,
        args=make_args(
            tmp_path, max_steps=1, optim="adamw_torch", learning_rate=1e-2, llqr_apply="update", **LLQR_FAST
        ),
        train_dataset=ds,
    )
    trainer.train()
    ref = tiny_vit()
    g = torch.autograd.grad(ref(**batches(ds, 4)[0]).loss, list(ref.parameters()))
    u = u_diagonal(trainer, model)
    delta = torch.cat([(-1e-2 * x / (x.abs() + 1e-8)).reshape(-1) for x in g])
    expected = torch.cat([t.reshape(-1) for t in theta0]) + u * delta
    assert torch.allclose(torch.cat([p.reshape(-1) for p in params_of(model)]), expected, atol=1e-6)
    assert not torch.allclose(u, torch.ones_like(u))  # a real U, so applying it to the gradient would differ


def test_apply_update_rejects_other_optimizers(tmp_path):
    trainer = LLQRSAMTrainer(
        model=tiny_vit(),
        args=make_args(tmp_path, optim="adafactor", llqr_apply="update", **LLQR_FAST),
        train_dataset=image_dataset(8),
    )
    with pytest.raises(ValueError, match="llqr_apply='update' with optimizer Adafactor"):
        trainer.train()


def test_bf16_llqr_keeps_u_fp32(tmp_path):
    trainer = LLQRSAMTrainer(
        model=tiny_vit(),
        args=make_args(tmp_path, sam_mode="sam", bf16=True, **LLQR_FAST),
        train_dataset=image_dataset(16),
    )
    trainer.train()
    blocks = trainer.preconditioner.state_dict()["blocks"]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for b in blocks.values() for t in b.values())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_seq2seq_llqr_sam_updates_u_with_tied_and_frozen_params(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_marian(tok)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen  # Marian's sinusoidal positions are frozen parameters
    args = LLQRSAMSeq2SeqTrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        max_steps=2,
        logging_steps=1,
        sam_mode="sam",
        label_smoothing_factor=0.1,
        per_device_train_batch_size=4,
        disable_tqdm=True,
        **LLQR_FAST,
    )
    trainer = LLQRSAMSeq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=translation_dataset(tok),
        data_collator=DataCollatorForSeq2Seq(tok, model),
    )
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["llqr/objective_end"] < log["llqr/objective_start"]
    names = trainer.preconditioner.names
    assert not set(frozen) & set(names)
    assert "model.shared.weight" in names and "lm_head.weight" not in names  # tied once


def test_a_refresh_logs_its_progress(tmp_path, caplog):
    """A refresh (a pause of seconds to minutes on a real model) is not silent: the Trainer logs its first curvature
    product at INFO, naming the step and the number of inner steps, before the refresh line."""
    import logging

    trainer = SequentialTrainer(
        model=tiny_vit(),
        args=make_args(tmp_path, sam_mode="sam", llqr=True, llqr_inner_steps=4, llqr_batch_size=8, max_steps=1),
        train_dataset=image_dataset(16),
    )
    with caplog.at_level(logging.INFO, logger="hf_llqrsam"):
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if r.name == "hf_llqrsam.trainer"]
    first = next(i for i, line in enumerate(lines) if "curvature product 1 of 4" in line)
    done = next(i for i, line in enumerate(lines) if line.startswith("LLQR refresh 1 at step 0"))
    assert "before step 0" in lines[first] and first < done
