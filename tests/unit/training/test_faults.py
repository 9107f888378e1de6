"""genlip_megatron.training.faults: the fault-injection points of the crash drills."""

from __future__ import annotations

import errno

import pytest

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
