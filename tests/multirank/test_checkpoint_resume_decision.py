"""Ranks resume the checkpoint rank 0 chose (training/checkpointing.py ``_decide_resume``),
even when another rank's view of ``save_dir`` differs (attribute caching, a read error)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from genlip_megatron.config.training import CheckpointConfig
from genlip_megatron.training import checkpointing as ck


@pytest.mark.world_size(2)
def test_every_rank_resumes_rank_0s_choice(monkeypatch):
    save = Path("/nonexistent/save")
    if dist.get_rank() == 0:
        done = [save / "iter_0000002", save / "iter_0000004"]
        monkeypatch.setattr(ck, "finished_checkpoints", lambda d: done)
        monkeypatch.setattr(ck, "resolve_checkpoint", lambda d, warn=None: done[-1])
    else:   # rank 1 sees nothing at all: alone it would start over
        monkeypatch.setattr(ck, "finished_checkpoints", lambda d: [])
        monkeypatch.setattr(ck, "resolve_checkpoint", lambda d, warn=None: None)
    manager = ck.CheckpointManager(CheckpointConfig(save_dir=str(save)))
    done, ckpt = manager._decide_resume(save)
    assert ckpt == save / "iter_0000004" and len(done) == 2


@pytest.mark.world_size(2)
def test_rank_0_failure_is_raised_on_every_rank(monkeypatch):
    def broken(d, warn=None):
        raise ck.CheckpointError("latest names iter_9 which is damaged")

    monkeypatch.setattr(ck, "finished_checkpoints", lambda d: [Path("/x/iter_0000001")])
    if dist.get_rank() == 0:
        monkeypatch.setattr(ck, "resolve_checkpoint", broken)
    manager = ck.CheckpointManager(CheckpointConfig(save_dir="/x"))
    with pytest.raises(ck.CheckpointError, match="iter_9"):
        manager._decide_resume(Path("/x"))


@pytest.mark.world_size(2)
def test_ranks_agree_on_the_damage_check(monkeypatch):
    """One rank's damaged read is every rank's (no rank goes on into the load alone); one
    rank's transient read error makes every rank retry, none calls it damaged."""
    import errno

    ckpt = Path("/nonexistent/save/iter_0000004")
    rank = dist.get_rank()
    seen = {0: "", 1: "__0_1.distcp is truncated (10 of ≥ 99 bytes)"}
    monkeypatch.setattr(ck, "diagnose_checkpoint", lambda c: seen[rank])
    assert ck._agree_on_problem(ckpt) == seen[1]

    def flaky(c):
        if rank == 0:
            raise OSError(errno.ESTALE, "Stale file handle", str(c / "metadata.json"))
        return ""

    monkeypatch.setattr(ck, "diagnose_checkpoint", flaky)
    with pytest.raises(ck.TransientReadError) as err:
        ck._agree_on_problem(ckpt)
    assert "metadata.json" in str(err.value) and ck.transient_cause(err.value) is err.value
