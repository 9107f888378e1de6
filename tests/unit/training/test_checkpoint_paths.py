"""Checkpoint directory conventions: finished vs in-progress saves and the latest pointer."""

from __future__ import annotations

import pytest

from genlip_megatron.training.checkpointing import check_model_compatible, \
    finished_checkpoints, iteration_dir, resolve_checkpoint


def _finished(path):
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")


def test_finished_checkpoints_skip_tmp_and_sort_numerically(tmp_path):
    for step in (10, 200, 30):
        _finished(iteration_dir(tmp_path, step))
    (tmp_path / "iter_0000300.tmp").mkdir()
    assert [p.name for p in finished_checkpoints(tmp_path)] == [
        "iter_0000010", "iter_0000030", "iter_0000200"]


def test_resolve_follows_latest_and_refuses_dangling(tmp_path):
    assert resolve_checkpoint(tmp_path) is None
    _finished(iteration_dir(tmp_path, 4))
    (tmp_path / "latest").write_text("iter_0000004\n")
    assert resolve_checkpoint(tmp_path) == iteration_dir(tmp_path, 4)
    assert resolve_checkpoint(iteration_dir(tmp_path, 4)) == iteration_dir(tmp_path, 4)
    (tmp_path / "latest").write_text("iter_0000008\n")
    with pytest.raises(RuntimeError, match="names iter_0000008, which is not a finished"):
        resolve_checkpoint(tmp_path)


def test_mismatched_architecture_is_refused(tmp_path):
    saved = {"model": {"hidden_size": 64, "num_layers": 2}}
    check_model_compatible(saved, {"model": {"hidden_size": 64, "num_layers": 2}}, tmp_path)
    with pytest.raises(RuntimeError, match=r"model.num_layers: checkpoint 2 vs config 4"):
        check_model_compatible(saved, {"model": {"hidden_size": 64, "num_layers": 4}}, tmp_path)
