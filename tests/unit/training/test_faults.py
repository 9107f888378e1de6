"""genlip_megatron.training.faults: the fault-injection points of the crash drills."""

from __future__ import annotations

import errno
import traceback

import pytest
import torch

from genlip_megatron.training import faults


def test_a_counted_error_fires_only_the_first_n_times(monkeypatch):
    monkeypatch.setattr(faults, "_FIRED", {})
    monkeypatch.setenv(faults.ENV, "checkpoint:load=EIO*2,checkpoint:diagnose=ESTALE")
    for _ in range(2):
        with pytest.raises(OSError) as err:
            faults.maybe_inject("checkpoint:load")
        assert err.value.errno == errno.EIO
    faults.maybe_inject("checkpoint:load")        # third time: the read goes through
    faults.maybe_inject("checkpoint:other")
    for _ in range(3):                             # without a count: every time
        with pytest.raises(OSError) as err:
            faults.maybe_inject("checkpoint:diagnose")
        assert err.value.errno == errno.ESTALE


def test_grad_sync_point_fires_in_that_step_before_the_gradients_are_reduced(make_trainer,
                                                                             monkeypatch):
    """``grad_sync:N`` is reached inside step N where megatron finalizes the gradients (the
    data-parallel all-reduce), after forward/backward and before the optimizer step."""
    monkeypatch.setattr(faults, "_FIRED", {})
    monkeypatch.setenv(faults.ENV, "grad_sync:2=EIO")
    trainer = make_trainer()
    trainer.state.step = 1
    trainer.train_step()                      # step 1: not listed
    weights = [p.detach().clone() for p in trainer.model[0].parameters()]
    trainer.state.step = 2
    with pytest.raises(OSError, match="grad_sync:2") as err:
        trainer.train_step()
    frames = [f.name for f in traceback.extract_tb(err.value.__traceback__)]
    # raised from megatron's schedule (after the backward passes), not before it
    assert "finalize_with_fault_point" in frames and "forward_backward_no_pipelining" in frames
    assert all(torch.equal(w, p) for w, p in zip(weights, trainer.model[0].parameters()))
