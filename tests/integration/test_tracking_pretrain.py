"""pretrain_genlip.py logging to W&B (offline, no network) and MLflow (file store).

The metric series both trackers hold equal the JSONL's, and a run killed after its step-4
checkpoint and resumed keeps logging into the same W&B run id and the same MLflow run.
"""

from __future__ import annotations

import math
import os

import pytest

from training_helpers import make_tiny_data, run_pretrain, tiny_overrides

pytest.importorskip("wandb", reason="wandb is optional; the newest-stack lane lacks it")
pytest.importorskip("mlflow", reason="mlflow is optional; the newest-stack lane lacks it")

from genlip_megatron.training.tracking import mlflow_key  # noqa: E402
from wandb_records import history  # noqa: E402

pytestmark = pytest.mark.slow  # a killed run and its resume (~30 s each on 2 busy cores)


def _jsonl_series(path) -> dict[int, dict]:
    """step → metrics (the last record of a step wins, as a resumed run re-logs it)."""
    import json

    out: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[int(rec.pop("step"))] = rec
    return out


def _same(a: dict[int, dict], b: dict[int, dict], keys: list[str]) -> None:
    """Every step of ``b`` holds ``a``'s values for ``keys``."""
    for step in b:
        for key in keys:
            x, y = a[step].get(key), b[step].get(key)
            if x is None or (isinstance(x, float) and not math.isfinite(x)):
                continue  # JSONL writes NaN as null; the trackers skip or keep it
            assert y is not None and math.isclose(x, y, rel_tol=0, abs_tol=1e-12), \
                (step, key, x, y)


def test_wandb_offline_and_mlflow_file_store_equal_jsonl_across_a_resume(tmp_path,
                                                                          monkeypatch):
    from mlflow.tracking import MlflowClient

    data = make_tiny_data(tmp_path / "data")
    run = tmp_path / "run"
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file://{tmp_path / 'mlruns'}"
    sets = tiny_overrides(data, run) + [
        "logging.wandb_project=genlip-test", "logging.wandb_mode=offline",
        f"logging.wandb_dir={tmp_path / 'wb'}", f"logging.mlflow_tracking_uri={uri}",
        "logging.run_name=tiny", "logging.tags=[ci, tiny]",
        "logging.wandb_flush_interval_s=0.1"]
    killed = run_pretrain(sets, fault="after_step:6")
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    resumed = run_pretrain(sets)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-6000:]

    jsonl = _jsonl_series(run / "metrics.jsonl")
    keys = sorted({k for rec in jsonl.values() for k, v in rec.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
    assert "loss/global_avg" in keys and sorted(jsonl) == list(range(1, 9))

    # W&B: two offline run files (killed + resumed), one run id, series = JSONL (last wins)
    files = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2, files
    ids, wb = set(), {}
    for f in files:
        run_id, steps = history(f)
        ids.add(run_id)
        wb.update(steps)
    assert len(ids) == 1, ids
    # The killed process loses at most logging.wandb_flush_interval_s of W&B history (W&B
    # writes its run file in batches): steps 1-3 were written long before the kill (the step-4
    # checkpoint took longer than that), and the resumed run re-logs 5-8.
    assert {1, 2, 3, 5, 6, 7, 8} <= set(wb), sorted(wb)
    _same(jsonl, wb, keys)

    # MLflow: one run (found again by its genlip.run_id tag), series = JSONL (last wins)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("genlip")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    r = runs[0]
    assert r.data.tags["genlip.run_id"] == ids.pop()
    assert r.data.tags.get("ci") == "true" and r.info.run_name == "tiny"
    assert r.data.params["training.train_steps"] == "8"
    ml: dict[int, dict] = {}
    for key in keys:
        for m in sorted(client.get_metric_history(r.info.run_id, mlflow_key(key)),
                        key=lambda m: m.timestamp):
            ml.setdefault(m.step, {})[key] = m.value
    assert sorted(ml) == sorted(jsonl)  # MLflow's file store writes every call at once
    _same(jsonl, ml, keys)
    assert os.path.isdir(tmp_path / "mlruns")
