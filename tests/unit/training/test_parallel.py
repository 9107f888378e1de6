"""training/parallel.py: the distributed-optimizer default per layout."""

from __future__ import annotations

import logging
import os

import pytest
import torch.distributed as dist

from genlip_megatron.config import ParallelConfig
from genlip_megatron.training.parallel import destroy_topology, resolve_distributed_optimizer


@pytest.mark.parametrize("asked, dp, want", [
    (None, 1, False), (None, 2, True), (None, 8, True),
    (True, 1, True), (False, 4, False),           # explicit choices are kept
])
def test_distributed_optimizer_default(asked, dp, want):
    assert resolve_distributed_optimizer(ParallelConfig(use_distributed_optimizer=asked),
                                         dp) is want


def test_switching_it_off_at_dp1_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="genlip_megatron.training.parallel"):
        resolve_distributed_optimizer(ParallelConfig(), 1)
        resolve_distributed_optimizer(ParallelConfig(use_distributed_optimizer=False), 1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "distributed optimizer off" in lines[0]
    assert "parallel.use_distributed_optimizer: true" in lines[0]


def _threads() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_destroy_topology_frees_the_groups_threads(gloo_world):
    """megatron's destroy_model_parallel alone leaked ~50 gloo threads per build: a test session
    that builds the topology hundreds of times reached thousands of threads and crawled."""
    from megatron.core import parallel_state as ps

    destroy_topology()
    ps.initialize_model_parallel(1, 1)
    destroy_topology()
    base = _threads()
    for _ in range(3):
        ps.initialize_model_parallel(1, 1)
        assert ps.get_data_parallel_group() is not None
        destroy_topology()
    assert not ps.model_parallel_is_initialized()
    assert _threads() <= base + 2   # the leak was ~50 per build
    assert dist.is_initialized() and dist.get_world_size() == 1   # the world group is kept
