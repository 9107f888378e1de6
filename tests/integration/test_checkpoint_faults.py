"""Checkpoint faults of real jobs, through pretrain_genlip.py (single process, CPU tiny config).

- two jobs on one checkpoint.save_dir: the second refuses in one line before touching a file;
  the lock of a dead job does not block;
- a transient read error (EIO/ESTALE) while resuming is retried: the newest checkpoint is
  resumed, no fallback;
- resuming from an older checkpoint keeps the newer finished ones aside (never deleted).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from training_helpers import make_tiny_data, pretrain_command, pretrain_env, \
    read_jsonl_losses, run_pretrain, tiny_overrides


def _ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in root.rglob("*")}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("tiny_data"))


def test_second_job_on_a_save_dir_refuses_in_one_line(data_dir, tmp_path):
    sets = tiny_overrides(data_dir, tmp_path)
    first = subprocess.Popen(pretrain_command(sets), env=pretrain_env("after_step:5=HANG"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "iter_0000004").is_dir():   # the first job is mid-run
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
            time.sleep(0.5)
        time.sleep(1.0)
        before = _snapshot(tmp_path)
        second = run_pretrain(sets)
        lines = [x for x in second.stderr.splitlines() if x.strip()]
        assert second.returncode == 2 and len(lines) == 1, second.stderr[-3000:]
        assert lines[0].startswith(f"error: checkpoint.save_dir {tmp_path} is in use by job ")
        assert f"(pid {first.pid})" in lines[0], lines[0]
        assert _snapshot(tmp_path) == before   # refused before touching any file
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    # the holder died (SIGKILL: no clean-up): its lock does not block the next job
    out = _ok(run_pretrain(sets))
    assert "(step 4)" in out
    assert (tmp_path / "latest").read_text().strip() == "iter_0000008"
    # ... and a finished job releases it too
    _ok(run_pretrain(sets + ["training.train_steps=9", "checkpoint.save_interval=9"]))
    assert "job=" in (tmp_path / ".lock").read_text()
