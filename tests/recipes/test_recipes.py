"""Recipe entry points: `main(argv)` on tiny settings, the data/model/metric paths and the argument errors.

Everything runs offline on CPU: the embedded digits and number phrases, tiny models built from configs, hub-style
checkpoints saved to `tmp_path`, and a simulated offline hub.
"""

import importlib.util
import json
import logging
import re
import shlex
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import (
    AutoTokenizer,
    MarianConfig,
    MarianMTModel,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

from hf_llqrsam.card import method_card_section

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def image() -> ModuleType:
    return _load(RECIPES / "image_classification" / "run_image_classification.py")


@pytest.fixture(scope="module")
def translation() -> ModuleType:
    return _load(RECIPES / "translation" / "run_translation.py")


COMMON = ["--max_steps", "3", "--eval_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "true"]
TINY_VIT = [
    "--hidden_size",
    "32",
    "--num_hidden_layers",
    "1",
    "--num_attention_heads",
    "2",
    "--intermediate_size",
    "32",
]
TINY_IMAGE = [*COMMON, *TINY_VIT, "--per_device_train_batch_size", "8", "--max_train_samples", "32"]
TINY_IMAGE += ["--max_eval_samples", "16", "--max_predict_samples", "16"]
TINY_MARIAN = ["--d_model", "16", "--ffn_dim", "32", "--encoder_layers", "1", "--decoder_layers", "1"]
TINY_MARIAN += ["--attention_heads", "2", "--tokenizer_vocab_size", "200"]
TINY_TRANSLATION = [*COMMON, *TINY_MARIAN, "--per_device_train_batch_size", "8", "--max_train_samples", "32"]
TINY_TRANSLATION += ["--max_eval_samples", "8", "--max_predict_samples", "8", "--generation_max_length", "8"]


def _results(output_dir: Path) -> dict[str, float]:
    return json.loads((output_dir / "all_results.json").read_text())


def _assert_fraction_of(value: float, n: int) -> None:
    """An accuracy over n examples is k/n for an integer k: a made-up or mis-scaled number fails this."""
    assert 0.0 <= value <= 1.0 and abs(value * n - round(value * n)) < 1e-6, (value, n)


def _logged(output_dir: Path, key: str) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry[key] for entry in history if key in entry]


def _bleu_of_predictions(output_dir: Path, references: list[str]) -> float:
    import sacrebleu

    predictions = (output_dir / "generated_predictions.txt").read_text(encoding="utf-8").split("\n")
    return sacrebleu.corpus_bleu(predictions, [references]).score


def test_each_recipe_has_its_own_git_ignored_default_output_dir(image, translation):
    """Two recipes run without --output_dir (e.g. the README's CPU DDP launches) must not share transformers'
    default `trainer_output/`: the second would silently resume the first's checkpoints and train nothing."""
    pytest.importorskip("peft")
    causal_lm = _load(RECIPES / "causal_lm" / "run_causal_lm.py")
    dirs = [module.parse_args([])[-1].output_dir for module in (image, translation, causal_lm)]
    assert dirs == ["runs/image_classification", "runs/translation", "runs/causal_lm"]
    assert "runs/" in (REPO / ".gitignore").read_text().splitlines()


# --- image classification ------------------------------------------------------------------------------------


def test_image_embedded_digits_writes_results_and_card(image, tmp_path):
    results = image.main(["--output_dir", str(tmp_path), *TINY_IMAGE])
    saved = _results(tmp_path)
    for key in ["train_loss", "eval_accuracy", "test_accuracy"]:
        assert key in saved and saved[key] == results[key]
    _assert_fraction_of(saved["test_accuracy"], 16)
    _assert_fraction_of(saved["eval_accuracy"], 16)
    card = (tmp_path / "README.md").read_text()
    assert "hf-llqrsam" in card and "image-classification" in card
    assert "adamw_torch_fused (no SAM)" in card and "- sam_mode: none" in card
    # a ViT built from its config: "trained from scratch", not an empty Hub link; the test metrics are reported
    assert (
        "This model was trained from scratch on the sklearn digits dataset." in card and "huggingface.co/)" not in card
    )
    assert (
        f"- test_accuracy: {round(saved['test_accuracy'], 4)}\n" in card and "- optimizer: torch.optim.AdamW(" in card
    )


def test_image_sam_mode_sam_runs_and_names_the_method(image, tmp_path):
    image.main(
        ["--output_dir", str(tmp_path), *TINY_IMAGE, "--sam_mode", "sam", "--sam_rho", "0.05", "--logging_steps", "1"]
    )
    _assert_fraction_of(_results(tmp_path)["test_accuracy"], 16)
    assert _logged(tmp_path, "sam/rho") and set(_logged(tmp_path, "sam/rho")) == {0.05}  # SAM really ran, at ρ
    assert all(abs(norm - 0.05) < 1e-6 for norm in _logged(tmp_path, "sam/perturbation_norm"))
    card = (tmp_path / "README.md").read_text()
    assert "- sam\n" in card  # tag
    assert "SAM (rho=0.05)" in card and "- sam_rho: 0.05" in card and "llqr_" not in card


def test_image_llqr_card_lists_llqr_settings(image):
    _, _, args = image.parse_args(["--output_dir", "x", "--sam_mode", "sam", "--llqr", "--llqr_ema_decay", "0.9"])
    section = method_card_section(args)
    assert "LLQR+SAM (rho=0.1)" in section and "- llqr_ema_decay: 0.9" in section and "- llqr: True" in section


def test_image_hub_checkpoint_gets_a_resized_head(image, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    ViTForImageClassification(config).save_pretrained(checkpoint)
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(checkpoint)
    output_dir = tmp_path / "out"
    image.main(["--output_dir", str(output_dir), "--model_name_or_path", str(checkpoint), *TINY_IMAGE])
    _assert_fraction_of(_results(output_dir)["test_accuracy"], 16)
    saved_config = json.loads((output_dir / "config.json").read_text())
    assert len(saved_config["id2label"]) == 10 and saved_config["label2id"]["7"] == 7
    assert (saved_config["image_size"], saved_config["hidden_size"]) == (16, 32)  # the checkpoint's, not TINY_VIT's


def _write_imagefolder(root: Path, classes: list[str], per_class: int) -> None:
    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (rng.random((12, 12, 3)) * 100 + 120 * label).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_image_local_imagefolder(image, tmp_path):
    _write_imagefolder(tmp_path / "train", ["cat", "dog"], per_class=6)
    _write_imagefolder(tmp_path / "validation", ["cat", "dog"], per_class=2)
    output_dir = tmp_path / "out"
    argv = ["--output_dir", str(output_dir), *TINY_IMAGE, "--do_predict", "false"]
    image.main([*argv, "--train_dir", str(tmp_path / "train"), "--validation_dir", str(tmp_path / "validation")])
    _assert_fraction_of(_results(output_dir)["eval_accuracy"], 4)  # the 4 validation images
    assert json.loads((output_dir / "config.json").read_text())["id2label"] == {"0": "cat", "1": "dog"}


def test_image_resumes_from_the_last_checkpoint(image, tmp_path, caplog):
    argv = [*TINY_IMAGE, "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1"]
    argv += ["--do_eval", "false", "--do_predict", "false", "--log_level", "info"]
    image.main(["--output_dir", str(tmp_path / "first"), *argv, "--max_steps", "2"])
    checkpoint = tmp_path / "first" / "checkpoint-2"
    first = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    shutil.copytree(checkpoint, tmp_path / "checkpoint-2")
    with caplog.at_level(logging.INFO):
        image.main(["--output_dir", str(tmp_path), *argv, "--max_steps", "3"])
    assert f"Resuming from {tmp_path / 'checkpoint-2'} (step 2 of 2)" in caplog.text
    resumed = json.loads((tmp_path / "trainer_state.json").read_text())
    assert resumed["global_step"] == 3 and resumed["log_history"][:2] == first[:2]

    # An explicit --resume_from_checkpoint is passed through: with another seed, a fresh run would log other losses.
    elsewhere = tmp_path / "elsewhere"
    argv += ["--max_steps", "3", "--seed", "7", "--resume_from_checkpoint", str(checkpoint)]
    image.main(["--output_dir", str(elsewhere), *argv])
    resumed = json.loads((elsewhere / "trainer_state.json").read_text())
    assert resumed["global_step"] == 3 and resumed["log_history"][:2] == first[:2]


def test_image_unknown_column_names_the_flag(image, tmp_path):
    with pytest.raises(ValueError, match="--image_column_name 'img' not found in the 'train' split"):
        image.main(["--output_dir", str(tmp_path), *TINY_IMAGE, "--image_column_name", "img"])


def test_image_accuracy_sources_agree(image):
    rng = np.random.default_rng(0)
    predictions, references = rng.integers(0, 10, 200), rng.integers(0, 10, 200)
    local = image.load_accuracy("local")(predictions=predictions, references=references)
    fallback = image.load_accuracy("fallback")(predictions=predictions, references=references)
    hub_or_fallback = image.load_accuracy("hub")(predictions=predictions, references=references)  # offline: fallback
    assert local == fallback == hub_or_fallback
    assert local["accuracy"] == float(np.mean(predictions == references))


# --- translation ---------------------------------------------------------------------------------------------


def test_translation_embedded_phrases_writes_results_and_tokenizer(translation, tmp_path):
    results = translation.main(["--output_dir", str(tmp_path), *TINY_TRANSLATION])
    saved = _results(tmp_path)
    for key in ["train_loss", "eval_bleu", "test_bleu", "eval_gen_len"]:
        assert key in saved and saved[key] == results[key]
    assert len((tmp_path / "generated_predictions.txt").read_text().split("\n")) == 8
    sys.path.insert(0, str(RECIPES / "translation"))
    from number_phrases import load_number_phrase_dataset

    references = [pair["en"] for pair in load_number_phrase_dataset()["test"][:8]["translation"]]
    assert saved["test_bleu"] == pytest.approx(_bleu_of_predictions(tmp_path, references), abs=1e-3)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.decode(tokenizer("3. März 2021")["input_ids"], skip_special_tokens=True) == "3. März 2021"
    card = (tmp_path / "README.md").read_text()
    assert "hf-llqrsam" in card and "translation" in card and "- sam_mode: none" in card
    assert "This model was trained from scratch" in card and f"- test_bleu: {round(saved['test_bleu'], 4)}\n" in card


def test_translation_number_phrase_splits_are_disjoint():
    sys.path.insert(0, str(RECIPES / "translation"))
    from number_phrases import load_number_phrase_dataset

    dataset = load_number_phrase_dataset()
    sources = {split: {pair["de"] for pair in dataset[split]["translation"]} for split in dataset}
    assert not sources["train"] & sources["validation"]
    assert not sources["train"] & sources["test"]
    assert not sources["validation"] & sources["test"]
    assert len(sources["test"]) == 1000 and len(sources["validation"]) == 500
    assert load_number_phrase_dataset()["test"]["translation"] == dataset["test"]["translation"]


def test_translation_hub_checkpoint(translation, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    texts = ["eins", "one", "zwei", "two", "3. März 2021", "March 3, 2021"] * 5
    tokenizer = translation.train_tokenizer(texts, vocab_size=100, model_max_length=32)
    config = MarianConfig(
        vocab_size=len(tokenizer),
        decoder_vocab_size=len(tokenizer),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    MarianMTModel(config).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    output_dir = tmp_path / "out"
    translation.main(["--output_dir", str(output_dir), "--model_name_or_path", str(checkpoint), *TINY_TRANSLATION])
    assert 0.0 <= _results(output_dir)["test_bleu"] <= 100.0
    saved_config = json.loads((output_dir / "config.json").read_text())
    assert saved_config["d_model"] == 16 and saved_config["vocab_size"] == len(tokenizer)  # the checkpoint's model


def test_translation_local_json_and_csv_files(translation, tmp_path):
    pairs = [{"de": f"{i} Äpfel", "en": f"{i} apples"} for i in range(40)]
    for split, rows in [("train", pairs[:32]), ("validation", pairs[32:])]:
        lines = [json.dumps({"translation": row}, ensure_ascii=False) for row in rows]
        (tmp_path / f"{split}.json").write_text("\n".join(lines), encoding="utf-8")
    output_dir = tmp_path / "json"
    argv = ["--output_dir", str(output_dir), *TINY_TRANSLATION, "--do_predict", "false"]
    translation.main(
        [*argv, "--train_file", str(tmp_path / "train.json"), "--validation_file", str(tmp_path / "validation.json")]
    )
    assert 0.0 <= _results(output_dir)["eval_bleu"] <= 100.0
    predictions = output_dir / "generated_predictions.txt"
    assert not predictions.exists()  # --do_predict false: no test pass

    csv = "german,english\n" + "\n".join(f"{row['de']},{row['en']}" for row in pairs)
    (tmp_path / "train.csv").write_text(csv, encoding="utf-8")
    argv = ["--output_dir", str(tmp_path / "csv"), *TINY_TRANSLATION, "--do_eval", "false", "--do_predict", "false"]
    argv += ["--train_file", str(tmp_path / "train.csv"), "--source_column", "german", "--target_column", "english"]
    translation.main(argv)
    csv_results = _results(tmp_path / "csv")
    assert csv_results["train_loss"] > 0 and csv_results["train_samples"] == 32  # --max_train_samples of 40 rows


def test_translation_unknown_language_and_column_name_the_flag(translation, tmp_path):
    with pytest.raises(ValueError, match="--source_lang 'fr' not found in the 'translation' column"):
        translation.main(["--output_dir", str(tmp_path), *TINY_TRANSLATION, "--source_lang", "fr"])
    with pytest.raises(ValueError, match="--translation_column 'pairs' not found"):
        translation.main(["--output_dir", str(tmp_path), *TINY_TRANSLATION, "--translation_column", "pairs"])


def test_translation_bleu_sources_agree(translation):
    predictions = ["three thousand and five", "May 3, 2021", "twelve euro, fifty cents", "2:30 PM"]
    references = [["three thousand and five"], ["March 3, 2021"], ["twelve euro, fifty cent"], ["2:30 AM"]]
    local = translation.load_bleu("local")(predictions=predictions, references=references)["score"]
    fallback = translation.load_bleu("fallback")(predictions=predictions, references=references)["score"]
    assert local == fallback
    assert 0 < local < 100


# --- arguments -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["image", "translation"])
def test_unknown_sam_mode_exits_with_the_choices(recipe, request, capsys):
    module = request.getfixturevalue(recipe)
    with pytest.raises(SystemExit) as excinfo:
        module.parse_args(["--output_dir", "x", "--sam_mode", "sharp"])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "--sam_mode" in err and "invalid choice: 'sharp'" in err


@pytest.mark.parametrize("recipe", ["image", "translation"])
@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--sam_mode", "sam", "--sam_rho", "1e400"], "sam_rho"),
        (["--sam_mode", "gsam", "--sam_scope", "local"], "sam_scope"),
    ],
)
def test_bad_value_is_a_one_line_error(recipe, request, capsys, argv, flag):
    """A value the arguments reject exits 2 with one line naming the flag, not a traceback through __post_init__."""
    module = request.getfixturevalue(recipe)
    with pytest.raises(SystemExit) as excinfo:
        module.parse_args(["--output_dir", "x", *argv])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and "Traceback" not in err


@pytest.mark.parametrize("recipe", ["image", "translation"])
def test_sam_flags_parse(recipe, request):
    module = request.getfixturevalue(recipe)
    _, _, args = module.parse_args(["--output_dir", "x", "--sam_mode", "sam", "--sam_rho", "0.05", "--llqr"])
    assert (args.sam_mode, args.sam_rho, args.llqr) == ("sam", 0.05, True)


@pytest.mark.parametrize("recipe", ["image", "translation"])
def test_dataset_name_without_network_is_a_one_line_error(recipe, request, tmp_path, monkeypatch):
    module = request.getfixturevalue(recipe)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # what a machine without network sees, at once
    with pytest.raises(
        SystemExit, match="--dataset_name 'uoft-cs/cifar10': the Hugging Face Hub could not be reached"
    ):
        module.main(["--output_dir", str(tmp_path), "--dataset_name", "uoft-cs/cifar10"])


def test_config_file_with_command_line_overrides(image, tmp_path):
    config = {"learning_rate": "1e-4", "sam_mode": "sam", "sam_rho": 0.2, "do_predict": False, "report_to": "none"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    _, data_args, args = image.parse_args([str(path), "--output_dir", "x", "--sam_rho", "0.3"])
    assert (args.learning_rate, args.sam_mode, args.sam_rho, args.do_predict) == (1e-4, "sam", 0.3, False)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"output_dir": "y", "label_column_name": "fine_label"}))
    _, data_args, args = image.parse_args([str(path)])
    assert (args.output_dir, data_args.label_column_name) == ("y", "fine_label")


@pytest.mark.parametrize(
    "config",
    sorted(path for path in RECIPES.glob("*/configs/*.yaml") if path.parent.parent.name != "causal_lm"),  # own test
    ids=lambda path: f"{path.parent.parent.name}/{path.name}",
)
def test_shipped_configs_parse(config, image, translation):
    module = image if config.parent.parent.name == "image_classification" else translation
    _, _, args = module.parse_args([str(config), "--output_dir", "x"])
    assert args.output_dir == "x"


# --- re-runs, logging, warnings ------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["image", "translation"])
def test_rerun_warns_keeps_the_results_and_fresh_starts_over(recipe, request, tmp_path, caplog):
    """A second identical run into the same --output_dir resumes from checkpoint-3 = max_steps: it says so at
    WARNING and leaves all_results.json / train_results.json and the checkpoints as the first run wrote them (no
    train_loss 0; step 3 is mid-epoch, where transformers 5 would train a 4th step). --fresh deletes the checkpoints
    and trains again from step 0."""
    module = request.getfixturevalue(recipe)
    tiny = TINY_IMAGE if recipe == "image" else TINY_TRANSLATION
    argv = ["--output_dir", str(tmp_path), *tiny, "--save_strategy", "steps", "--save_steps", "3"]
    argv += ["--do_predict", "false", "--logging_steps", "1"]
    module.main(argv)
    first = _results(tmp_path)
    first_train = (tmp_path / "train_results.json").read_text()
    assert first["train_loss"] > 0 and "eval_loss" in first

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        second = module.main(argv)
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"Resuming from {tmp_path / 'checkpoint-3'} (step 3 of 3)" in warned and "pass --fresh" in warned
    assert "Nothing left to train" in warned and f"train_loss {first['train_loss']:.4g}" in warned
    assert second == first == _results(tmp_path)
    assert (tmp_path / "train_results.json").read_text() == first_train
    assert [path.name for path in tmp_path.glob("checkpoint-*")] == ["checkpoint-3"]
    assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 3

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fresh = module.main([*argv, "--fresh", "--max_steps", "2", "--save_steps", "2", "--seed", "7"])
    assert "Resuming" not in caplog.text and "--fresh: deleting 1 checkpoint folder(s)" in caplog.text
    assert [path.name for path in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"]
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["log_history"][0]["step"] == 1
    assert 0 < fresh["train_loss"] == _results(tmp_path)["train_loss"] != first["train_loss"]


def test_fresh_and_resume_from_checkpoint_contradict(image, tmp_path):
    with pytest.raises(ValueError, match="--fresh starts over and --resume_from_checkpoint resumes"):
        image.main(["--output_dir", str(tmp_path), *TINY_IMAGE, "--fresh", "--resume_from_checkpoint", "x"])


def test_hf_llqrsam_info_lines_are_shown_once(image, tmp_path, capsys):
    """After the recipe's logging set-up (a tiny --llqr run), an INFO line of `hf_llqrsam.trainer` (where the LLQR
    refresh timings are logged) reaches stdout exactly once; `--log_level warning` hides it."""
    trainer_logger = logging.getLogger("hf_llqrsam.trainer")
    package_level = logging.getLogger("hf_llqrsam").level
    root_handlers = logging.root.handlers[:]
    logging.root.handlers.clear()  # as in `python run_image_classification.py`, where basicConfig adds the handler
    try:
        argv = ["--output_dir", str(tmp_path), *TINY_IMAGE, "--do_eval", "false", "--do_predict", "false"]
        argv += ["--sam_mode", "sam", "--llqr", "--llqr_update_interval", "2", "--llqr_batch_size", "16"]
        image.main([*argv, "--llqr_inner_steps", "3", "--max_grad_norm", "0"])
        assert trainer_logger.isEnabledFor(logging.INFO) and trainer_logger.hasHandlers()
        capsys.readouterr()
        trainer_logger.info("LLQR refresh 1 at step 2: 0.01 s")
        out = capsys.readouterr().out
        assert out.count("INFO - hf_llqrsam.trainer - LLQR refresh 1 at step 2: 0.01 s") == 1, out

        _, _, args = image.parse_args(["--output_dir", str(tmp_path), "--log_level", "warning"])
        image.recipe_utils.setup_logging(image.logger, args)
        assert not trainer_logger.isEnabledFor(logging.INFO)
    finally:
        logging.root.handlers[:] = root_handlers
        logging.getLogger("hf_llqrsam").setLevel(package_level)


def test_cpu_run_repeats_no_warning(image, tmp_path, capsys):
    """No pin_memory warning (one per DataLoader iterator without an accelerator), no warning twice, and no
    "Writing model shards" bar per checkpoint, in a tiny run that evaluates and saves at every step."""
    _, _, args = image.parse_args(["--output_dir", "x"])
    assert args.dataloader_pin_memory == torch.accelerator.is_available()
    argv = ["--output_dir", str(tmp_path), *TINY_IMAGE, "--eval_strategy", "steps", "--eval_steps", "1"]
    argv += ["--save_strategy", "steps", "--save_steps", "1", "--disable_tqdm", "false"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image.main(argv)
    messages = [str(warning.message) for warning in caught]
    assert not [message for message in messages if "pin_memory" in message]
    assert not {message for message in messages if messages.count(message) > 1}, messages
    assert "Writing model shards" not in capsys.readouterr().err


# --- the recipe READMEs' commands ----------------------------------------------------------------------------

READMES = [RECIPES / "README.md", RECIPES / "image_classification/README.md", RECIPES / "translation/README.md"]
READMES.append(RECIPES / "causal_lm/README.md")


def _commands(readme: Path) -> list[list[str]]:
    """The commands of the fenced bash blocks (continuation lines joined, comments dropped) and of inline code
    spans that start with python / torchrun / accelerate, as argument lists."""
    text = readme.read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += re.sub(r"\\\n\s*", " ", block).splitlines()
    lines += [" ".join(span.split()) for span in re.findall(r"`((?:python|torchrun|accelerate) [^`]+)`", text)]
    return [tokens for line in lines if (tokens := shlex.split(line, comments=True))]


@pytest.mark.parametrize("readme", READMES, ids=lambda path: str(path.relative_to(REPO)))
def test_readme_commands_run_from_the_repository_root(readme):
    """Every path-looking argument (recipes/..., *.py, *.yaml) exists relative to the repository root; every
    `--optim sgd` sets a momentum in --optim_args (transformers' sgd has none); every torchrun has --use_cpu
    (without it, torchrun on CPU starts independent non-DDP runs)."""
    commands = _commands(readme)
    for tokens in commands:
        command = " ".join(tokens)
        values = [token.split("=", 1)[-1] if token.startswith("--") else token for token in tokens]
        for value in values:
            if value.startswith("recipes/") or value.endswith((".py", ".yaml", ".yml")):
                assert (REPO / value).exists(), f"{readme.name}: {value!r} does not exist in: {command}"
        options = dict(zip(tokens, [*tokens[1:], ""], strict=True))
        if options.get("--optim") == "sgd":
            momentum = re.search(r"momentum=([0-9.e-]+)", options.get("--optim_args", ""))
            assert momentum and float(momentum.group(1)) > 0, f"{readme.name}: SGD without momentum: {command}"
        if "torchrun" in tokens:
            assert "--use_cpu" in tokens, f"{readme.name}: torchrun without --use_cpu: {command}"
    if readme.parent != RECIPES:
        assert commands and any(token.endswith(".py") for tokens in commands for token in tokens)
