"""Placeholder: replaced by the real two-pass trainer."""

from transformers import Seq2SeqTrainer, Trainer


class LLQRSAMTrainerMixin:
    pass


class LLQRSAMTrainer(LLQRSAMTrainerMixin, Trainer):
    pass


class LLQRSAMSeq2SeqTrainer(LLQRSAMTrainerMixin, Seq2SeqTrainer):
    pass
