"""The step engine through the real Trainer path: the skip rule for every mode (WSAM's NaN pass 2 included), and
LayerDrop models, whose parameter set with a gradient differs between the two passes, under every mode."""

import pytest
import torch
from transformers import BartConfig, BartForSequenceClassification

from hf_llqrsam.modes import MODES
from tests.integration.test_api import NaNOnCall
from tests.integration.test_trainer_equivalence import _Snapshots
from tests.utils import SequentialTrainer, image_dataset, make_args, params_of

STATEFUL = ["wsam", "fsam", "vasso", "infosam", "gsam", "looksam", "past_fsam"]


@pytest.mark.parametrize("mode", STATEFUL)
def test_a_nonfinite_pass_2_skips_the_trainer_step_with_weights_batchnorm_and_state_intact(tmp_path, mode):
    """Step 1's second forward is NaN (pass 2; past-FSAM's one pass of step 1): weights, BatchNorm statistics and
    the mode state after training equal those after step 0, and one skipped step is logged."""
    poison = {2} if mode == "past_fsam" else {4}  # past-FSAM runs one forward per step
    model = NaNOnCall(poison)
    snaps = _Snapshots(model)
    extra = {"looksam_interval": 1} if mode == "looksam" else {}
    states = []

    class StateSnapshots(_Snapshots):
        def on_step_end(self, args, state, control, **kw):
            engine = trainer.engine
            bn = [model.bn.running_mean.clone(), model.bn.running_var.clone(), model.bn.num_batches_tracked.clone()]
            buffers = {k: {n: t.clone() for n, t in v.items()} for k, v in engine.state.buffers.items()}
            states.append((bn, buffers, engine.state.ascents))

    trainer = SequentialTrainer(
        model=model,
        args=make_args(tmp_path, sam_mode=mode, max_steps=2, **extra),
        train_dataset=image_dataset(16),
        callbacks=[snaps, StateSnapshots(model)],
    )
    trainer.train()
    assert all(torch.equal(x, y) for x, y in zip(snaps.begin[1], params_of(model), strict=True))
    (bn0, buf0, asc0), (bn1, buf1, asc1) = states
    assert all(torch.equal(a, b) for a, b in zip(bn0, bn1, strict=True))
    assert asc0 == asc1 and buf0.keys() == buf1.keys()
    assert all(torch.equal(t, buf1[k][n]) for k, v in buf0.items() for n, t in v.items())
    assert [log.get("sam/skipped", 0) for log in trainer.state.log_history[:2]] == [0, 1]


def _bart_classifier() -> BartForSequenceClassification:
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=40, d_model=16, encoder_layers=3, decoder_layers=3, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        encoder_layerdrop=0.4, decoder_layerdrop=0.4, num_labels=3, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )  # fmt: skip
    return BartForSequenceClassification(config)


def _token_dataset(n: int = 24):
    import datasets

    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 40, (n, 8), generator=g)
    ids[:, -1] = 2  # one eos per example: the classification head reads it
    labels = torch.randint(0, 3, (n,), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()}).with_format("torch")


LAYERDROP_CASES = [(m, False) for m in MODES] + [(m, True) for m, s in MODES.items() if s.llqr_descent]


@pytest.mark.parametrize(("mode", "llqr"), LAYERDROP_CASES)
def test_layerdrop_bart_trains_under_every_mode(tmp_path, mode, llqr):
    """`BartForSequenceClassification` with LayerDrop drops different layers in the two passes ("Tensor lists must
    have the same number of tensors" crashed GSAM, LookSAM and WSAM at step 0). Every mode takes its 6 steps with
    finite weights, none skipped, and the pass-2 gradient sets did differ."""
    model = _bart_classifier()
    if MODES[mode].acts_on_lora:  # Flat-LoRA and Bi-LoRA perturb LoRA layers
        from tests.lm_utils import lora

        model = lora(model, ["q_proj", "v_proj"])
    before = params_of(model)
    extra = {"looksam_interval": 2} if mode == "looksam" else {}
    if llqr:
        extra |= dict(llqr=True, llqr_batch_size=8, llqr_inner_steps=2, llqr_update_interval=3)
        extra["llqr_in_perturbation"] = MODES[mode].llqr_geometry
    trainer = SequentialTrainer(
        model=model,
        args=make_args(tmp_path, sam_mode=mode, max_steps=6, **extra),
        train_dataset=_token_dataset(),
    )
    seen: list[frozenset[str]] = []
    real = trainer.training_step

    def spy(*args, **kwargs):
        loss = real(*args, **kwargs)
        seen.append(frozenset(n for n, p in model.named_parameters() if p.grad is not None))
        return loss

    trainer.training_step = spy
    trainer.train()
    after = params_of(model)
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert sum(log.get("sam/skipped", 0) for log in trainer.state.log_history) == 0
    assert len(set(seen)) > 1  # LayerDrop really changed which parameters have a gradient
