"""2-process gloo FSDP2 (torchrun, `fully_shard` on CPU) through the Trainer against single-process references
(`docs/integration.md` §7.4–7.5, I21): every SAM mode, window and micro GA, LLQR+SAM with refreshes, U assembled
from its shards, resume through DCP, the collectives through Accelerate, and the memory per rank.

One torchrun launch runs every configuration (`tests/distributed/workers/sam_fsdp2.py`); the references run here.
"""

import math

import pytest
import torch

from hf_llqrsam.llqr import LLQRConfig, LLQRPreconditioner
from tests.distributed.workers.sam_fsdp2 import CONFIGS, DDP
from tests.utils import SequentialTrainer, image_dataset, make_args, max_abs_diff, params_of, run_torchrun, tiny_vit

pytestmark = pytest.mark.distributed
TOL = 1e-5  # the tolerance; the measured differences are printed (pytest -s) and are ~1e-7
NAMES = [*CONFIGS, *DDP]
EQUAL = [*CONFIGS, "ddp_llqr_sam_sharded_curvature"]  # DDP local scope: m-sharpness, see test_ddp_cpu.py


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    run_torchrun("tests/distributed/workers/sam_fsdp2.py", str(out))

    def load(name: str) -> list[dict]:
        return [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in (0, 1)]

    results = {name: load(name) for name in NAMES}
    results["facts"] = load("facts")
    results["resume"] = load("resume")
    return results


_REFERENCES: dict[str, SequentialTrainer] = {}


def reference(tmp_path, name: str) -> SequentialTrainer:
    """One process on the union batch: both ranks' examples of a step (or micro-batch) at once."""
    kw = dict(CONFIGS.get(name) or DDP[name])
    if kw.get("sam_accumulation") == "micro":  # micro-batch j of the union is samples {2j, 2j+1}
        kw["per_device_train_batch_size"] = 2
    else:  # window GA k × 1 example × 2 ranks = one step of 4 examples
        kw.update(per_device_train_batch_size=4, gradient_accumulation_steps=1)
    kw.pop("llqr_curvature_sharding", None)  # sharded curvature sums the same rows: compared with replicated
    key = repr(sorted(kw.items()))
    if key not in _REFERENCES:
        trainer = SequentialTrainer(model=tiny_vit(), args=make_args(tmp_path, **kw), train_dataset=image_dataset(16))
        trainer.train()
        _REFERENCES[key] = trainer
    return _REFERENCES[key]


def _assembled(ranks: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    """U put together from the two ranks' local shards (dim 0); a replicated scalar c, or DDP's U, as it is."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, block in ranks[0]["u_local"].items():
        out[name] = {
            k: torch.cat([t, ranks[1]["u_local"][name][k]]) if t.dim() and ranks[0]["sharded"] else t
            for k, t in block.items()
        }
    return out


@pytest.mark.parametrize("name", EQUAL)
def test_equals_one_process_on_the_union_batch(fsdp2, tmp_path, name):
    ranks = fsdp2[name]
    ref = reference(tmp_path, name)
    diff = max_abs_diff(ranks[0]["params"], params_of(ref.model))
    moved = max_abs_diff(params_of(tiny_vit()), params_of(ref.model))
    print(f"{name}: max |θ_FSDP2 − θ_1proc| = {diff:.1e} (the run moved θ by {moved:.1e})")
    assert moved > 1e-3 and diff < TOL
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True))
    if ref.preconditioner is not None:
        assert ranks[0]["num_updates"] == ref.preconditioner.num_updates == 2  # refreshes at steps 0 and 2
        single = ref.preconditioner.state_dict()["blocks"]
        assembled = _assembled(ranks)
        u_diff = max(float((assembled[n][k] - single[n][k]).abs().max()) for n in single for k in single[n])
        u_moved = max(float((single[n][k] - 1).abs().max()) for n in single for k in single[n])
        print(f"{name}: max |U_assembled − U_1proc| = {u_diff:.1e} (U moved from I by {u_moved:.1e})")
        assert u_moved > 1e-3 and u_diff < TOL
    for kind, single in ref.sam_state.buffers.items():  # FSAM ḡ, VaSSO d, infoSAM m: sharded like θ, then assembled
        assembled = {n: torch.cat([ranks[0]["sam"][kind][n], ranks[1]["sam"][kind][n]]) for n in single}
        assert max(float((assembled[n] - single[n]).abs().max()) for n in single) < TOL, kind


def test_u_shards_follow_the_parameter_shards(fsdp2):
    """Rank r holds exactly U's entries for its own parameter rows (uneven shards included), so U·g is local."""
    for name in ("llqr_sam", "llqr_apply_update_sgd_momentum"):
        for rank in fsdp2[name]:
            shapes = rank["param_local_shapes"]
            assert {n: tuple(b["d"].shape) for n, b in rank["u_local"].items()} == shapes
    cls = [tuple(r["param_local_shapes"]["vit.embeddings.cls_token"]) for r in fsdp2["llqr_sam"]]
    assert cls == [(1, 1, 16), (0, 1, 16)]  # an empty shard on rank 1
    scalar = fsdp2["llqr_fsam_scalar_window2"]
    assert all(torch.equal(scalar[0]["u_local"][n]["c"], scalar[1]["u_local"][n]["c"]) for n in scalar[0]["u_local"])


def test_memory_per_rank_is_one_shard(fsdp2):
    """U, the backups of θ, ε and the SAM buffers hold this rank's shard only: Σ over ranks = one full copy."""
    full = 4 * sum(p.numel() for p in tiny_vit().parameters())
    for name in ("llqr_sam", "fsam_window2", "llqr_fsam_scalar_window2"):  # ḡ under window GA, U
        mems = [r["mem"] for r in fsdp2[name]]
        assert sum(m["params"] for m in mems) == full
        for m in mems:
            assert m["backup"] == m["eps"] == m["params"] < full
        if name == "llqr_sam":  # diagonal U: the parameter's shard
            assert [m["u"] for m in mems] == [m["params"] for m in mems]
        if "fsam" in name:  # ḡ: the parameter's shard
            assert [m["sam_state"] for m in mems] == [m["params"] for m in mems]
    scalar = LLQRPreconditioner(tiny_vit(), LLQRConfig(structure="scalar")).memory_bytes()  # one c per module
    assert [r["mem"]["u"] for r in fsdp2["llqr_fsam_scalar_window2"]] == [scalar, scalar] and scalar < 100
    ddp = fsdp2["ddp_llqr_sam_sharded_curvature"]
    assert all(r["mem"]["u"] == r["mem"]["params"] == full for r in ddp)  # DDP: every rank holds all of U


def test_collectives_go_through_accelerate(fsdp2):
    """U's broadcast, the sharded curvature sums and the non-finite vote call Accelerate's operations.

    Per refresh the sharded curvature reduces once for (g, N) and once per inner-loop product (5): 2 × 6 = 12. The
    broadcast is one collective per refresh, of every plain tensor of U at once; FSDP2 shards of diagonal U have one
    owner each and are never broadcast. The vote (local scope, DDP) runs once per step.
    """
    counts = {name: fsdp2[name][0]["counts"] for name in NAMES}
    assert counts["llqr_sam"] == {"broadcast": 0, "reduce": 0}
    assert counts["llqr_sam_sharded_curvature"] == {"broadcast": 0, "reduce": 12}
    assert counts["llqr_fsam_scalar_window2"] == {"broadcast": 2, "reduce": 0}  # scalar c is replicated
    assert counts["ddp_llqr_sam_sharded_curvature"] == {"broadcast": 2, "reduce": 12}
    assert counts["ddp_sam_local"] == {"broadcast": 0, "reduce": 3}


def test_curvature_through_fsdp2_hooks_is_zero_and_exact_on_the_unsharded_view(fsdp2):
    """Why the refresh runs on `unsharded_view`: through FSDP2's hooks `autograd.grad` w.r.t. the sharded parameters
    finds them unused (FSDP2 computes with separate unsharded leaves), so g and every G·v are silently zero."""
    for facts in fsdp2["facts"]:
        assert facts["hooks_g_max"] == 0.0 and facts["g_ref_max"] > 1e-2
        assert facts["view_g_err"] < 1e-6 and facts["view_gv_err"] < 1e-6
        assert facts["view_param_bytes"] == 4 * sum(p.numel() for p in tiny_vit().parameters())  # one full copy


def test_unsupported_under_fsdp2_is_rejected_with_the_reason(fsdp2):
    errors = fsdp2["facts"][0]["errors"]
    assert "Invalid LLQRConfig.structure='kfac' under FSDP2: Kronecker factors act on both sides" in errors["kfac"]
    assert "Invalid sam_scope='local' on an FSDP2 (fully_shard) model" in errors["local"]


def test_resume_through_sharded_checkpoints_is_bit_exact(fsdp2):
    """FSAM + LLQR, AdamW, dropout, the random sampler: 2 steps, checkpoint, 2 steps == 4 steps (refreshes at 0 and
    2, the second after the resume). Model and optimizer go through DCP as on accelerate's FSDP2 path; U and ḡ
    through `llqrsam_dcp/` (each rank writes its shards) with placeholders in `llqrsam_state.pt` (format 3)."""
    for rank in fsdp2["resume"]:
        runs = rank["runs"]
        full, first, second = runs["full"], runs["first"], runs["second"]
        assert (full["step"], first["step"], second["step"]) == (4, 2, 4)
        assert full["num_updates"] == second["num_updates"] == 2 and first["num_updates"] == 1
        for key in ("params", "exp_avg", "u"):
            assert all(torch.equal(a, b) for a, b in zip(full[key], second[key], strict=True)), key
        assert all(torch.equal(full["gbar"][n], second["gbar"][n]) for n in full["gbar"])
        assert not math.isclose(max_abs_diff(full["params"], first["params"]), 0.0)
        assert {"llqrsam_state.pt", "llqrsam_dcp", "rng_state_0.pth", "rng_state_1.pth"} <= set(rank["files"])
        assert rank["dcp_files"] == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert rank["format_version"] == 3
        assert rank["placeholder"] == {"__dcp__": "llqr/blocks/classifier.weight/d"}
