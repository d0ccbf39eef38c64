"""Hub paths, offline: what `LLQRSAMTrainer` saves loads back with `from_pretrained` (weights equal), and
`push_to_hub` against a stand-in for `huggingface_hub.HfApi` uploads a card that names the method and its tags.

The stand-in records every `create_repo` / `upload_folder` call and the files an upload would send (the Trainer's
`ignore_patterns` applied), reading them at upload time. Local `imagefolder` / `json` / `csv` datasets through the
recipes' `main()` are tested in `tests/recipes/test_recipes.py`.
"""

import fnmatch
import os
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageClassification

from hf_llqrsam import LLQRSAMTrainer
from hf_llqrsam.checkpoint import STATE_FILE
from tests.lm_utils import lm_dataset, lora, tiny_gpt2
from tests.utils import image_dataset, make_args, tiny_vit

LLQR = dict(llqr=True, llqr_batch_size=8, llqr_inner_steps=2, llqr_update_interval=2)


class FakeHub:
    """Stands in for the `HfApi` methods the Trainer calls; nothing leaves the machine."""

    def __init__(self) -> None:
        self.repos: list[str] = []
        self.uploads: list[dict] = []

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append(repo_id)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(
        self, api, *, repo_id, folder_path, path_in_repo=None, ignore_patterns=None, run_as_future=False, **kwargs
    ):
        files = {}
        for root, _, names in os.walk(folder_path):
            for name in names:
                rel = os.path.relpath(os.path.join(root, name), folder_path).replace(os.sep, "/")
                if not any(fnmatch.fnmatch(rel, pattern) for pattern in ignore_patterns or []):
                    files[rel] = Path(root, name).read_bytes()
        self.uploads.append({"repo_id": repo_id, "path_in_repo": path_in_repo, "files": files})
        info = SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}")
        if run_as_future:
            future: Future = Future()
            future.set_result(info)
            return future
        return info


@pytest.fixture
def hub(monkeypatch) -> FakeHub:
    fake = FakeHub()
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda api, repo_id, **kw: fake.create_repo(api, repo_id, **kw)
    )
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda api, **kw: fake.upload_folder(api, **kw))
    return fake


def _card_header_tags(card: str) -> list[str]:
    header = card.split("---")[1]
    return [line[2:].strip() for line in header.splitlines() if line.startswith("- ")]


def test_vit_saved_by_the_trainer_loads_back_and_pushes_a_card_naming_the_method(tmp_path, hub):
    out = tmp_path / "vit-llqrsam"
    args = make_args(
        out,
        sam_mode="sam",
        sam_rho=0.05,
        save_strategy="steps",
        save_steps=3,
        push_to_hub=True,
        hub_model_id="someone/vit-llqrsam",
        hub_strategy="checkpoint",
        **LLQR,
    )
    trainer = LLQRSAMTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(16))
    trainer.train()
    trainer.push_to_hub(commit_message="end of training")

    # from_pretrained round trip: the output dir and the checkpoint hold exactly the trained weights
    trained = trainer.model.state_dict()
    for path in (out, out / "checkpoint-3"):
        loaded = AutoModelForImageClassification.from_pretrained(path).state_dict()
        assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)

    # the uploads: the checkpoint (with the SAM/LLQR state) as last-checkpoint, then the model and its card
    assert hub.repos == ["someone/vit-llqrsam"]
    checkpoint_push = next(u for u in hub.uploads if u["path_in_repo"] == "last-checkpoint")
    assert STATE_FILE in checkpoint_push["files"] and "optimizer.pt" in checkpoint_push["files"]
    final = hub.uploads[-1]
    assert final["path_in_repo"] is None and {"README.md", "config.json", "model.safetensors"} <= final["files"].keys()
    assert not [f for f in final["files"] if f.startswith("checkpoint-") or f == STATE_FILE]
    card = final["files"]["README.md"].decode()
    assert {"hf-llqrsam", "sam", "llqr"} <= set(_card_header_tags(card))
    assert "Trained with `hf_llqrsam`: **LLQR+SAM (rho=0.05) over sgd**" in card and "- llqr_batch_size: 8" in card
    assert card.count("## Training method (hf_llqrsam)") == 1


# peft 0.21 reads `is_gradient_checkpointing`, deprecated in transformers 5.24
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_gpt2_and_its_lora_adapter_load_back(tmp_path, hub):
    peft = pytest.importorskip("peft")

    full_dir, lora_dir = tmp_path / "gpt2", tmp_path / "gpt2-lora"
    full = LLQRSAMTrainer(
        model=tiny_gpt2(), args=make_args(full_dir, sam_mode="sam", **LLQR), train_dataset=lm_dataset()
    )
    full.train()
    full.save_model()
    loaded = AutoModelForCausalLM.from_pretrained(full_dir).state_dict()
    trained = full.model.state_dict()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)

    adapted = LLQRSAMTrainer(
        model=lora(tiny_gpt2(), ["c_attn"]),
        args=make_args(lora_dir, sam_mode="sam", **LLQR),
        train_dataset=lm_dataset(),
    )
    adapted.train()
    adapted.push_to_hub(commit_message="adapter")  # also saves the adapter to lora_dir
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= hub.uploads[-1]["files"].keys()
    assert "model.safetensors" not in hub.uploads[-1]["files"]
    assert "LLQR+SAM (rho=0.1)" in hub.uploads[-1]["files"]["README.md"].decode()
    reloaded = peft.PeftModel.from_pretrained(tiny_gpt2(), lora_dir)
    ours = {n: p for n, p in adapted.model.named_parameters() if "lora_" in n}
    theirs = dict(reloaded.named_parameters())
    assert ours and all(torch.equal(p, theirs[n]) for n, p in ours.items())
