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


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """Uninterrupted 8-step run: checkpoints iter_4 and iter_8, per-step losses."""
    save = tmp_path_factory.mktemp("ref")
    _ok(run_pretrain(tiny_overrides(data_dir, save)))
    return save, read_jsonl_losses(save / "metrics.jsonl")


def _copy_run(reference_run, tmp_path) -> Path:
    import shutil

    work = tmp_path / "run"
    shutil.copytree(reference_run[0], work)
    return work


def test_transient_read_errors_are_retried_not_a_fallback(reference_run, data_dir, tmp_path):
    work = _copy_run(reference_run, tmp_path)
    sets = tiny_overrides(data_dir, work) + ["checkpoint.fallback_to_previous=true",
                                             "training.train_steps=9"]
    out = _ok(run_pretrain(sets, fault="checkpoint:diagnose=ESTALE*1,checkpoint:load=EIO*1"))
    assert out.count("transient read error on checkpoint") == 2, out[-4000:]
    assert "(step 8)" in out and "previous finished checkpoint" not in out, out[-4000:]
    assert (work / "latest").read_text().strip() == "iter_0000009"


def test_persistent_transient_error_is_one_line_without_fallback(reference_run, data_dir,
                                                                 tmp_path):
    work = _copy_run(reference_run, tmp_path)
    before = _snapshot(work)
    sets = tiny_overrides(data_dir, work) + ["checkpoint.fallback_to_previous=true"]
    proc = run_pretrain(sets, fault="checkpoint:load=EIO")
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "iter_0000008" in lines[0] and "failed 4 times" in lines[0], lines[0]
    assert "Input/output error" in lines[0] and "damaged" in lines[0], lines[0]
    assert proc.stdout.count("transient read error on checkpoint") == 3
    changed = {k for k, v in _snapshot(work).items() if before.get(k) != v}
    assert {k.split("/")[0] for k in changed} <= {".lock"}, changed   # no checkpoint touched


def test_newer_checkpoints_are_kept_aside_after_a_fallback(reference_run, data_dir, tmp_path):
    work = _copy_run(reference_run, tmp_path)
    shard = sorted((work / "iter_0000008").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])              # iter_8 damaged
    damaged = _snapshot(work / "iter_0000008")
    sets = tiny_overrides(data_dir, work) + ["checkpoint.fallback_to_previous=true"]
    out = _ok(run_pretrain(sets))
    assert "(step 4)" in out, out[-4000:]
    kept = list(work.glob("iter_0000008.superseded-*"))
    assert len(kept) == 1 and _snapshot(kept[0]) == damaged, sorted(work.iterdir())
    assert f"kept iter_0000008 aside as {kept[0].name}" in out
    assert (work / "latest").read_text().strip() == "iter_0000008"
    assert (work / "iter_0000008" / "metadata.json").is_file()
    # the same run again (resumes the new iter_8, 2 more steps): the kept copy stays
    _ok(run_pretrain(sets + ["training.train_steps=10", "checkpoint.keep_last=1"]))
    assert list(work.glob("iter_0000008.superseded-*")) == kept
    assert sorted(p.name for p in work.glob("iter_???????")) == ["iter_0000010"]
    losses = read_jsonl_losses(work / "metrics.jsonl")
    assert {s: losses[s] for s in range(5, 9)} == {s: reference_run[1][s] for s in range(5, 9)}
