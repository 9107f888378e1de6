"""training/parallel.py: the distributed-optimizer default per layout."""

from __future__ import annotations

import logging

import pytest

from genlip_megatron.config import ParallelConfig
from genlip_megatron.training.parallel import resolve_distributed_optimizer


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
