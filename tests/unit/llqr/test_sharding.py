"""`hf_llqrsam.llqr.sharding` on plain tensors (one process): every helper is the identity, and `is_dtensor` is False
without importing `torch.distributed.tensor`. The DTensor side is tested under FSDP2 (tests/distributed)."""

import torch

from hf_llqrsam.llqr.sharding import full_tensor, is_dtensor, local_tensor, shard_like


def test_plain_tensors_pass_through_unchanged():
    t = torch.randn(4, 3)
    assert not is_dtensor(t)
    assert full_tensor(t) is t and local_tensor(t) is t
    assert torch.equal(shard_like(t, torch.empty(4, 3)), t)
