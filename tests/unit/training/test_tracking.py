"""W&B / MLflow sinks of the metric logger (training/tracking.py), offline and local only."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from genlip_megatron.config.loader import ConfigError
from genlip_megatron.config.training import LoggingConfig
from genlip_megatron.training.metrics import MetricLogger
from genlip_megatron.training.tracking import mlflow_key


def test_asking_for_a_missing_tracker_is_a_one_line_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "mlflow") else real(name, *a))
    for key, value in (("wandb_project", "p"), ("mlflow_tracking_uri", "file:///tmp/x")):
        with pytest.raises(ConfigError, match=f"logging.{key} is set but") as err:
            LoggingConfig(**{key: value}).validate()
        assert "\n" not in str(err.value) and "pip install" in str(err.value)


def test_mlflow_keys_keep_the_namespace_and_unit():
    assert mlflow_key("memory/max_reserved(GiB)") == "memory/max_reserved_GiB"
    assert mlflow_key("mfu(%)") == "mfu_pct"
    assert mlflow_key("loss/global_avg") == "loss/global_avg"


def test_mlflow_run_is_continued_by_run_id_and_gets_metrics_and_images(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is optional; the newest-stack lane lacks it")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file://{tmp_path / 'mlruns'}"
    cfg = LoggingConfig(mlflow_tracking_uri=uri, tags=["a"], run_name="r").validate()
    first = MetricLogger(cfg, True, {"model": {"variant": "tiny"}}, 4, run_id="abc")
    first.log({"loss/global_avg": 2.0, "mfu(%)": 1.5, "x": float("nan")}, 1, console=False)
    first.log_images({"gallery/0": np.zeros((8, 8, 3), np.uint8)}, 1)
    first.close()
    again = MetricLogger(cfg, True, {}, 4, run_id="abc")
    again.log({"loss/global_avg": 1.0}, 2, console=False)
    again.close()
    other = MetricLogger(cfg, True, {}, 4, run_id="def")
    other.close()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("genlip")
    runs = {r.data.tags["genlip.run_id"]: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == ["abc", "def"]
    run = runs["abc"].info.run_id
    hist = client.get_metric_history(run, "loss/global_avg")
    assert [(m.step, m.value) for m in hist] == [(1, 2.0), (2, 1.0)]
    assert [m.value for m in client.get_metric_history(run, "mfu_pct")] == [1.5]
    assert client.get_metric_history(run, "x") == []  # NaN is left out, as JSONL writes null
    assert runs["abc"].data.params["model.variant"] == "tiny"
    arts = [a.path for a in client.list_artifacts(run, "images")]
    assert arts == ["images/gallery_0_step00000001.png"]
