"""genlip_megatron.training.checkpoint_layout: the save_dir layout every reader shares.

The last test is the contract of the module: for one save_dir, ``to-hf``, the probes' loader and
the trainer's resume pick the same checkpoint, whether ``latest`` is valid, missing, garbage or
dangling.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from genlip_megatron.training import checkpoint_layout as layout
from genlip_megatron.training.checkpoint_layout import COMPLETE, LATEST, CheckpointError, \
    finished_checkpoints, interrupted_publications, is_finished, iteration_dir, \
    publish_checkpoint, read_latest, recover_interrupted_publish, resolve_checkpoint, \
    write_latest

ROOT = Path(__file__).resolve().parents[3]


def _finished(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    return path


def _names(paths) -> list[str]:
    return [p.name for p in paths]


# ------------------------------------------------------------------------------ the module
def test_importing_the_layout_does_not_import_torch():
    """CLI tools and tests read the layout without the training stack."""
    code = ("import sys, genlip_megatron.training.checkpoint_layout; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'megatron', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]"


def test_order_is_numeric_past_seven_digits(tmp_path):
    """iter_10000000 sorts after iter_9999999 (a string sort would put it first)."""
    for step in (9_999_999, 10_000_000, 5):
        _finished(iteration_dir(tmp_path, step))
    assert _names(finished_checkpoints(tmp_path)) == [
        "iter_0000005", "iter_9999999", "iter_10000000"]
    assert resolve_checkpoint(tmp_path, warn=lambda *a: None) == iteration_dir(tmp_path,
                                                                              10_000_000)


def test_siblings_and_half_written_dirs_are_never_chosen(tmp_path):
    _finished(iteration_dir(tmp_path, 4))
    for suffix in (".tmp", ".old", ".removing"):      # newer, complete-looking siblings
        _finished(tmp_path / f"iter_0000009{suffix}")
    (_finished(tmp_path / "iter_0000010.tmp") / COMPLETE).write_text("iter_0000010\n")
    iteration_dir(tmp_path, 12).mkdir()              # no metadata.json: shards still arriving
    _finished(tmp_path / "iter_00008")                # not the iter_N name format (5 digits)
    assert _names(finished_checkpoints(tmp_path)) == ["iter_0000004"]
    assert resolve_checkpoint(tmp_path, warn=lambda *a: None) == iteration_dir(tmp_path, 4)


@pytest.mark.parametrize("pointer", [
    "iter_0000012",          # exists, but without metadata.json
    "iter_0000010.tmp",      # a save in progress, even one holding COMPLETE
    "iter_0000099",          # dangling: nothing there
    "../elsewhere/iter_0000004",
])
def test_latest_naming_an_unfinished_dir_falls_back_to_the_newest_finished(tmp_path, pointer):
    for step in (2, 4):
        _finished(iteration_dir(tmp_path, step))
    (_finished(tmp_path / "iter_0000010.tmp") / COMPLETE).write_text("iter_0000010\n")
    iteration_dir(tmp_path, 12).mkdir()
    _finished(tmp_path / "elsewhere" / "iter_0000004")
    (tmp_path / LATEST).write_text(pointer + "\n")
    warned = []
    assert resolve_checkpoint(tmp_path, warn=lambda *a: warned.append(a[0] % a[1:])) == \
        iteration_dir(tmp_path, 4)
    assert len(warned) == 2 and "iter_0000004" in warned[0] and str(tmp_path / LATEST) in \
        warned[0]
    assert warned[1].startswith("iter_0000010.tmp is a complete save whose publication")


def test_readers_leave_an_interrupted_publication_to_the_trainer_and_name_it(tmp_path):
    """A marked ``.tmp`` (killed before its rename) is not read in place by to-hf or the probes
    (the trainer may be renaming it); the warning names it, and after the trainer's start-up
    recovery every reader chooses it."""
    _finished(iteration_dir(tmp_path, 4))
    write_latest(tmp_path, "iter_0000004")
    (_finished(tmp_path / "iter_0000008.tmp") / COMPLETE).write_text("iter_0000008\n")
    _finished(tmp_path / "iter_0000009.tmp")           # unmarked: an unfinished save
    assert _names(interrupted_publications(tmp_path)) == ["iter_0000008.tmp"]
    warned = []
    assert resolve_checkpoint(tmp_path, warn=lambda *a: warned.append(a[0] % a[1:])) == \
        iteration_dir(tmp_path, 4)
    assert len(warned) == 1 and str(tmp_path / "iter_0000008.tmp") in warned[0]
    assert recover_interrupted_publish(tmp_path) == [iteration_dir(tmp_path, 8)]
    assert resolve_checkpoint(tmp_path, warn=pytest.fail) == iteration_dir(tmp_path, 8)


def test_a_valid_latest_wins_over_a_newer_finished_checkpoint(tmp_path):
    """The pointer is the run's decision (e.g. a re-saved older step); no silent override."""
    for step in (4, 8):
        _finished(iteration_dir(tmp_path, step))
    write_latest(tmp_path, "iter_0000004")
    assert resolve_checkpoint(tmp_path, warn=pytest.fail) == iteration_dir(tmp_path, 4)


def test_damaged_pointer_without_any_checkpoint_is_an_error_missing_one_is_a_fresh_start(
        tmp_path):
    assert resolve_checkpoint(tmp_path) is None
    assert resolve_checkpoint(tmp_path / "not_there") is None
    (tmp_path / LATEST).write_text("garbage")
    with pytest.raises(CheckpointError, match="not an iter_N name, and .* holds no finished"):
        resolve_checkpoint(tmp_path)


def test_an_explicit_checkpoint_dir_is_taken_as_is(tmp_path):
    ckpt = _finished(tmp_path / "exported_for_me")   # any name: the user pointed at it
    _finished(iteration_dir(ckpt, 3))
    assert resolve_checkpoint(ckpt, warn=pytest.fail) == ckpt


def test_write_latest_is_atomic_when_the_rename_fails(tmp_path, monkeypatch):
    """A crash between write and rename keeps the old pointer whole (never a torn file)."""
    _finished(iteration_dir(tmp_path, 4))
    write_latest(tmp_path, "iter_0000004")
    assert (tmp_path / LATEST).read_text() == "iter_0000004\n"

    def crash(*args):
        raise OSError("killed")

    monkeypatch.setattr(layout.os, "replace", crash)
    with pytest.raises(OSError):
        write_latest(tmp_path, "iter_0000008")
    assert read_latest(tmp_path) == (iteration_dir(tmp_path, 4), "")


def test_publish_marks_renames_and_points_latest(tmp_path):
    tmp = _finished(tmp_path / "iter_0000006.tmp")
    final = iteration_dir(tmp_path, 6)
    publish_checkpoint(tmp, final)
    assert not tmp.exists() and is_finished(final)
    assert (final / COMPLETE).read_text() == "iter_0000006\n"
    assert read_latest(tmp_path) == (final, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000006", "latest"]



def test_a_superseded_checkpoint_is_kept_but_never_chosen_pruned_or_recovered(tmp_path):
    for step in (4, 8):
        _finished(iteration_dir(tmp_path, step))
    aside = layout.supersede_checkpoint(iteration_dir(tmp_path, 8))
    assert aside.name.startswith("iter_0000008.superseded-") and is_finished(aside) is False
    again = layout.supersede_checkpoint(_finished(iteration_dir(tmp_path, 8)))
    assert again != aside and again.is_dir() and aside.is_dir()   # never overwrites a kept copy
    write_latest(tmp_path, "iter_0000004")
    assert _names(finished_checkpoints(tmp_path)) == ["iter_0000004"]
    assert resolve_checkpoint(tmp_path) == iteration_dir(tmp_path, 4)
    assert recover_interrupted_publish(tmp_path) == []
    layout.prune_checkpoints(tmp_path, iteration_dir(tmp_path, 4), keep_last=1)
    assert aside.is_dir() and again.is_dir()


def _try_lock(save_dir: Path, job: str, then: str = "") -> subprocess.CompletedProcess:
    """Another process takes the save_dir lock (prints OK or the refusal), then runs ``then``."""
    code = ("import os, sys, time\n"
            "from genlip_megatron.training.checkpoint_layout import SaveDirInUse, lock_save_dir\n"
            f"try:\n    lock_save_dir({str(save_dir)!r}, {job!r})\n"
            "except SaveDirInUse as exc:\n    print(exc); sys.exit(2)\n"
            f"print('OK', flush=True)\n{then}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=env, timeout=120,
                          capture_output=True, text=True)


def test_the_save_dir_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    fd = layout.lock_save_dir(tmp_path, "4242")
    try:
        refused = _try_lock(tmp_path, "777")
        assert refused.returncode == 2, refused.stderr
        assert refused.stdout.startswith(
            f"checkpoint.save_dir {tmp_path} is in use by job 4242 on host ")
        assert f"(pid {os.getpid()}); wait" in refused.stdout
        assert refused.stdout.count("\n") == 1
    finally:
        os.close(fd)
    assert _try_lock(tmp_path, "777").stdout == "OK\n"   # released: the next job takes it
    assert "job=777" in (tmp_path / layout.LOCK).read_text()


def test_a_lock_dies_with_its_holder_not_with_its_forked_children(tmp_path):
    """SIGKILLed holder (no clean-up) whose forked child (a loader worker) lives on: a
    requeued job is not blocked."""
    child_pid = tmp_path / "child.pid"
    killed = _try_lock(tmp_path, "old", then=(
        "pid = os.fork()\n"
        "if pid == 0:\n    os.closerange(0, 3); time.sleep(60); os._exit(0)\n"
        f"open({str(child_pid)!r}, 'w').write(str(pid))\n"
        "os.kill(os.getpid(), 9)"))
    assert killed.returncode == -9 and killed.stdout == "OK\n", killed.stderr
    pid = int(child_pid.read_text())
    try:
        os.kill(pid, 0)   # the forked child is still alive
        assert _try_lock(tmp_path, "new").stdout == "OK\n"
    finally:
        os.kill(pid, 9)


def test_publish_fsyncs_the_save_before_marking_it_complete(tmp_path, monkeypatch):
    tmp = _finished(tmp_path / "iter_0000006.tmp")
    (tmp / "common.pt").write_bytes(b"common")
    (tmp / "__0_0.distcp").write_bytes(b"shard")
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(layout.os, "fsync", recording_fsync)
    publish_checkpoint(tmp, iteration_dir(tmp_path, 6))
    marker = synced.index(str(tmp / COMPLETE))
    for name in ("metadata.json", "common.pt", "__0_0.distcp"):
        assert synced.index(str(tmp / name)) < marker, synced
    assert synced.index(str(tmp)) < marker, synced   # the folder's entries too


# ------------------------------------------------------------------------------ all readers
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A save dir with distinguishable finished checkpoints at steps 4 and 8 (tiny model,
    weights seeded by the step), an unfinished save at 12 and a half-written ``iter_0000016``."""
    sys.path.insert(0, str(ROOT / "tests" / "unit" / "convert"))
    from convert_testlib import TINY, random_hf_state_dict, write_hf_export

    from genlip_megatron.convert import hf_to_megatron

    base = tmp_path_factory.mktemp("layout")
    save = base / "save"
    save.mkdir()
    weights = {}
    for step in (4, 8):
        sd = random_hf_state_dict(TINY, seed=step)
        src = write_hf_export(base / f"hf{step}", TINY, sd)
        ckpt = hf_to_megatron(src, base / f"mg{step}", progress=False)
        os.replace(ckpt, iteration_dir(save, step))
        weights[step] = sd["embeddings.weight"]
    _finished(save / "iter_0000012.tmp")
    iteration_dir(save, 16).mkdir()
    return save, weights


def _which(weights: dict, tensor) -> int:
    import torch

    hits = [step for step, w in weights.items() if torch.equal(w, tensor.float())]
    assert len(hits) == 1, hits
    return hits[0]


@pytest.mark.parametrize("latest, want", [
    (None, 8),                          # missing
    (b"\xff\xfe garbage\n", 8),         # garbage
    (b"iter_0000012\n", 8),             # dangling (only its unfinished .tmp exists)
    (b"iter_0000016\n", 8),             # names a half-written dir
    (b"iter_0000004\n", 4),             # valid: every reader follows it
])
def test_to_hf_probes_and_trainer_resume_pick_the_same_checkpoint(
        two_checkpoints, gloo_world, tmp_path, monkeypatch, latest, want):
    from safetensors.torch import load_file

    from genlip_megatron.probes.loading import load_genlip_for_inference
    from genlip_megatron.training.checkpointing import CheckpointManager, TrainingState
    from genlip_megatron.config.training import CheckpointConfig

    save_src, weights = two_checkpoints
    save = tmp_path / "save"
    shutil.copytree(save_src, save)
    if latest is not None:
        (save / LATEST).write_bytes(latest)

    # to-hf, through the CLI users run
    spec = importlib.util.spec_from_file_location("convert_checkpoint_cli",
                                                  ROOT / "tools" / "convert_checkpoint.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["to-hf", str(save), str(tmp_path / "out"), "--dtype", "fp32",
                     "--no-tokenizer", "--no-progress"]) == 0
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))["embeddings.weight"]
    source = json.loads((tmp_path / "out" / "config.json").read_text())["genlip_megatron"]
    assert source["source"] == str(iteration_dir(save, want))
    assert _which(weights, exported) == want

    # the probes' loader
    model, _ = load_genlip_for_inference(save)
    assert _which(weights, model.state_dict()["embeddings.weight"]) == want

    # the trainer's resume choice (the load itself is the model's business, not the layout's)
    chosen = []

    def record(self, path, *args, **kwargs):
        chosen.append(Path(path))
        return TrainingState(), None

    monkeypatch.setattr(CheckpointManager, "load", record)
    manager = CheckpointManager(CheckpointConfig(save_dir=str(save), resume=True))
    _, _, ckpt = manager.resume([], None, None, None, {})
    assert chosen == [ckpt] == [iteration_dir(save, want)]
    assert sorted(p.name for p in save.iterdir() if p.name != LATEST) == [
        "iter_0000004", "iter_0000008", "iter_0000012.tmp", "iter_0000016"]


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    import errno

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(layout.fcntl, "lockf", no_locks)
    assert layout.lock_save_dir(tmp_path, "1") is None
    assert "cannot be locked" in caplog.text and "will not be detected" in caplog.text
