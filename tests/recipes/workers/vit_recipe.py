"""Runs the ViT recipe's `main()`; optionally SIGKILLs itself right after saving a given checkpoint.

`KILL_AFTER_CHECKPOINT=N`: the process is killed (SIGKILL, no cleanup) as soon as checkpoint-N is on disk.
Under torchrun it also asserts that two processes really ran.
"""

import os
import signal
import sys

import torch.distributed as dist
from transformers import Trainer

from recipes.image_classification.run_image_classification import main

kill_at = int(os.environ.get("KILL_AFTER_CHECKPOINT", "0"))
if kill_at:
    original_save = Trainer._save_checkpoint

    def save_then_die(self, *args, **kwargs):
        original_save(self, *args, **kwargs)
        if self.state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer._save_checkpoint = save_then_die

metrics = main(sys.argv[1:])
if "WORLD_SIZE" in os.environ:
    assert dist.is_initialized() and dist.get_world_size() == 2, "expected 2 processes"
