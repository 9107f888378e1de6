"""The cross-rank stop agreement of training/preemption.py, on 2 gloo ranks in one session.

A signal that reaches one rank only (a launcher that signals one process, a node that gets its
preemption notice first) must stop every rank after the same step: the guards agree with a MAX
all-reduce. Without the agreement the other rank would train on alone and wait in the next
collective until the process-group timeout; here it fails at once with the step it saw.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.distributed as dist

from genlip_megatron.training.preemption import PreemptionGuard

CPU = torch.device("cpu")


@pytest.mark.world_size(2)
def test_signal_on_one_rank_stops_both_at_the_same_step():
    guard = PreemptionGuard(["SIGUSR1"], None)
    try:
        stopped_at = None
        for step in range(1, 6):
            if step == 3 and dist.get_rank() == 1:
                os.kill(os.getpid(), signal.SIGUSR1)   # rank 1 alone
            if guard.should_stop(CPU):
                stopped_at = step
                break
        seen = [None, None]
        dist.all_gather_object(seen, (stopped_at, guard.reason))
        assert [s for s, _ in seen] == [3, 3], seen
        assert all("SIGUSR1" in reason for _, reason in seen), seen
    finally:
        guard.close()
