"""Metric sinks: one ``log(metrics, step)`` call feeds console, JSONL, TensorBoard and W&B.

Keys are ``/``-namespaced and carry their unit (``loss/global_avg``, ``throughput/tps``,
``memory/max_allocated(GiB)``, ``data/skipped/<reason>``), as in torchtitan's metrics.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from genlip_megatron.training.config import LoggingConfig

logger = logging.getLogger(__name__)


def memory_metrics() -> dict[str, float]:
    """Peak accelerator memory on GPU; resident set size on CPU."""
    gib = 1024.0**3
    if torch.cuda.is_available():
        return {"memory/max_allocated(GiB)": torch.cuda.max_memory_allocated() / gib,
                "memory/max_reserved(GiB)": torch.cuda.max_memory_reserved() / gib}
    import psutil

    return {"memory/rss(GiB)": psutil.Process(os.getpid()).memory_info().rss / gib}


def console_line(step: int, total: int, m: dict[str, float]) -> str:
    """The fixed-format progress line printed every log step."""
    parts = [f"step {step:>6d}/{total}", f"loss {m.get('loss/global_avg', float('nan')):.4f}",
             f"lr {m.get('lr', 0.0):.3e}", f"grad_norm {m.get('grad_norm', float('nan')):.3f}",
             f"tokens {int(m.get('tokens/loss', 0))}",
             f"samples/s {m.get('throughput/samples_per_s', 0.0):.1f}",
             f"tps {m.get('throughput/tps', 0.0):.0f}",
             f"tflops {m.get('throughput/tflops_per_device', 0.0):.2f}"]
    if "mfu(%)" in m:
        parts.append(f"mfu {m['mfu(%)']:.1f}%")
    mem = m.get("memory/max_allocated(GiB)", m.get("memory/rss(GiB)"))
    if mem is not None:
        parts.append(f"mem {mem:.2f}GiB")
    skipped = sum(v for k, v in m.items() if k.startswith("data/skipped/"))
    if skipped:
        parts.append(f"skipped {int(skipped)}")
    return " | ".join(parts)


class MetricLogger:
    """Fan-out of metrics to the configured sinks; only the logging rank constructs sinks."""

    def __init__(self, cfg: LoggingConfig, enabled: bool, run_config: Optional[dict] = None,
                 total_steps: int = 0):
        self.cfg = cfg
        self.enabled = enabled
        self.total_steps = total_steps
        self._tb = None
        self._wandb = None
        self._jsonl = None
        if not enabled:
            return
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=cfg.tensorboard_dir)
        if cfg.jsonl_path:
            Path(cfg.jsonl_path).parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(cfg.jsonl_path, "a", encoding="utf-8")
        if cfg.wandb_project:
            try:
                import wandb
            except Exception as exc:  # noqa: BLE001 - optional dependency
                raise RuntimeError("logging.wandb_project is set but wandb is not importable "
                                   f"({exc}); pip install wandb or unset it.") from exc
            self._wandb = wandb.init(project=cfg.wandb_project, config=run_config or {})

    def log(self, metrics: dict[str, float], step: int, console: bool = True) -> None:
        """Write ``metrics`` for ``step`` to every sink."""
        if not self.enabled:
            return
        if console:
            logger.info(console_line(step, self.total_steps, metrics))
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        """Flush and close every sink."""
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
