"""Exit signals and the wall-clock budget (training/preemption.py), in one process."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from genlip_megatron.config import ConfigError, load_config
from genlip_megatron.training.preemption import PreemptionGuard
from training_helpers import TINY_CONFIG

CPU = torch.device("cpu")


def test_signal_is_recorded_and_stops_at_the_next_boundary():
    previous = signal.getsignal(signal.SIGUSR1)
    guard = PreemptionGuard(["SIGTERM", "SIGUSR1"], None)
    try:
        assert not guard.should_stop(CPU)
        os.kill(os.getpid(), signal.SIGUSR1)  # would kill the process without the handler
        assert guard.should_stop(CPU)
        assert "SIGUSR1" in guard.reason
    finally:
        guard.close()
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_time_budget_counts_from_process_start():
    started_2_min_ago = time.time() - 120
    assert PreemptionGuard([], 1.0, start_time=started_2_min_ago).should_stop(CPU)
    guard = PreemptionGuard([], 10.0, start_time=started_2_min_ago)
    assert not guard.should_stop(CPU)
    late = PreemptionGuard([], 1.5, start_time=started_2_min_ago)
    assert late.should_stop(CPU) and "exit_duration_mins (1.5)" in late.reason


def test_disabled_guard_leaves_handlers_alone():
    before = signal.getsignal(signal.SIGTERM)
    guard = PreemptionGuard([], None)
    assert not guard.enabled and not guard.should_stop(CPU)
    assert signal.getsignal(signal.SIGTERM) is before


def test_config_defaults_and_unknown_signal_message():
    cfg = load_config(TINY_CONFIG)
    assert cfg.training.exit_signals == ["SIGTERM", "SIGUSR1"]
    assert cfg.training.exit_duration_mins is None
    with pytest.raises(ConfigError, match=r"training.exit_signals\[0\].*SIGUSR1"):
        load_config(TINY_CONFIG, ["training.exit_signals=[SIGUSR3]"])
