"""Metric sinks: one ``log(metrics, step)`` call feeds console, JSONL, TensorBoard, W&B, MLflow.

Keys are ``/``-namespaced and carry their unit (``loss/global_avg``, ``throughput/tps``,
``memory/max_allocated(GiB)``, ``data/skipped/<reason>``), as in torchtitan's metrics.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from genlip_megatron.config.training import LoggingConfig
from genlip_megatron.training.tracking import build_trackers, new_run_id

logger = logging.getLogger(__name__)


def memory_metrics() -> dict[str, float]:
    """Peak accelerator memory on GPU; resident set size on CPU."""
    gib = 1024.0**3
    if torch.cuda.is_available():
        return {"memory/max_allocated(GiB)": torch.cuda.max_memory_allocated() / gib,
                "memory/max_reserved(GiB)": torch.cuda.max_memory_reserved() / gib}
    import psutil

    return {"memory/rss(GiB)": psutil.Process(os.getpid()).memory_info().rss / gib}


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{int(n)}"


def console_line(step: int, total: int, m: dict[str, float], note: str = "") -> str:
    """The fixed-format progress line printed every log step (and for every skipped step)."""
    parts = [f"step {step:>6d}/{total}", f"loss {m.get('loss/global_avg', float('nan')):.4f}",
             f"lr {m.get('lr', 0.0):.3e}", f"grad_norm {m.get('grad_norm', float('nan')):.3f}",
             f"tokens {int(m.get('tokens/loss', 0))}"]
    if "time/step(s)" in m:
        parts.append(f"{m['time/step(s)']:.3f}s/step")
    if "time/eta(s)" in m:
        parts.append(f"eta {_hms(m['time/eta(s)'])}")
    parts += [f"samples/s {m.get('throughput/samples_per_s', 0.0):.1f}",
              f"tps {m.get('throughput/tps', 0.0):.0f}",
              f"tflops {m.get('throughput/tflops_per_device', 0.0):.2f}"]
    if "mfu(%)" in m:
        parts.append(f"mfu {m['mfu(%)']:.1f}%")
    mem = m.get("memory/max_allocated(GiB)", m.get("memory/rss(GiB)"))
    if mem is not None:
        parts.append(f"mem {mem:.2f}GiB")
    if "consumed/samples" in m:
        parts.append(f"consumed {_count(m['consumed/samples'])} samples "
                     f"{_count(m.get('consumed/tokens', 0))} tokens")
    skipped = sum(v for k, v in m.items() if k.startswith("data/skipped/"))
    if skipped:
        parts.append(f"skipped {int(skipped)}")
    if m.get("train/skipped_steps_total"):
        parts.append(f"skipped_steps {int(m['train/skipped_steps_total'])}")
    line = " | ".join(parts)
    if m.get("train/skipped_step"):
        line = f"SKIPPED {line}" + (f" | {note}" if note else "")
    return line


def json_safe(metrics: dict) -> dict:
    """NaN/inf → None, so the JSONL is strict JSON (``null``, never a bare ``NaN``)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in metrics.items()}


def drop_partial_last_line(path: Path) -> None:
    """Cut a record a killed process left half-written, so appending keeps one JSON per line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        fh.truncate(keep)
    logger.warning("%s ended with a partial record (%d bytes, from a killed run); removed it.",
                   path, len(data) - keep)


class RunTotals:
    """Run-long counters that survive a resume: consumed samples and tokens, skipped steps, and
    the label histogram behind the final ``unigram_loss``.

    Each rank counts its own batches on the host; :meth:`sync` (a collective over the
    data-parallel group, called on log steps, before a save and at the end) sums the pending
    counts over DP and folds them into the totals, which are identical on every rank and live in
    ``TrainingState.extra`` (saved with the checkpoint), so a resumed run ends with the same
    totals as an uninterrupted one.
    """

    def __init__(self, extra: dict, vocab_size: int):
        self.extra = extra
        self.vocab_size = vocab_size
        extra.setdefault("consumed_samples", 0)
        extra.setdefault("consumed_tokens", 0)
        extra.setdefault("skipped_steps", 0)
        if extra.get("label_counts") is None:
            extra["label_counts"] = torch.zeros(vocab_size, dtype=torch.int64)
        self._pending = Counter()
        self._labels = torch.zeros(vocab_size, dtype=torch.int64)
        self.window = Counter()
        """Globally reduced samples/tokens/flops since :meth:`take_window` (throughput)."""

    def add_batch(self, samples: int, tokens: int, flops: float, labels: torch.Tensor) -> None:
        """Count one micro-batch of this rank (host tensors: no device sync)."""
        self._pending["samples"] += samples
        self._pending["tokens"] += tokens
        self._pending["flops"] += flops
        counts = torch.bincount(labels[labels >= 0].reshape(-1).cpu(), minlength=self.vocab_size)
        if counts.numel() > self.vocab_size:
            raise RuntimeError(f"label id {counts.numel() - 1} ≥ model.vocab_size "
                               f"({self.vocab_size}): the tokenizer does not fit the model.")
        self._labels += counts

    def add_skip(self) -> None:
        """One skipped optimizer step (the decision is global: every rank calls this)."""
        self.extra["skipped_steps"] += 1

    def sync(self, group=None, device: Optional[torch.device] = None) -> None:
        """Sum the pending counts over ``group`` (collective) and fold them into the totals."""
        device = device or torch.device("cpu")
        agg = torch.tensor([self._pending["samples"], self._pending["tokens"],
                            self._pending["flops"]], dtype=torch.float64, device=device)
        labels = self._labels.to(device)
        if dist.is_initialized():
            dist.all_reduce(agg, group=group)
            dist.all_reduce(labels, group=group)
        samples, tokens, flops = agg.tolist()
        self.extra["consumed_samples"] += int(samples)
        self.extra["consumed_tokens"] += int(tokens)
        self.extra["label_counts"] = self.extra["label_counts"] + labels.cpu()
        self.window.update({"samples": samples, "tokens": tokens, "flops": flops})
        self._pending = Counter()
        self._labels.zero_()

    def take_window(self) -> Counter:
        """The reduced counts since the last call (and start a new window)."""
        window, self.window = self.window, Counter()
        return window

    def metrics(self) -> dict[str, float]:
        """The totals as metrics (``consumed/*``, ``train/skipped_steps_total``)."""
        return {"consumed/samples": float(self.extra["consumed_samples"]),
                "consumed/tokens": float(self.extra["consumed_tokens"]),
                "train/skipped_steps_total": float(self.extra["skipped_steps"])}


class MetricLogger:
    """Fan-out of metrics to the configured sinks; only the logging rank constructs sinks."""

    def __init__(self, cfg: LoggingConfig, enabled: bool, run_config: Optional[dict] = None,
                 total_steps: int = 0, run_id: Optional[str] = None):
        self.cfg = cfg
        self.enabled = enabled
        self.total_steps = total_steps
        self._tb = None
        self._trackers: list = []
        self._jsonl = None
        if not enabled:
            return
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=cfg.tensorboard_dir)
            text = json.dumps(run_config or {}, indent=1, default=str)
            self._tb.add_text("config", f"```\n{text}\n```")
            if cfg.tags:
                self._tb.add_text("tags", ", ".join(cfg.tags))
        if cfg.jsonl_path:
            Path(cfg.jsonl_path).parent.mkdir(parents=True, exist_ok=True)
            drop_partial_last_line(Path(cfg.jsonl_path))
            self._jsonl = open(cfg.jsonl_path, "a", encoding="utf-8")
        # W&B and MLflow (tracking.py): same metric dicts, config and tags; a resumed run
        # passes the run id saved in its checkpoint and continues the same tracker run.
        self._trackers = build_trackers(cfg, run_id or new_run_id(), run_config)

    def log(self, metrics: dict[str, float], step: int, console: bool = True,
            note: str = "") -> None:
        """Write ``metrics`` for ``step`` to every sink (``note``: console only)."""
        if not self.enabled:
            return
        if console:
            line = console_line(step, self.total_steps, metrics, note)
            if metrics.get("train/skipped_step"):
                logger.warning(line)
            else:
                logger.info(line)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **json_safe(metrics)},
                                         allow_nan=False) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)
        for tracker in self._trackers:
            tracker.log(metrics, step)

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        """Log uint8 ``[H, W, 3]`` images (e.g. an evaluation gallery) to TensorBoard, W&B and
        MLflow under their keys."""
        if not self.enabled:
            return
        if self._tb is not None:
            for key, img in images.items():
                self._tb.add_image(key, np.asarray(img), step, dataformats="HWC")
        for tracker in self._trackers:
            tracker.log_images(images, step)

    def close(self) -> None:
        """Flush and close every sink."""
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []
