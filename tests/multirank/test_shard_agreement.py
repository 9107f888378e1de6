"""Ranks agree on the shard partition (training/agreement.py ``agree_on_shards``) on 2 gloo
ranks: a transient read error on rank 1 only (``GENLIP_FAULT_INJECT=shards:check=EIO*1:rank1``)
leaves that shard out on BOTH ranks, so they partition the same shard list; the shard is
counted once over the ranks and logged once (rank 0)."""

from __future__ import annotations

import logging

import pytest
import torch.distributed as dist

from genlip_megatron.config import load_config
from genlip_megatron.data.loader import PackedLoader
from genlip_megatron.data.shards import rank_streams
from genlip_megatron.training import faults
from genlip_megatron.training.agreement import agree_on_shards

from training_helpers import TINY_CONFIG, tiny_overrides


def _gathered(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@pytest.fixture
def read_error_on_rank_1(monkeypatch):
    monkeypatch.setenv(faults.ENV, "shards:check=EIO*1:rank1")
    monkeypatch.setattr(faults, "_FIRED", {})


@pytest.mark.world_size(2)
def test_read_error_on_one_rank_leaves_the_shard_out_on_every_rank(data_dir, caplog,
                                                                   read_error_on_rank_1):
    cfg = load_config(TINY_CONFIG, tiny_overrides(data_dir, data__reader__num_workers=0)).data
    with caplog.at_level(logging.INFO):
        survey = agree_on_shards(cfg.sources)
        loader = PackedLoader(cfg, dp_rank=dist.get_rank(), dp_size=2, micro_batch_size=1,
                              seed=5, survey=survey)
    listed = survey.paths[0]
    assert survey.problems == {listed[0]: "unreachable"}   # the first shard rank 1 checked
    views = _gathered((survey.paths, survey.problems, loader._shards))
    assert views[0] == views[1]
    assert loader._shards == [listed[1:]]
    # the two ranks' shares of every epoch are disjoint and cover the agreed list
    for epoch in range(3):
        shares = [sum(rank_streams(listed[1:], seed=5, source=0, epoch=epoch, dp_rank=r,
                                   dp_size=2, streams=4, shuffle=True), []) for r in (0, 1)]
        assert not set(shares[0]) & set(shares[1])
        assert sorted(shares[0] + shares[1]) == listed[1:]
    counted = _gathered(loader.counters()["shards/unreachable"])
    assert sum(counted) == 1, counted
    logged = [r.getMessage() for r in caplog.records if "leaving out" in r.getMessage()]
    assert len(logged) == (1 if dist.get_rank() == 0 else 0), logged
    if dist.get_rank() == 0:
        assert "some ranks only" in caplog.text and "rank(s) [1]" in caplog.text
    loader.close()
    dist.barrier()
