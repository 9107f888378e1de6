"""Experiment trackers behind the metric logger: Weights & Biases and MLflow (docs/tracking.md).

Both receive exactly what the JSONL and TensorBoard sinks receive (the metric dict of every
log step, under the same keys and step numbers), the run config and ``logging.tags``. Both
are optional imports: asking for one that is not installed is a one-line config error.

A resumed run continues the same tracker run. The run id (``logging`` key ``tracking_run_id``
in the checkpoint's training state) is drawn once at a fresh start and saved with every
checkpoint, so a killed run restarted from its checkpoint logs into the same W&B run
(``wandb.init(id=..., resume="allow")``) and the same MLflow run (found by its
``genlip.run_id`` tag, since MLflow picks its own run ids).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from typing import Any, Optional

import numpy as np

from genlip_megatron.config.loader import ConfigError

logger = logging.getLogger(__name__)

RUN_ID_TAG = "genlip.run_id"
_MLFLOW_BATCH = 900  # MLflow's log_batch takes at most 1000 metrics per call


def mlflow_key(key: str) -> str:
    """Our metric key as MLflow accepts it (alphanumerics, ``_-. :/`` only): the unit suffix
    ``(GiB)`` becomes ``_GiB`` and ``%`` becomes ``pct`` (``mfu(%)`` → ``mfu_pct``)."""
    key = key.replace("%", "pct").replace("(", "_").replace(")", "")
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", key)


def new_run_id() -> str:
    """A fresh tracker run id (lower-case hex: valid for W&B and as an MLflow tag)."""
    return uuid.uuid4().hex[:16]


def _import(module: str, key: str, package: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ConfigError(f"{key} is set but {package} is not installed; `pip install "
                          f"{package}` or unset {key}.") from None


class WandbSink:
    """One W&B run (``mode`` offline writes ``<dir>/wandb/offline-run-*`` with no network)."""

    def __init__(self, cfg, run_id: str, run_config: dict) -> None:
        wandb = _import("wandb", "logging.wandb_project", "wandb")
        kwargs = {"mode": cfg.wandb_mode} if cfg.wandb_mode else {}
        try:  # W&B writes its run file every 15 s by default: a SIGKILL loses up to that much
            kwargs["settings"] = wandb.Settings(
                x_transaction_log_flush_interval=cfg.wandb_flush_interval_s)
        except Exception:  # noqa: BLE001 - a private setting; older/newer wandb may lack it
            logger.info("wandb has no x_transaction_log_flush_interval; using its default")
        if cfg.wandb_dir:
            os.makedirs(cfg.wandb_dir, exist_ok=True)
            kwargs["dir"] = cfg.wandb_dir
        self.run = wandb.init(project=cfg.wandb_project, id=run_id, resume="allow",
                              name=cfg.run_name, tags=list(cfg.tags), config=run_config,
                              **kwargs)
        self._wandb = wandb

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        self.run.log({k: self._wandb.Image(v) for k, v in images.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    """One MLflow run in ``tracking_uri`` (``file:///…`` store or an ``http://`` server)."""

    def __init__(self, cfg, run_id: str, run_config: dict) -> None:
        _import("mlflow", "logging.mlflow_tracking_uri", "mlflow")
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        if cfg.mlflow_tracking_uri.startswith("file:"):
            # MLflow ≥ 3.7 refuses its file store unless asked; a local directory is what a
            # cluster without a tracking server has.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=cfg.mlflow_tracking_uri)
        exp = self.client.get_experiment_by_name(cfg.mlflow_experiment)
        exp_id = exp.experiment_id if exp is not None else \
            self.client.create_experiment(cfg.mlflow_experiment)
        found = self.client.search_runs([exp_id], f"tags.`{RUN_ID_TAG}` = '{run_id}'",
                                        max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            logger.info("mlflow: continuing run %s (%s)", self.run_id, run_id)
            return
        tags = {RUN_ID_TAG: run_id, **{t: "true" for t in cfg.tags}}
        self.run_id = self.client.create_run(exp_id, tags=tags,
                                             run_name=cfg.run_name).info.run_id
        flat = _flatten(run_config)
        params = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(params), 100):  # log_batch: ≤ 100 params per call
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_batch(self.run_id, tags=[RunTag("genlip.config", json.dumps(
            run_config, default=str)[:5000])])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(mlflow_key(k), float(v), now, step) for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)]
        for i in range(0, len(rows), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=rows[i:i + _MLFLOW_BATCH])

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        for key, img in images.items():
            self.client.log_image(self.run_id, np.asarray(img), artifact_file=f"images/"
                                  f"{mlflow_key(key).replace('/', '_')}_step{step:08d}.png")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config → ``{"a.b.c": value}`` (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def build_trackers(cfg, run_id: str, run_config: Optional[dict]) -> list:
    """The trackers ``cfg`` (the ``logging`` section) asks for."""
    out: list = []
    if cfg.wandb_project:
        out.append(WandbSink(cfg, run_id, run_config or {}))
    if cfg.mlflow_tracking_uri:
        out.append(MlflowSink(cfg, run_id, run_config or {}))
    return out
