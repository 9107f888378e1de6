#!/usr/bin/env python
"""Put two or more runs side by side from their metric logs (FP8-vs-BF16, ablations).

    python tools/compare_runs.py runs/demo runs/demo_no_ga --out compare.png
    python tools/compare_runs.py runs/a/metrics.jsonl runs/b/metrics.jsonl --names bf16 fp8

Each RUN is a run directory holding ``metrics.jsonl`` (``logging.jsonl_path``) or the JSONL
file itself. Writes one PNG with the training-loss and validation-loss curves of every run, and
prints a markdown table: final training loss, final validation loss, the last evaluator-suite
numbers (caption CIDEr / exact match / loss, zero-shot accuracy, attentive-probe accuracy,
segmentation-probe mIoU), median throughput (samples/s, tokens/s over the logged windows, the
first one excluded: it holds start-up), the last attention-sink mass of the training-time probe
(``logging.attention_sink_interval``) and of the suite's sink evaluator (mean over layers).
Missing metrics show as ``-``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

COLUMNS = [("final loss", "loss/global_avg"), ("val loss", "loss/val"),
           ("CIDEr", "caption/cider"), ("exact match", "caption/exact_match"),
           ("caption loss", "caption/loss"), ("zero-shot acc", "zeroshot/accuracy"),
           ("probe acc", "probe/accuracy"), ("seg mIoU", "seg/miou"),
           ("samples/s", "throughput/samples_per_s"), ("tokens/s", "throughput/tps"),
           ("sink mass", "attention_sink/first_image_token_mass"),
           ("sink mass (eval)", "sink/mass_mean")]
_MEDIAN = {"throughput/samples_per_s", "throughput/tps"}


@dataclass
class RunLog:
    """The curves and last values of one run's JSONL."""

    name: str
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def last(self, key: str) -> Optional[float]:
        points = self.curves.get(key)
        return points[-1][1] if points else None

    def summary(self, key: str) -> Optional[float]:
        """Median over logged windows (first excluded) for throughput, else the last value."""
        if key in _MEDIAN:
            values = [v for _, v in self.curves.get(key, [])[1:]] or \
                [v for _, v in self.curves.get(key, [])]
            return statistics.median(values) if values else None
        return self.last(key)


def read_run(path: Path, name: Optional[str] = None) -> RunLog:
    """Parse a run dir or JSONL; a repeated step (resume) keeps its last record."""
    file = path / "metrics.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (set logging.jsonl_path in the run).")
    by_key: dict[str, dict[int, float]] = {}
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{file}:{n} is not JSON; is this a metrics JSONL?") from None
        step = int(rec.get("step", -1))
        for key, value in rec.items():
            if key != "step" and isinstance(value, (int, float)):
                by_key.setdefault(key, {})[step] = float(value)
    default = path.name if path.is_dir() else path.parent.name
    return RunLog(name or default, {k: sorted(v.items()) for k, v in by_key.items()})


def markdown_table(runs: list[RunLog]) -> str:
    """One row per run, one column per metric (``-`` where a run did not log it)."""
    head = "| run | " + " | ".join(c for c, _ in COLUMNS) + " |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for run in runs:
        cells = []
        for _, key in COLUMNS:
            v = run.summary(key)
            cells.append("-" if v is None else f"{v:.4g}")
        rows.append(f"| {run.name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(runs: list[RunLog], out: Path) -> None:
    """Training loss (left) and validation loss (right), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (key, title) in zip(axes, (("loss/global_avg", "training loss"),
                                       ("loss/val", "validation loss"))):
        for run in runs:
            points = run.curves.get(key, [])
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], label=run.name,
                        marker="o" if key == "loss/val" else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("nats / token")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run dirs (with metrics.jsonl) or JSONLs")
    p.add_argument("--names", nargs="*", help="labels, one per run (default: folder names)")
    p.add_argument("--out", type=Path, default=Path("compare_runs.png"), help="PNG to write")
    args = p.parse_args(argv)
    try:
        if args.names and len(args.names) != len(args.runs):
            raise ValueError(f"--names gives {len(args.names)} labels for {len(args.runs)} runs.")
        names = args.names or [None] * len(args.runs)
        runs = [read_run(r, n) for r, n in zip(args.runs, names)]
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plot(runs, args.out)
    print(markdown_table(runs))
    print(f"\ncurves: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
