"""End-to-end runs of pretrain_genlip.py on the tiny config (single process, CPU).

- golden loss curve (tests/assets/losses/tiny_train_cpu.txt),
- SIGKILL after a checkpoint, then resume: the curve continues identically,
- a crash while a checkpoint is being written leaves the previous one loadable.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from training_helpers import assert_losses_close, make_tiny_data, read_golden, \
    read_jsonl_losses, run_pretrain, tiny_overrides, update_golden_requested, write_golden


def _ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """Uninterrupted 8-step run with DropPath on (so RNG restore matters on resume)."""
    save = tmp_path_factory.mktemp("ref")
    out = _ok(run_pretrain(tiny_overrides(data_dir, save, model__drop_path_rate=0.1)))
    return save, read_jsonl_losses(save / "metrics.jsonl"), out


def test_golden_loss_curve(data_dir, tmp_path):
    proc = run_pretrain(tiny_overrides(data_dir, tmp_path))
    _ok(proc)
    losses = read_jsonl_losses(tmp_path / "metrics.jsonl")
    assert sorted(losses) == list(range(1, 9))
    assert proc.stdout.splitlines()[-1].startswith("RUN steps=8 final_loss=")
    # it learns: the golden curve drops 2.2 in 8 steps, so the 0.3 bound cannot flip with kernels
    assert losses[8] < losses[1] - 0.3, losses
    if update_golden_requested():
        write_golden(losses)
    assert_losses_close(losses, read_golden(), what="single-rank tiny run vs golden file")


def test_checkpoints_are_published_and_pruned(reference_run):
    save, _, _ = reference_run
    assert (save / "latest").read_text().strip() == "iter_0000008"
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000004", "iter_0000008"]


def test_sigkill_after_checkpoint_then_resume_continues_identically(reference_run, data_dir,
                                                                    tmp_path):
    _, ref, _ = reference_run
    sets = tiny_overrides(data_dir, tmp_path, model__drop_path_rate=0.1)
    killed = run_pretrain(sets, fault="after_step:6")
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    assert (tmp_path / "latest").read_text().strip() == "iter_0000004"
    resumed = run_pretrain(sets)
    out = _ok(resumed)
    assert "restored" in out and "(step 4)" in out
    losses = read_jsonl_losses(tmp_path / "metrics.jsonl")  # resumed entries overwrite 5, 6
    # Same process layout, same machine: a resumed run is bit-identical to the uninterrupted one.
    assert {s: losses[s] for s in range(1, 9)} == ref


def test_crash_while_writing_checkpoint_keeps_previous(reference_run, data_dir, tmp_path):
    _, ref, _ = reference_run
    sets = tiny_overrides(data_dir, tmp_path, model__drop_path_rate=0.1)
    crashed = run_pretrain(sets, fault="checkpoint:after_shards:step=8")
    assert crashed.returncode == -9
    assert (tmp_path / "latest").read_text().strip() == "iter_0000004"
    assert (tmp_path / "iter_0000008.tmp").is_dir()  # the half-written save is left aside
    out = _ok(run_pretrain(sets))
    assert "(step 4)" in out
    assert not (tmp_path / "iter_0000008.tmp").exists()
    assert (tmp_path / "latest").read_text().strip() == "iter_0000008"
    losses = read_jsonl_losses(tmp_path / "metrics.jsonl")
    assert {s: losses[s] for s in range(5, 9)} == {s: ref[s] for s in range(5, 9)}


def test_resume_after_changing_the_optimizer_or_data_mode(reference_run, data_dir, tmp_path):
    """use_distributed_optimizer cannot switch at resume: one line with the fix, status 2.
    dp_invariant_data can: model and optimizer resume, the data stream restarts (logged)."""
    import shutil

    save, _, _ = reference_run
    work = tmp_path / "run"
    shutil.copytree(save, work)
    sets = tiny_overrides(data_dir, work, model__drop_path_rate=0.1)
    refused = run_pretrain(sets + ["parallel.use_distributed_optimizer=true"])
    lines = [x for x in refused.stderr.splitlines() if x.strip()]
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-3000:]
    assert "parallel.use_distributed_optimizer=false" in lines[0] and "iter_0000008" in lines[0]
    out = _ok(run_pretrain(sets + ["training.dp_invariant_data=false", "training.train_steps=10"]))
    assert "restored" in out and "(step 8)" in out
    assert "training.dp_invariant_data changed" in out
    assert sorted(read_jsonl_losses(work / "metrics.jsonl"))[-2:] == [9, 10]


def test_fresh_start_over_finished_checkpoints_needs_overwrite(reference_run, data_dir, tmp_path):
    import shutil

    save, _, _ = reference_run
    work = tmp_path / "run"
    shutil.copytree(save, work)
    sets = tiny_overrides(data_dir, work) + ["checkpoint.resume=false"]
    refused = run_pretrain(sets)
    assert refused.returncode == 2 and "checkpoint.overwrite: true" in refused.stderr
    assert sorted(p.name for p in work.glob("iter_*")) == ["iter_0000004", "iter_0000008"]
    out = _ok(run_pretrain(sets + ["checkpoint.overwrite=true", "training.train_steps=2"]))
    assert "checkpoint.overwrite: removing iter_0000004, iter_0000008" in out
    assert sorted(p.name for p in work.glob("iter_*")) == ["iter_0000002"]


def test_converted_weights_as_save_dir_point_to_init_from(reference_run, data_dir, tmp_path):
    """A from-hf conversion holds weights only: resuming it names training.init_from."""
    import sys

    from training_helpers import ROOT

    save, _, _ = reference_run
    tool = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]
    for args in (["to-hf", str(save), str(tmp_path / "hf")],
                 ["from-hf", str(tmp_path / "hf"), str(tmp_path / "mg")]):
        done = subprocess.run(tool + args, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    proc = run_pretrain(tiny_overrides(data_dir, tmp_path / "mg"))
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "training.init_from=" in lines[0] and "from-hf" in lines[0], lines[0]
