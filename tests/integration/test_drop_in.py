"""Drop-in contract: what a stock-Trainer user relies on holds with our classes (issue 22).

- A save killed half-way is skipped on resume, by the recipes' auto-resume and by `resume_from_checkpoint=True`
  (item 8), and a checkpoint whose SAM state does not fit the model is refused before any step runs (item 7): real
  checkpoints on disk, a real SIGKILL of a training process.
- The stock contract, each check with the stock class and ours in modes none and sam: callback lists, `args=None`,
  `training_step` outside `train()`, `model_init` and a second `train()`, dict and tuple model outputs,
  `evaluate`/`predict`, checkpoint files, `Seq2SeqTrainer` generation, `hyperparameter_search` over `sam_rho`, TRL
  SFT with packing and with a completion-only loss, TRL DPO. (Positional construction: `tests/unit/test_args.py`.)
"""

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import datasets
import pytest
import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from hf_llqrsam import LLQRSAMTrainer, LLQRSAMTrainingArguments
from hf_llqrsam.checkpoint import STATE_FILE, LLQRSAMStateError, last_complete_checkpoint
from recipes import recipe_utils
from tests.utils import REPO, image_dataset, make_args, params_of, tiny_vit

# a random sampler over 16 examples in batches of 4: step 5 starts the second epoch, so resuming at step 2 must
# skip the right batches as well
KILL_ARGS = {
    "sam_mode": "sam",
    "sam_rho": 0.05,
    "save_strategy": "steps",
    "save_steps": 2,
    "max_steps": 6,
    "seed": 7,
    "do_train": True,
}

# The child trains with the real Trainer; the save of checkpoint-4 stops after the weights and the optimizer are
# written (before trainer_state.json and llqrsam_state.pt), says so with a marker file and waits to be killed.
CHILD = """
import json, sys, time
from transformers import Trainer
from hf_llqrsam import LLQRSAMTrainer
from tests.utils import image_dataset, make_args, tiny_vit

out, marker, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
save = Trainer._save_optimizer_and_scheduler

def save_then_hang(self, output_dir):
    save(self, output_dir)
    if self.state.global_step == 4:
        open(marker, "w").close()
        time.sleep(600)

Trainer._save_optimizer_and_scheduler = save_then_hang
LLQRSAMTrainer(model=tiny_vit(), args=make_args(out, **kwargs), train_dataset=image_dataset(16)).train()
"""


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """An output dir with checkpoint-2 complete and checkpoint-4 from a save killed half-way (SIGKILL)."""
    base = tmp_path_factory.mktemp("killed")
    out, marker = base / "out", base / "saving"
    # the child trains the first steps that the parent's runs are compared with bit for bit: the same thread count
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": REPO}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out), str(marker), json.dumps(KILL_ARGS)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 600
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the child ended ({proc.returncode}) before the save:\n{proc.stdout.read()}")
            if time.monotonic() > deadline:
                raise AssertionError("the child did not reach the save of checkpoint-4 in 600 s")
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return out


def _full_run(tmp_path) -> list[torch.Tensor]:
    full = LLQRSAMTrainer(
        model=tiny_vit(), args=make_args(tmp_path / "full", **KILL_ARGS), train_dataset=image_dataset(16)
    )
    full.train()
    return params_of(full.model)


def test_a_save_killed_half_way_is_skipped_by_the_recipes_auto_resume(tmp_path, killed_run, caplog):
    out = tmp_path / "out"
    shutil.copytree(killed_run, out)
    killed, complete = out / "checkpoint-4", out / "checkpoint-2"
    assert (killed / "model.safetensors").is_file() and (killed / "optimizer.pt").is_file()
    assert not (killed / "trainer_state.json").exists() and not (killed / STATE_FILE).exists()
    assert get_last_checkpoint(str(out)) == str(killed)  # what stock resume (and the recipes, before) picked

    args = make_args(out, **KILL_ARGS)
    with caplog.at_level("WARNING"):
        found = recipe_utils.last_checkpoint(logging.getLogger("recipe"), args)
    assert found == str(complete) == last_complete_checkpoint(str(out))
    assert f"{killed} (no trainer_state.json: its save was interrupted)" in caplog.text

    resumed = LLQRSAMTrainer(model=tiny_vit(seed=99), args=args, train_dataset=image_dataset(16))
    resumed.train(resume_from_checkpoint=found)
    assert resumed.state.global_step == 6
    full = _full_run(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(full, params_of(resumed.model), strict=True))  # bit-exact
    assert (killed / "trainer_state.json").is_file()  # the resumed run saved step 4 again, completely


def test_resume_from_checkpoint_true_skips_a_save_killed_half_way(tmp_path, killed_run):
    out = tmp_path / "out"
    shutil.copytree(killed_run, out)
    resumed = LLQRSAMTrainer(
        model=tiny_vit(seed=99), args=make_args(out, **KILL_ARGS), train_dataset=image_dataset(16)
    )
    resumed.train(resume_from_checkpoint=True)
    assert all(torch.equal(a, b) for a, b in zip(_full_run(tmp_path), params_of(resumed.model), strict=True))


@pytest.mark.parametrize("poison", ["broadcastable", "another-model"])
def test_a_sam_state_that_does_not_fit_the_model_is_refused_before_any_step(tmp_path, poison):
    """An FSAM gbar of a broadcastable wrong shape was broadcast into the descent; one keyed by another model's
    parameter names silently restarted at zero. Both are refused, naming the file, before any step runs."""
    kwargs = {"sam_mode": "fsam", "save_strategy": "steps", "save_steps": 2, "max_steps": 4}
    first = LLQRSAMTrainer(
        model=tiny_vit(), args=make_args(tmp_path / "run", **kwargs), train_dataset=image_dataset(16)
    )
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    path = checkpoint / STATE_FILE
    state = torch.load(path, weights_only=True)
    gbar = state["sam"]["buffers"]["gbar"]
    name = next(n for n, t in gbar.items() if t.dim() == 2 and t.shape[0] > 1)
    if poison == "broadcastable":
        gbar[name] = gbar[name][:1].clone()
    else:
        state["sam"]["buffers"]["gbar"] = {f"encoder.{n}": t for n, t in gbar.items()}
    torch.save(state, path)
    resumed = LLQRSAMTrainer(
        model=tiny_vit(seed=99), args=make_args(tmp_path / "again", **kwargs), train_dataset=image_dataset(16)
    )
    with pytest.raises(LLQRSAMStateError, match=re.escape(str(path.resolve()))):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    saved = type(resumed.model).from_pretrained(checkpoint).state_dict()  # applies 5.x's legacy-name renames
    live = resumed.model.state_dict()
    assert saved.keys() == live.keys()
    assert all(torch.equal(live[k], t) for k, t in saved.items())  # the checkpoint's weights: no step ran


# ---------------------------------------------------------------------------------------------- the stock contract
# Each check runs the stock class and ours side by side, in modes none and sam. Under none they must agree exactly;
# under sam the API must agree: the same calls work, with the same keys and files.

MODES_CHECKED = ["none", "sam"]


def _stock_args(out, **overrides) -> TrainingArguments:
    ours = make_args(out, **overrides)
    return TrainingArguments(
        **{f.name: getattr(ours, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    )


def _pair(tmp_path, mode: str, model_fn=tiny_vit, dataset=None, **overrides):
    """(stock Trainer, LLQRSAMTrainer) on the same model, data and settings; ours in `mode`."""
    dataset = image_dataset(16) if dataset is None else dataset
    stock = Trainer(model=model_fn(), args=_stock_args(tmp_path / "stock", **overrides), train_dataset=dataset)
    ours = LLQRSAMTrainer(
        model=model_fn(), args=make_args(tmp_path / "ours", sam_mode=mode, **overrides), train_dataset=dataset
    )
    return stock, ours


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("mode", MODES_CHECKED)
def test_callback_lists_equal_stock(tmp_path, mode):
    stock, ours = _pair(tmp_path, mode)
    assert [type(c) for c in ours.callback_handler.callbacks] == [type(c) for c in stock.callback_handler.callbacks]
    ours.train()  # also after a run (an attempt callback would be registered by then)
    assert [type(c) for c in ours.callback_handler.callbacks] == [type(c) for c in stock.callback_handler.callbacks]


def test_args_none_builds_default_arguments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output_dir is relative
    stock, ours = Trainer(model=tiny_vit()), LLQRSAMTrainer(model=tiny_vit())
    assert isinstance(ours.args, LLQRSAMTrainingArguments) and ours.args.sam_mode == "none" and not ours.args.llqr
    differ = [
        f.name
        for f in dataclasses.fields(TrainingArguments)
        if f.name != "output_dir" and getattr(stock.args, f.name) != getattr(ours.args, f.name)
    ]
    assert not differ and os.path.basename(str(ours.args.output_dir)) == os.path.basename(str(stock.args.output_dir))


@pytest.mark.parametrize("mode", MODES_CHECKED)
def test_training_step_outside_train(tmp_path, mode):
    """A bare `training_step` before `train()` (no optimizer yet) returns the loss and leaves the gradients, as on
    the stock Trainer."""
    stock, ours = _pair(tmp_path, mode)
    batch = {k: v[:4] for k, v in image_dataset(16)[:4].items()}
    for trainer in (stock, ours):  # set by the training loop; stock's training_step reads it outside train() too
        trainer.current_gradient_accumulation_steps = 1
    loss_stock = stock.training_step(stock.model, dict(batch))
    loss_ours = ours.training_step(ours.model, dict(batch))
    assert loss_ours.shape == loss_stock.shape == torch.Size([])
    grads = [p.grad for p in ours.model.parameters()]
    assert all(g is not None for g in grads)
    if mode == "none":
        assert torch.equal(loss_ours, loss_stock)
        assert _same(grads, [p.grad for p in stock.model.parameters()])


@pytest.mark.parametrize("mode", MODES_CHECKED)
def test_model_init_and_a_second_train(tmp_path, mode):
    """`model_init` builds a fresh model at each `train()` (as `hyperparameter_search` does): the second run equals
    the first, and under none equals the stock Trainer's."""

    def make(cls, args):
        return cls(model_init=lambda: tiny_vit(), args=args, train_dataset=image_dataset(16))

    ours = make(LLQRSAMTrainer, make_args(tmp_path / "ours", sam_mode=mode))
    ours.train()
    first = params_of(ours.model)
    ours.train()
    assert _same(first, params_of(ours.model))
    if mode == "none":
        stock = make(Trainer, _stock_args(tmp_path / "stock"))
        stock.train()
        assert _same(first, params_of(stock.model))


class _OutputNet(torch.nn.Module):
    """A plain `nn.Module` returning a dict `{"loss", "logits"}` or a tuple `(loss, logits)`."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        logits = self.body(x)
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits} if self.kind == "dict" else (loss, logits)


def _vector_dataset(n: int = 16) -> datasets.Dataset:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    return datasets.Dataset.from_dict({"x": x.tolist(), "labels": y.tolist()}).with_format("torch")


@pytest.mark.parametrize("mode", MODES_CHECKED)
@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_dict_and_tuple_outputs(tmp_path, mode, kind):
    stock, ours = _pair(tmp_path, mode, model_fn=lambda: _OutputNet(kind), dataset=_vector_dataset())
    stock.train()
    ours.train()
    assert ours.state.global_step == stock.state.global_step == 3
    if mode == "none":
        assert _same(params_of(stock.model), params_of(ours.model))
    else:
        assert not _same(params_of(stock.model), params_of(ours.model))  # SAM took other steps


class _ModelOutputNet(_OutputNet):
    """The same net returning a `ModelOutput` (what HF models return): the dict net's reference."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        out = super().forward(x, labels)
        return SequenceClassifierOutput(loss=out["loss"], logits=out["logits"])


def test_llqr_with_a_dict_output(tmp_path):
    """A model returning a plain dict with "logits" learns the same U and weights as one returning a ModelOutput."""
    runs = []
    for net in (_OutputNet("dict"), _ModelOutputNet("dict")):
        trainer = LLQRSAMTrainer(
            model=net,
            args=make_args(tmp_path, sam_mode="sam", llqr=True, llqr_update_interval=2, llqr_batch_size=4),
            train_dataset=_vector_dataset(),
        )
        trainer.train()
        assert trainer.state.global_step == 3 and trainer.preconditioner.num_updates == 2
        runs.append((params_of(net), trainer.preconditioner.state_dict()["blocks"]))
    (p_dict, u_dict), (p_out, u_out) = runs
    assert _same(p_dict, p_out)
    assert all(torch.equal(u_dict[n][k], u_out[n][k]) for n in u_out for k in u_out[n])


def test_llqr_with_a_tuple_output_is_refused_clearly_before_any_step(tmp_path):
    model = _OutputNet("tuple")
    before = params_of(model)
    ours = LLQRSAMTrainer(
        model=model,
        args=make_args(tmp_path, sam_mode="sam", llqr=True, llqr_update_interval=2, llqr_batch_size=4),
        train_dataset=_vector_dataset(),
    )
    with pytest.raises(ValueError, match="returned tuple, but LLQR needs class logits.*llqr_logits_and_targets"):
        ours.train()
    assert _same(params_of(model), before)  # the first refresh runs before step 0


@pytest.mark.parametrize("mode", MODES_CHECKED)
def test_evaluate_and_predict_agree(tmp_path, mode):
    """Evaluation is untouched by SAM: before training, both give the same metrics, keys and predictions."""
    stock, ours = _pair(tmp_path, mode)
    eval_ds = image_dataset(8, seed=5)
    m_stock, m_ours = stock.evaluate(eval_ds), ours.evaluate(eval_ds)
    assert m_ours.keys() == m_stock.keys() and m_ours["eval_loss"] == m_stock["eval_loss"]
    p_stock, p_ours = stock.predict(eval_ds), ours.predict(eval_ds)
    assert p_ours._fields == p_stock._fields and p_ours.metrics.keys() == p_stock.metrics.keys()
    assert (p_ours.predictions == p_stock.predictions).all() and (p_ours.label_ids == p_stock.label_ids).all()


@pytest.mark.parametrize("mode", MODES_CHECKED)
def test_checkpoint_files_match_stock(tmp_path, mode):
    stock, ours = _pair(tmp_path, mode, save_strategy="steps", save_steps=3)
    stock.train()
    ours.train()
    files_stock = set(os.listdir(tmp_path / "stock" / "checkpoint-3"))
    files_ours = set(os.listdir(tmp_path / "ours" / "checkpoint-3"))
    extra = {STATE_FILE} if mode != "none" else set()  # ours adds its own state file, nothing else
    assert files_ours == files_stock | extra


@pytest.mark.parametrize("mode", MODES_CHECKED)
def test_seq2seq_generation_agrees(tmp_path, mode):
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    from hf_llqrsam import LLQRSAMSeq2SeqTrainer, LLQRSAMSeq2SeqTrainingArguments
    from tests.utils import tiny_marian, tiny_tokenizer, translation_dataset

    tok = tiny_tokenizer()
    ds = translation_dataset(tok)
    common = dict(
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        per_device_eval_batch_size=4,
        predict_with_generate=True,
        generation_max_length=8,
        disable_tqdm=True,
    )
    runs = []
    for trainer_cls, args in (
        (Seq2SeqTrainer, Seq2SeqTrainingArguments(output_dir=str(tmp_path / "stock"), **common)),
        (LLQRSAMSeq2SeqTrainer, LLQRSAMSeq2SeqTrainingArguments(str(tmp_path / "ours"), sam_mode=mode, **common)),
    ):
        model = tiny_marian(tok)
        trainer = trainer_cls(
            model=model, args=args, data_collator=DataCollatorForSeq2Seq(tok, model), processing_class=tok
        )
        runs.append(trainer.predict(ds.select(range(4))))
    stock, ours = runs
    assert ours.metrics.keys() == stock.metrics.keys()
    assert (ours.predictions == stock.predictions).all()  # generation is untouched by SAM


def test_hyperparameter_search_tunes_sam_rho(tmp_path):
    """Each optuna trial trains a fresh model with a fresh SAM state at the trial's rho: the best trial's objective
    equals a plain run at its rho."""
    pytest.importorskip("optuna")
    ds, eval_ds = image_dataset(16), image_dataset(8, seed=5)

    def trainer_for(out, **overrides):
        return LLQRSAMTrainer(
            model_init=lambda: tiny_vit(),
            args=make_args(out, sam_mode="fsam", eval_strategy="no", **overrides),
            train_dataset=ds,
            eval_dataset=eval_ds,
        )

    search = trainer_for(tmp_path / "search")
    best = search.hyperparameter_search(
        hp_space=lambda trial: {"sam_rho": trial.suggest_float("sam_rho", 0.01, 0.5, log=True)},
        compute_objective=lambda metrics: metrics["eval_loss"],
        n_trials=3,
        direction="minimize",
        backend="optuna",
    )
    rho = best.hyperparameters["sam_rho"]
    plain = trainer_for(tmp_path / "plain", sam_rho=rho)
    plain.train()
    assert plain.evaluate()["eval_loss"] == pytest.approx(best.objective, rel=1e-6)


# TRL 1.16 sets and calls gradient_checkpointing names transformers 5 deprecates (an error under pyproject's filter)
TRL_WARNINGS = pytest.mark.filterwarnings("ignore:`[a-z_]*gradient_checkpointing[a-z_]*` is deprecated:FutureWarning")


def _trl_run(tmp_path, stock: bool, mode: str, kind: str):
    """One TRL run, stock or ours: SFT with packing, SFT with a completion-only loss, or DPO; 3 steps."""
    trl = pytest.importorskip("trl")
    from hf_llqrsam.integrations import trl as ours_trl
    from tests.lm_utils import tiny_gpt2
    from tests.utils import WORDS, tiny_tokenizer

    g = torch.Generator().manual_seed(0)

    def words(k: int) -> str:
        return " ".join(WORDS[i] for i in torch.randint(0, 20, (k,), generator=g).tolist())

    common = dict(
        report_to="none",
        max_steps=3,
        save_strategy="steps",
        save_steps=3,
        logging_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        seed=0,
        disable_tqdm=True,
        bf16=False,
        max_length=16,
    )
    ours_kwargs = {} if stock else {"sam_mode": mode, "sam_rho": 0.05}
    out = str(tmp_path / ("stock" if stock else "ours"))
    extra, extra_model = {}, {}
    if kind == "dpo":
        extra_model = {"ref_model": tiny_gpt2()}  # the same initial weights as the policy
        rows = {k: [words(3) for _ in range(12)] for k in ("prompt", "chosen", "rejected")}
        config_cls = trl.DPOConfig if stock else ours_trl.LLQRSAMDPOConfig
        trainer_cls = trl.DPOTrainer if stock else ours_trl.LLQRSAMDPOTrainer
    else:
        if kind == "packing":
            rows = {"text": [words(int(torch.randint(2, 7, (1,), generator=g))) for _ in range(24)]}
            extra = {"packing": True}
        else:
            rows = {"prompt": [words(3) for _ in range(16)], "completion": [words(2) for _ in range(16)]}
            extra = {"completion_only_loss": True}
        config_cls = trl.SFTConfig if stock else ours_trl.LLQRSAMSFTConfig
        trainer_cls = trl.SFTTrainer if stock else ours_trl.LLQRSAMSFTTrainer
    trainer = trainer_cls(
        model=tiny_gpt2(),
        **extra_model,
        args=config_cls(out, **common, **extra, **ours_kwargs),
        train_dataset=datasets.Dataset.from_dict(rows),
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    return trainer, set(os.listdir(os.path.join(out, "checkpoint-3")))


@TRL_WARNINGS
@pytest.mark.parametrize("mode", MODES_CHECKED)
@pytest.mark.parametrize("kind", ["packing", "completion_only", "dpo"])
def test_trl_agrees_with_stock(tmp_path, mode, kind):
    """TRL SFT with packing, with a completion-only loss, and DPO: under none the weights equal the stock trainer's
    bit for bit; under sam the same logged TRL keys and checkpoint files (plus our state file)."""
    stock, stock_files = _trl_run(tmp_path, True, mode, kind)
    ours, ours_files = _trl_run(tmp_path, False, mode, kind)
    assert ours.state.global_step == stock.state.global_step == 3
    assert ours_files == stock_files | ({STATE_FILE} if mode != "none" else set())
    keys_stock = set().union(*(h.keys() for h in stock.state.log_history))
    keys_ours = set().union(*(h.keys() for h in ours.state.log_history))
    assert keys_stock <= keys_ours and all(k.startswith("sam/") for k in keys_ours - keys_stock)
    same = _same(params_of(stock.model), params_of(ours.model))
    assert same if mode == "none" else not same
