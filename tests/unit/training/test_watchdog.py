"""HangWatchdog timing rules (training/watchdog.py) without firing it (firing ends the
process: tests/integration/test_hang_watchdog.py)."""

from __future__ import annotations

import pytest

from genlip_megatron.config import ConfigError, load_config
from genlip_megatron.training import watchdog as wd
from training_helpers import TINY_CONFIG


def test_first_step_gets_the_longer_allowance_then_the_timeout(monkeypatch):
    fired = []
    monkeypatch.setattr(wd.HangWatchdog, "_fire", lambda self, idle: fired.append(idle))
    dog = wd.HangWatchdog(1.0, rank=0, poll_s=3600)   # the thread never polls in this test
    try:
        dog.beat(7, "running step 8")   # resumed at step 7
        assert dog._allowance() == 60 * wd.FIRST_STEP_FACTOR
        dog.beat(8, "finishing it")
        assert dog._allowance() == 60.0
    finally:
        dog.close()
    assert not fired


def test_disabled_watchdog_starts_no_thread():
    dog = wd.HangWatchdog(None, rank=0)
    dog.beat(1, "x")
    assert dog._thread is None
    dog.close()


@pytest.mark.parametrize("minutes", [0, -1])
def test_non_positive_hang_timeout_is_refused(minutes):
    cfg = load_config(TINY_CONFIG, [f"training.hang_timeout_mins={minutes}"])
    with pytest.raises(ConfigError, match="training.hang_timeout_mins"):
        cfg.validate(world_size=1)
