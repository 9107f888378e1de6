"""Exit signals and the wall-clock budget (training/preemption.py), in one process."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from genlip_megatron.config import ConfigError, load_config
from genlip_megatron.training import faults
from genlip_megatron.training.preemption import EXIT_STATUS_ENV, PreemptionGuard, \
    record_exit_status
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


@pytest.mark.parametrize("minutes", [0, -5])
def test_non_positive_time_budget_is_refused(minutes):
    cfg = load_config(TINY_CONFIG, [f"training.exit_duration_mins={minutes}"])
    with pytest.raises(ConfigError, match=r"training.exit_duration_mins .* must be > 0"):
        cfg.validate(world_size=1)


def test_exit_status_is_recorded_per_rank_for_the_launcher(tmp_path, monkeypatch):
    monkeypatch.setenv(EXIT_STATUS_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "3")
    assert record_exit_status(75) == 75
    assert (tmp_path / "rank3").read_text().strip() == "75"
    monkeypatch.delenv(EXIT_STATUS_ENV)
    assert record_exit_status(2) == 2 and len(list(tmp_path.iterdir())) == 1


def test_injected_os_error_is_raised_on_the_named_rank_only(monkeypatch):
    monkeypatch.setenv(faults.ENV, "checkpoint:begin=ENOSPC:rank1")
    monkeypatch.setenv("RANK", "0")
    faults.maybe_inject("checkpoint:begin")   # not this rank: nothing happens
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(OSError, match="No space left") as err:
        faults.maybe_inject("checkpoint:begin")
    assert err.value.errno == errno.ENOSPC


STUCK = """
import sys, time
from genlip_megatron.training import preemption
preemption.SECOND_TERM_GRACE_S = 0.5
guard = preemption.PreemptionGuard(["SIGTERM"], None)
print("ready", flush=True)
time.sleep(120)   # never reaches a step boundary
"""


def test_second_sigterm_ends_a_process_that_never_reaches_a_boundary():
    proc = subprocess.Popen([sys.executable, "-c", STUCK], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert proc.poll() is None   # the first one is only recorded
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "second SIGTERM" in err and 'File "<string>", line 7' in err, err

