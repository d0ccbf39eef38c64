"""torchrun worker: SAM under 2-process gloo DDP, several configurations in one launch.

Writes `<out>/<name>.pt` (rank 0's final parameters) for each configuration; every rank checks that its
parameters equal rank 0's.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from transformers import TrainerCallback

from tests.utils import SequentialTrainer, image_dataset, make_args, params_of, tiny_vit

LLQR = dict(llqr=True, llqr_batch_size=8, llqr_inner_steps=5, llqr_inner_lr=1e-2, llqr_update_interval=2)
CONFIGS = {
    "global_ga1": dict(sam_mode="sam", per_device_train_batch_size=2),
    "global_micro_ga2": dict(
        sam_mode="sam", sam_accumulation="micro", per_device_train_batch_size=1, gradient_accumulation_steps=2
    ),
    "global_window_ga2": dict(sam_mode="fsam", per_device_train_batch_size=1, gradient_accumulation_steps=2),
    "local_ga1": dict(sam_mode="sam", sam_scope="local", per_device_train_batch_size=2),
    "compile_global_ga1": dict(
        sam_mode="sam", per_device_train_batch_size=2, torch_compile=True, torch_compile_backend="aot_eager"
    ),
    "llqr_replicated": dict(sam_mode="sam", per_device_train_batch_size=2, **LLQR),
    "llqr_sharded": dict(sam_mode="sam", per_device_train_batch_size=2, llqr_curvature_sharding="sharded", **LLQR),
}


# global: 2 at GA 1, k + 1 in micro mode, 2 in window mode; local: 1 (pass 2 only)
EXPECTED_ALLREDUCES_PER_STEP = {"global_ga1": 2, "global_micro_ga2": 3, "global_window_ga2": 2, "local_ga1": 1}


def _same_on_all_ranks(flat: torch.Tensor, what: str) -> None:
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), f"{what}: ranks diverged"


class CountAllReduces(TrainerCallback):
    """Counts DDP gradient all-reduces: every all-reduce of the gradients reduces bucket 0 exactly once."""

    def __init__(self, trainer_ref: list) -> None:
        self.trainer_ref, self.count = trainer_ref, 0

    def on_train_begin(self, args, state, control, **kwargs):
        ddp = self.trainer_ref[0].model_wrapped

        def hook(_, bucket):
            if bucket.index() == 0:
                self.count += 1
            return allreduce_hook(None, bucket)

        ddp.register_comm_hook(None, hook)


def main(out_dir: str, names: list[str]) -> None:
    ds = image_dataset(16)
    for name in names:
        args = make_args(out_dir, ddp_find_unused_parameters=False, **CONFIGS[name])
        assert args.world_size == 2, f"expected 2 processes, got {args.world_size}"
        model = tiny_vit()
        ref: list = []
        counter = CountAllReduces(ref)
        trainer = SequentialTrainer(model=model, args=args, train_dataset=ds, callbacks=[counter])
        ref.append(trainer)
        trainer.train()
        if name in EXPECTED_ALLREDUCES_PER_STEP:  # docs/integration.md §7.2
            expected = EXPECTED_ALLREDUCES_PER_STEP[name] * args.max_steps
            assert counter.count == expected, f"{name}: {counter.count} all-reduces, expected {expected}"
        if args.torch_compile:  # the run really went through OptimizedModule(DDP(...))
            assert type(trainer.model_wrapped).__name__ == "OptimizedModule", type(trainer.model_wrapped)
        _same_on_all_ranks(torch.cat([p.reshape(-1) for p in params_of(model)]), name)
        result = {"params": params_of(model)}
        if trainer.preconditioner is not None:
            blocks = trainer.preconditioner.state_dict()["blocks"]
            result["u"] = {n: dict(b) for n, b in blocks.items()}
            _same_on_all_ranks(torch.cat([t.reshape(-1) for b in blocks.values() for t in b.values()]), f"{name} U")
        if dist.get_rank() == 0:
            torch.save(result, f"{out_dir}/{name}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","))
