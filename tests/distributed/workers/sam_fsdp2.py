"""torchrun worker: SAM and LLQR+SAM under FSDP2 (`fully_shard`, gloo, 2 CPU ranks) through the Trainer.

The model is sharded by hand before the Trainer sees it (`fully_shard` per ViT layer, then the root, on
`init_device_mesh("cpu", (2,))`) and marked as sharded at load time, so the Trainer neither wraps it in DDP nor
shards it again (`docs/integration.md` §7.4): the CPU route to the whole trainer under FSDP2. Every configuration
runs 3 optimizer steps in this one launch; every rank writes `<out>/<name>_rank<r>.pt` with the full parameters
(gathered), its own local shards of U and of the SAM buffers, per-rank memory and collective counts. The test
(`tests/distributed/test_fsdp2_cpu.py`) compares them with single-process runs on the union batch.

Also here, because they need a process group: the FSDP2 facts the design rests on (curvature products through
FSDP2's hooks are zero; on the unsharded view they are exact), the rejections, and one resume through DCP
checkpoints.
"""

import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import state_dict as dcp_state
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers.distributed import DistributedConfig

import hf_llqrsam.engine as engine_module
from hf_llqrsam import LLQRSAMTrainer
from hf_llqrsam.distributed import unsharded_view
from hf_llqrsam.llqr import LLQRConfig, LLQRPreconditioner, curvature_problem
from hf_llqrsam.trainer_support import read_llqrsam_checkpoint, save_llqrsam_files
from tests.utils import SequentialTrainer, image_dataset, make_args, tiny_vit

LLQR = dict(llqr=True, llqr_batch_size=8, llqr_inner_steps=5, llqr_inner_lr=1e-2, llqr_update_interval=2)
# name -> (Trainer arguments, how the model is sharded); the union of the ranks' batches is 4 examples per step
CONFIGS: dict[str, dict[str, Any]] = {
    # 2 steps without LLQR (the second uses the state the first left: ḡ, d, m, g̃ₜ₋₁, g_v), 3 with (refreshes at 0, 2)
    "sam_ga1": dict(sam_mode="sam", per_device_train_batch_size=2, max_steps=2),
    **{  # window GA 2 (the replays unsynced until the last) for the other modes; sam is at GA 1, micro and with U
        f"{mode}_window2": dict(
            sam_mode=mode, per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=2
        )
        for mode in ("asam", "fsam", "fisher_sam", "gsam", "vasso", "infosam", "past_fsam", "wsam")
    },
    "looksam_window2": dict(
        sam_mode="looksam",
        looksam_interval=2,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        max_steps=2,
    ),  # the two-pass step 0, the reuse at 1
    "sam_micro2": dict(
        sam_mode="sam",
        sam_accumulation="micro",
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        max_steps=2,
    ),
    "llqr_sam": dict(sam_mode="sam", per_device_train_batch_size=2, **LLQR),
    "llqr_sam_sharded_curvature": dict(
        sam_mode="sam", per_device_train_batch_size=2, llqr_curvature_sharding="sharded", **LLQR
    ),
    "llqr_fsam_scalar_window2": dict(
        sam_mode="fsam", per_device_train_batch_size=1, gradient_accumulation_steps=2, llqr_structure="scalar", **LLQR
    ),
    # the dry run of SGD with momentum reads the optimizer's sharded momentum buffers (AdamW would turn the ~1e-8
    # summation-order differences of FSDP2's reduce-scatter into ~2e-5 within 3 steps, with or without SAM/LLQR)
    "llqr_apply_update_sgd_momentum": dict(
        per_device_train_batch_size=2, optim="sgd", optim_args="momentum=0.9", llqr_apply="update", **LLQR
    ),
}
# plain DDP (not sharded) in the same launch: the LLQR collectives through Accelerate there too
DDP = {
    "ddp_llqr_sam_sharded_curvature": CONFIGS["llqr_sam_sharded_curvature"],
    "ddp_sam_local": dict(sam_mode="sam", sam_scope="local", per_device_train_batch_size=2),
}
RESUME = dict(
    sam_mode="fsam", per_device_train_batch_size=2, optim="adamw_torch", learning_rate=1e-2, max_steps=4, **LLQR
)  # refreshes at 0 and 2: the second one after the resume


def shard(model: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    """`fully_shard` per layer, then the root; marked as sharded at load time (the Trainer adds no DDP, no FSDP).

    `fully_shard` marks the modules `_is_fsdp_managed_module`, so mid-window the Trainer (5.24) switches FSDP2's
    gradient sync off itself (`_defer_fsdp_gradient_reduction`, as Accelerate's `no_sync` does on its FSDP2 path); it
    reads `config.distributed_config`, which `from_pretrained(distributed_config=...)` would have set.
    """
    for layer in model.vit.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model._is_distributed_loading_by_transformers = True  # a read-only property in transformers 5.24
    model.config.distributed_config = DistributedConfig(fsdp_size=dist.get_world_size())
    return model


class Counter:
    """Counts calls to Accelerate's collectives (the LLQR broadcast and curvature all-reduce, the non-finite vote)."""

    def __init__(self) -> None:
        import accelerate.utils as au

        self.counts = {"broadcast": 0, "reduce": 0}
        for name in self.counts:
            original = getattr(au, name)

            def wrapped(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
                self.counts[_name] += 1
                return _original(*args, **kwargs)

            setattr(au, name, wrapped)

    def take(self) -> dict[str, int]:
        out = dict(self.counts)
        self.counts.update(broadcast=0, reduce=0)
        return out


class Memory:
    """Per-rank bytes of the SAM step's tensors: the backups of θ and ε (recorded at `apply_perturbation_`)."""

    def __init__(self) -> None:
        self.peak = {"backup": 0, "eps": 0}
        original = engine_module.apply_perturbation_

        def wrapped(params: Any, eps: Any) -> Any:
            backups = original(params, eps)
            self.peak["backup"] = max(self.peak["backup"], _local_bytes(backups))
            self.peak["eps"] = max(self.peak["eps"], _local_bytes(eps))
            return backups

        engine_module.apply_perturbation_ = wrapped


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _local_bytes(tensors: Any) -> int:
    return sum(_local(t).numel() * t.element_size() for t in tensors)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def result(trainer: Any, memory: Memory, counter: Counter, sharded: bool) -> dict[str, Any]:
    model = trainer.model
    params = list(model.parameters())
    out: dict[str, Any] = {
        "params": [_full(p.detach()).clone() for p in params],
        "param_local_shapes": {n: tuple(_local(p).shape) for n, p in model.named_parameters()},
        "counts": counter.take(),
        "sharded": sharded,
        "mem": {"params": _local_bytes(params), **memory.peak},
        "sam": {k: {n: _local(t).clone() for n, t in v.items()} for k, v in trainer.sam_state.buffers.items()},
    }
    out["mem"]["sam_state"] = sum(_local_bytes(v.values()) for v in trainer.sam_state.buffers.values())
    memory.peak.update(backup=0, eps=0)
    pre = trainer.preconditioner
    if pre is not None:
        blocks = pre.structure.blocks
        names = dict(model.named_parameters())
        for lay, blk in zip(pre.structure.layouts, blocks, strict=True):
            d = blk.get("d")
            if d is not None and sharded:  # diagonal U: a DTensor sharded exactly like its parameter
                p = names[lay.name]
                assert isinstance(d, DTensor) and d.placements == p.placements and d.device_mesh == p.device_mesh
                assert d.to_local().shape == p.to_local().shape, lay.name
            for t in blk.values():
                assert _local(t).device == torch.empty(0, device=trainer.accelerator.device).device  # cpu:0 is cpu
        out["u_local"] = {
            lay.name: {k: _local(t).clone() for k, t in blk.items()}
            for lay, blk in zip(pre.structure.layouts, blocks, strict=True)
        }
        out["mem"]["u"] = pre.memory_bytes()
        out["num_updates"] = pre.num_updates
    return out


def check_curvature_facts(out_dir: str, mesh: Any) -> None:
    """Through FSDP2's hooks g and G·v are silently zero; on `unsharded_view` they equal one process exactly."""
    ds = image_dataset(16)
    batch = {"pixel_values": ds[:8]["pixel_values"], "labels": ds[:8]["labels"]}
    g_ref, gv_ref = curvature_problem(tiny_vit(), batch)
    v = {n: torch.randn(t.shape, generator=torch.Generator().manual_seed(3)) for n, t in g_ref.items()}
    p_ref = gv_ref(v)
    model = shard(tiny_vit(), mesh)

    def hooked(m: Any, b: Any) -> Any:  # the forward through FSDP2's hooks (the module's __call__)
        inputs = dict(b)
        labels = inputs.pop("labels")
        return m(**inputs).logits, labels, labels != -100

    g_hooks, _ = curvature_problem(model, batch, extractor=hooked)
    hooks_max = max(float(_full(t).abs().max()) for t in g_hooks.values())
    view = unsharded_view(model)
    g, gv = curvature_problem(view, batch)
    p = gv(v)
    g_err = max(float((g[n] - g_ref[n]).abs().max()) for n in g_ref)
    gv_err = max(float((p[n] - p_ref[n]).abs().max()) for n in p_ref)
    view_bytes = sum(t.numel() * t.element_size() for t in view.parameters())
    assert all(isinstance(q, DTensor) for q in model.parameters())  # the view changed nothing
    errors = {}
    try:
        LLQRPreconditioner(model, LLQRConfig(structure="kfac"))
    except ValueError as err:
        errors["kfac"] = str(err)
    try:
        SequentialTrainer(
            model=model,
            args=make_args(out_dir, sam_mode="sam", sam_scope="local", ddp_backend="gloo"),
            train_dataset=ds,
        )
    except ValueError as err:
        errors["local"] = str(err)
    torch.save(
        {
            "hooks_g_max": hooks_max,
            "g_ref_max": max(float(t.abs().max()) for t in g_ref.values()),
            "view_g_err": g_err,
            "view_gv_err": gv_err,
            "view_param_bytes": view_bytes,
            "errors": errors,
        },
        f"{out_dir}/facts_rank{dist.get_rank()}.pt",
    )


class DCPCheckpoints:
    """Model and optimizer checkpoints through DCP, as accelerate's FSDP2 path writes them (SHARDED_STATE_DICT).

    transformers refuses to checkpoint the optimizer of a model sharded before the Trainer (it supports
    `save_strategy="no"` or `save_only_model=True` there), so this test harness saves model and optimizer itself,
    at `save_at`, and stops; the SAM/LLQR state goes through the package's own `save_llqrsam_files` /
    `read_llqrsam_checkpoint` (`hf_llqrsam/trainer_support.py`), the code under test. RNG states and
    trainer_state.json are the Trainer's own.
    """

    save_at: int | None = None

    def _maybe_log_save_evaluate(self, *args: Any, **kwargs: Any) -> None:
        super()._maybe_log_save_evaluate(*args, **kwargs)  # type: ignore[misc]
        if self.state.global_step == self.save_at:
            self._save_checkpoint(self.model, trial=None)
            self.control.should_training_stop = True

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        dcp_save(dcp_state.get_model_state_dict(self.model), checkpoint_id=os.path.join(output_dir, "model_dcp"))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        sd = dcp_state.get_optimizer_state_dict(self.model, self.optimizer.optimizer)
        dcp_save(sd, checkpoint_id=os.path.join(output_dir, "optimizer_dcp"))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))
        save_llqrsam_files(self, output_dir)

    def _load_from_checkpoint(self, checkpoint: str, model: Any = None) -> None:
        sd = dcp_state.get_model_state_dict(self.model)
        dcp_load(sd, checkpoint_id=os.path.join(checkpoint, "model_dcp"))
        dcp_state.set_model_state_dict(self.model, sd)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        sd = dcp_state.get_optimizer_state_dict(self.model, self.optimizer.optimizer)
        dcp_load(sd, checkpoint_id=os.path.join(checkpoint, "optimizer_dcp"))
        dcp_state.set_optimizer_state_dict(self.model, self.optimizer.optimizer, sd)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))
        self._pending_state = read_llqrsam_checkpoint(self, checkpoint)


class ResumeTrainer(DCPCheckpoints, LLQRSAMTrainer):
    """The random sampler (the Trainer's DistributedSampler), AdamW, dropout: what resume must reproduce."""


def resume_results(out_dir: str, mesh: Any) -> None:
    ds = image_dataset(16)
    runs = {}
    for name, save_at, resume in (("full", None, None), ("first", 2, None), ("second", None, "checkpoint-2")):
        args = make_args(f"{out_dir}/resume", ddp_backend="gloo", **RESUME)
        trainer = ResumeTrainer(model=shard(tiny_vit(dropout=0.1), mesh), args=args, train_dataset=ds)
        trainer.save_at = save_at
        trainer.train(resume_from_checkpoint=None if resume is None else f"{out_dir}/resume/{resume}")
        opt = trainer.optimizer.optimizer
        runs[name] = {
            "step": trainer.state.global_step,
            "params": [_full(p.detach()).clone() for p in trainer.model.parameters()],
            "exp_avg": [_full(opt.state[p]["exp_avg"]).clone() for p in trainer.model.parameters()],
            "u": [_full(t).clone() for t in trainer.preconditioner.structure.parameters()],
            "gbar": {n: _full(t).clone() for n, t in trainer.sam_state.buffers["gbar"].items()},
            "num_updates": trainer.preconditioner.num_updates,
        }
    files = sorted(os.listdir(f"{out_dir}/resume/checkpoint-2"))
    dcp_files = sorted(os.listdir(f"{out_dir}/resume/checkpoint-2/llqrsam_dcp"))
    state = torch.load(f"{out_dir}/resume/checkpoint-2/llqrsam_state.pt", weights_only=True)
    torch.save(
        {
            "runs": runs,
            "files": files,
            "dcp_files": dcp_files,
            "format_version": state["format_version"],
            "placeholder": state["llqr"]["blocks"]["classifier.weight"]["d"],
        },
        f"{out_dir}/resume_rank{dist.get_rank()}.pt",
    )


def main(out_dir: str, only: list[str] | None = None) -> None:
    rank = dist.get_rank()
    assert dist.get_world_size() == 2
    mesh = init_device_mesh("cpu", (2,))
    counter, memory = Counter(), Memory()
    if not only or "facts" in only:
        check_curvature_facts(out_dir, mesh)
    ds = image_dataset(16)
    runs = [(n, kw, "fsdp2") for n, kw in CONFIGS.items()]
    runs += [(n, kw, "ddp") for n, kw in DDP.items()]
    runs = [r for r in runs if not only or r[0] in only]
    start = time.perf_counter()
    for name, kw, how in runs:
        args = make_args(out_dir, ddp_backend="gloo", ddp_find_unused_parameters=False, **kw)
        assert args.world_size == 2, f"expected 2 processes, got {args.world_size}"
        model = tiny_vit() if how == "ddp" else shard(tiny_vit(), mesh)
        trainer = SequentialTrainer(model=model, args=args, train_dataset=ds)
        trainer.train()
        if how != "ddp":
            assert type(trainer.model_wrapped).__name__ == "FSDPViTForImageClassification"
        else:
            assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
        torch.save(result(trainer, memory, counter, how != "ddp"), f"{out_dir}/{name}_rank{rank}.pt")
        if rank == 0:
            print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
        start = time.perf_counter()
    if not only or "resume" in only:
        resume_results(out_dir, mesh)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        main(sys.argv[1], sys.argv[2].split(",") if len(sys.argv) > 2 else None)
    finally:
        dist.destroy_process_group()
