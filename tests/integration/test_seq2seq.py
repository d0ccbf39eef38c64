"""LLQRSAMSeq2SeqTrainer with a tiny Marian, DataCollatorForSeq2Seq and predict_with_generate (docs/integration.md
I19)."""

import pytest
import torch
from transformers import DataCollatorForSeq2Seq
from transformers.trainer_pt_utils import LabelSmoother

from hf_llqrsam import LLQRSAMSeq2SeqTrainer, LLQRSAMSeq2SeqTrainingArguments
from tests.utils import tiny_marian, tiny_tokenizer, translation_dataset


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        disable_tqdm=True,
        predict_with_generate=True,
        generation_max_length=8,
        max_grad_norm=0.0,
        label_smoothing_factor=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        seed=0,
    )
    return LLQRSAMSeq2SeqTrainingArguments(**{**base, **kw})


def test_seq2seq_sam_trains_and_generates(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_marian(tok)
    ds = translation_dataset(tok)
    trainer = LLQRSAMSeq2SeqTrainer(
        model=model,
        args=_args(tmp_path, sam_mode="sam"),
        train_dataset=ds,
        eval_dataset=ds.select(range(4)),
        data_collator=DataCollatorForSeq2Seq(tok, model),
        processing_class=tok,
    )
    trainer.train()
    assert trainer.state.log_history[0]["sam/perturbation_norm"] == pytest.approx(0.1, rel=1e-5)
    metrics = trainer.evaluate()
    # the eval loss is the label-smoothed loss of the trained model on those 4 examples (one eval batch)
    batch = DataCollatorForSeq2Seq(tok, model)([ds[i] for i in range(4)])
    labels = batch.pop("labels")
    model.eval()
    with torch.no_grad():
        expected = LabelSmoother(epsilon=0.1)(model(**batch), labels)
    assert metrics["eval_loss"] == pytest.approx(float(expected), rel=1e-5)
    preds = trainer.predict(ds.select(range(4)))
    assert preds.predictions.shape[0] == 4  # generated token ids


def test_seq2seq_descent_gradient_is_ga_invariant(tmp_path):
    """bs 4×1 and 2×2 give the same step: label smoothing normalises by num_items_in_batch (guards #47688)."""
    tok = tiny_tokenizer()
    ds = translation_dataset(tok, n=8)
    norms = {}
    for bs, ga in ((4, 1), (2, 2)):
        model = tiny_marian(tok)
        trainer = LLQRSAMSeq2SeqTrainer(
            model=model,
            args=_args(
                tmp_path, sam_mode="sam", max_steps=1, per_device_train_batch_size=bs, gradient_accumulation_steps=ga
            ),
            train_dataset=ds,
            data_collator=DataCollatorForSeq2Seq(tok, model),
        )
        trainer._get_train_sampler = lambda *a: __import__("torch").utils.data.SequentialSampler(ds)
        trainer.train()
        norms[(bs, ga)] = trainer.state.log_history[0]["grad_norm"]
    assert norms[(4, 1)] == pytest.approx(norms[(2, 2)], rel=1e-5)
