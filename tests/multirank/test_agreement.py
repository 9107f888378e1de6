"""Start-up agreement (training/agreement.py) on 2 gloo ranks: a failure on one rank only must
fail every rank at once with that rank's message, not leave the others in a collective."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from genlip_megatron.config import ConfigError
from genlip_megatron.training.agreement import agree_on_startup


def _fails_on_rank_1(exc: Exception):
    def step():
        if dist.get_rank() == 1:
            raise exc
        return "built"
    return step


@pytest.mark.world_size(2)
def test_user_error_on_one_rank_is_a_config_error_on_every_rank():
    with pytest.raises(ConfigError, match=r"loading shards failed on rank 1: .*/x/a\.tar"):
        agree_on_startup("loading shards", _fails_on_rank_1(FileNotFoundError("/x/a.tar gone")))
    dist.barrier()   # both ranks got here: nobody waits in a collective


@pytest.mark.world_size(2)
def test_internal_error_keeps_its_type_on_the_failing_rank():
    expected = KeyError if dist.get_rank() == 1 else RuntimeError
    with pytest.raises(expected):
        agree_on_startup("building", _fails_on_rank_1(KeyError("bug")))
    assert agree_on_startup("building", lambda: dist.get_rank()) == dist.get_rank()
