"""Checkpoint directory conventions: finished vs in-progress saves and the latest pointer."""

from __future__ import annotations

import os

import pytest

from genlip_megatron.config.training import CheckpointConfig
from genlip_megatron.training.checkpoint_layout import COMPLETE, CheckpointError, \
    finished_checkpoints, is_finished, iteration_dir, publish_checkpoint, read_latest, \
    recover_interrupted_publish, resolve_checkpoint, write_latest
from genlip_megatron.training.checkpointing import CheckpointManager, check_model_compatible, \
    check_resume_compatible, diagnose_checkpoint


def _finished(path):
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")


def test_finished_checkpoints_skip_tmp_and_sort_numerically(tmp_path):
    for step in (10, 200, 30):
        _finished(iteration_dir(tmp_path, step))
    (tmp_path / "iter_0000300.tmp").mkdir()
    assert [p.name for p in finished_checkpoints(tmp_path)] == [
        "iter_0000010", "iter_0000030", "iter_0000200"]


def test_resolve_follows_latest_and_survives_a_dangling_pointer(tmp_path):
    assert resolve_checkpoint(tmp_path) is None
    _finished(iteration_dir(tmp_path, 4))
    (tmp_path / "latest").write_text("iter_0000004\n")
    assert resolve_checkpoint(tmp_path) == iteration_dir(tmp_path, 4)
    assert resolve_checkpoint(iteration_dir(tmp_path, 4)) == iteration_dir(tmp_path, 4)
    (tmp_path / "latest").write_text("iter_0000008\n")     # dangling: the newest finished one
    assert resolve_checkpoint(tmp_path) == iteration_dir(tmp_path, 4)
    assert "names iter_0000008, which is not a finished" in read_latest(tmp_path)[1]


def test_mismatched_architecture_is_refused(tmp_path):
    saved = {"model": {"hidden_size": 64, "num_layers": 2}}
    check_model_compatible(saved, {"model": {"hidden_size": 64, "num_layers": 2}}, tmp_path)
    with pytest.raises(RuntimeError, match=r"model.num_layers: checkpoint 2 vs config 4"):
        check_model_compatible(saved, {"model": {"hidden_size": 64, "num_layers": 4}}, tmp_path)


def test_ablation_knob_mismatch_is_refused_also_for_older_checkpoints(tmp_path):
    old = {"model": {"hidden_size": 64}}          # written before the knobs: gated, no qk-norm
    check_model_compatible(old, {"model": {"hidden_size": 64, "gated_attention": True,
                                           "qk_layernorm": False}}, tmp_path)
    with pytest.raises(RuntimeError, match=r"model.gated_attention: checkpoint True vs config "
                                           r"False"):
        check_model_compatible(old, {"model": {"hidden_size": 64, "gated_attention": False}},
                               tmp_path)
    saved = {"model": {"hidden_size": 64, "qk_layernorm": True}}
    with pytest.raises(RuntimeError, match=r"model.qk_layernorm: checkpoint True vs config False"):
        check_model_compatible(saved, {"model": {"hidden_size": 64}}, tmp_path)


# ------------------------------------------------------------------ latest pointer, recovery
def test_damaged_or_missing_latest_falls_back_to_newest_finished(tmp_path, caplog):
    for step in (4, 8):
        _finished(iteration_dir(tmp_path, step))
    assert resolve_checkpoint(tmp_path) == iteration_dir(tmp_path, 8)    # no pointer
    assert "latest is missing" in caplog.text
    (tmp_path / "latest").write_bytes(b"\xff\xfe\x00junk")
    assert read_latest(tmp_path) == (None, f"{tmp_path / 'latest'} is unreadable "
                                           "(UnicodeDecodeError)")
    assert resolve_checkpoint(tmp_path) == iteration_dir(tmp_path, 8)
    (tmp_path / "latest").write_text("iter_0000004\n")                  # a valid pointer wins
    assert resolve_checkpoint(tmp_path) == iteration_dir(tmp_path, 4)


def _complete_tmp(save, step):
    tmp = save / f"iter_{step:07d}.tmp"
    _finished(tmp)
    (tmp / COMPLETE).write_text("x\n")
    return tmp


def test_recover_publishes_a_complete_tmp_and_moves_latest(tmp_path):
    _finished(iteration_dir(tmp_path, 4))
    write_latest(tmp_path, "iter_0000004")
    _complete_tmp(tmp_path, 8)
    (tmp_path / "iter_0000012.tmp").mkdir()           # incomplete: never published
    assert recover_interrupted_publish(tmp_path) == [iteration_dir(tmp_path, 8)]
    assert read_latest(tmp_path)[0] == iteration_dir(tmp_path, 8)
    assert not iteration_dir(tmp_path, 12).exists()


def test_recover_restores_or_drops_a_moved_aside_copy(tmp_path):
    old = tmp_path / "iter_0000008.old"
    _finished(old)
    recover_interrupted_publish(tmp_path)              # killed after the move, no new copy
    assert is_finished(iteration_dir(tmp_path, 8)) and not old.exists()
    _finished(old)
    recover_interrupted_publish(tmp_path)              # killed after the new copy was renamed
    assert not old.exists() and is_finished(iteration_dir(tmp_path, 8))


def test_recover_catches_latest_up_after_a_crash_between_rename_and_pointer(tmp_path):
    """A kill after ``iter_8`` was renamed into place, before ``latest`` moved: start-up
    publishes it (else up to save_interval steps are redone). A pointer edited by hand after
    iter_8 was finished (a deliberate older choice) is left alone."""
    import time

    for step in (4, 8):
        tmp = tmp_path / f"iter_{step:07d}.tmp"
        _finished(tmp)

        def fault(point, step=step):
            if point == "renamed" and step == 8:
                raise _Killed(point)

        try:
            publish_checkpoint(tmp, iteration_dir(tmp_path, step), fault=fault)
        except _Killed:
            pass
    assert read_latest(tmp_path)[0] == iteration_dir(tmp_path, 4)   # lagging
    recover_interrupted_publish(tmp_path)
    assert read_latest(tmp_path)[0] == iteration_dir(tmp_path, 8)
    time.sleep(0.01)
    write_latest(tmp_path, "iter_0000004")                           # the user's choice
    recover_interrupted_publish(tmp_path)
    assert read_latest(tmp_path)[0] == iteration_dir(tmp_path, 4)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("point", ["marked", "moved_aside", "renamed", None])
def test_publish_over_an_existing_step_is_crash_safe_at_every_point(tmp_path, point):
    """Re-saving step 8 (a relaunched run): a kill at any point leaves step 8 loadable."""
    final = iteration_dir(tmp_path, 8)
    _finished(final)
    (final / "which").write_text("old")
    write_latest(tmp_path, final.name)
    tmp = tmp_path / "iter_0000008.tmp"
    _finished(tmp)
    (tmp / "which").write_text("new")

    def fault(p):
        if p == point:
            raise _Killed(p)

    try:
        publish_checkpoint(tmp, final, fault=fault)
    except _Killed:
        pass
    recover_interrupted_publish(tmp_path)
    assert read_latest(tmp_path)[0] == final
    want = "old" if point in ("marked",) else "new"
    assert (final / "which").read_text() == want
    assert not list(tmp_path.glob("*.old"))


def test_diagnose_names_the_damaged_file(tmp_path):
    import torch
    from torch.distributed.checkpoint import FileSystemWriter, save

    ckpt = iteration_dir(tmp_path, 4)
    ckpt.mkdir()
    save({"w": torch.arange(1000.0)}, storage_writer=FileSystemWriter(str(ckpt)), no_dist=True)
    (ckpt / "metadata.json").write_text("{}")
    torch.save({}, ckpt / "common.pt")
    assert diagnose_checkpoint(ckpt) == ""
    shard = next(ckpt.glob("*.distcp"))
    os.truncate(shard, 100)
    assert diagnose_checkpoint(ckpt).startswith(f"{shard.name} is truncated (100 of")
    shard.unlink()
    assert diagnose_checkpoint(ckpt) == f"{shard.name} is missing"
    (ckpt / "common.pt").unlink()
    assert diagnose_checkpoint(ckpt) == "common.pt (the common state) is missing"
    # megatron-core 0.19 keeps the common state inside the DCP files instead of common.pt
    save({"common_state/config": torch.zeros(1)}, storage_writer=FileSystemWriter(str(ckpt)),
         no_dist=True)
    assert diagnose_checkpoint(ckpt) == ""


def test_converted_and_optimizer_switch_resumes_are_refused_in_one_line(tmp_path):
    cur = {"parallel": {"use_distributed_optimizer": True}}
    with pytest.raises(CheckpointError, match=r"training.init_from=") as err:
        check_resume_compatible({"converted_from_hf": {}}, cur, tmp_path / "iter_0000000")
    assert "\n" not in str(err.value)
    saved = {"config": {"parallel": {"use_distributed_optimizer": False}}}
    with pytest.raises(CheckpointError, match=r"set parallel.use_distributed_optimizer=false"):
        check_resume_compatible(saved, cur, tmp_path)
    check_resume_compatible(saved, {"parallel": {"use_distributed_optimizer": False}}, tmp_path)


def test_prune_keeps_the_newest_and_removes_incomplete_saves(tmp_path):
    for step in (2, 4, 6, 8, 10):
        _finished(iteration_dir(tmp_path, step))
    (tmp_path / "iter_0000012.tmp").mkdir()
    _finished(tmp_path / "iter_0000001.removing")      # a removal a kill interrupted
    manager = CheckpointManager(CheckpointConfig(save_dir=str(tmp_path), keep_last=3))
    manager._prune(tmp_path, keep=iteration_dir(tmp_path, 10))
    assert [p.name for p in finished_checkpoints(tmp_path)] == [
        "iter_0000006", "iter_0000008", "iter_0000010"]
    assert not (tmp_path / "iter_0000012.tmp").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000006", "iter_0000008", "iter_0000010"]
    # keep_last 1 but the just-published checkpoint is older than another: both kept
    manager.cfg.keep_last = 1
    manager._prune(tmp_path, keep=iteration_dir(tmp_path, 8))
    assert [p.name for p in finished_checkpoints(tmp_path)] == ["iter_0000008", "iter_0000010"]
    manager.cfg.keep_last = 0                       # 0 keeps everything
    manager._prune(tmp_path, keep=iteration_dir(tmp_path, 10))
    assert len(finished_checkpoints(tmp_path)) == 2
