"""Throughput/memory sweep: preset × TP/SP/PP × micro-batch × recompute × precision × attention.

Run as ``python benchmarks/sweep.py --out-dir DIR`` (CPU: tiny points, run in-process) or
``... --gpu-recipe`` (the GPU grid: every point is a ``torchrun ... pretrain_genlip.py`` launch
on this node; its metrics JSONL gives tokens/s and peak memory). It reuses the workloads and the
step of ``benchmarks/throughput.py`` (imports point one way: sweep → throughput).

Writes ``DIR/sweep.csv`` (one row per point, failed points with their status), ``DIR/sweep.md``
(the same as a markdown table) and ``DIR/sweep.png`` (tokens/s and memory per point, one series
per precision). On CPU, memory is the measured model state + peak saved activations
(``training/memory.py``, the planner's check), FP8 is the CPU emulation, TP = PP = 1.
"""

from __future__ import annotations

import argparse
import csv
import logging
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.throughput import PrebuiltBatches, Workload, batch_flops, ensure_data, \
    init_single_process, load_cfg, trainer_step  # noqa: E402

PRECISIONS_GPU = ("bf16", "fp8-delayed", "fp8-tensorwise", "fp8-mxfp8", "fp8-blockwise")
PRECISIONS_CPU = ("fp32", "bf16", "fp8-emulated")


@dataclass
class Point:
    """One sweep point and what it measured."""

    preset: str
    tp: int
    sp: bool
    pp: int
    micro_batch: int
    recompute: str          # none | selective | full
    precision: str
    attention: str
    tokens_per_s: float = float("nan")
    tflops_per_device: float = float("nan")
    memory_gib: float = float("nan")
    status: str = "ok"

    @property
    def label(self) -> str:
        par = f"tp{self.tp}{'+sp' if self.sp else ''} pp{self.pp}"
        return f"{self.preset} {par} mb{self.micro_batch} rc-{self.recompute} {self.attention}"

    def overrides(self) -> list[str]:
        sets = [f"model.variant={self.preset}", f"model.attention_backend={self.attention}",
                f"parallel.tp={self.tp}", f"parallel.pp={self.pp}",
                f"parallel.sp={'true' if self.sp else 'false'}",
                f"training.micro_batch_size={self.micro_batch}"]
        if self.recompute != "none":
            sets.append(f"parallel.recompute.granularity={self.recompute}")
        if self.precision in ("fp32", "bf16"):
            sets.append(f"precision.params_dtype={self.precision}")
        elif self.precision == "fp8-emulated":
            sets += ["precision.params_dtype=fp32",
                     "precision.fp8={recipe: tensorwise, emulate: true}"]
        else:
            recipe = self.precision.split("-", 1)[1]
            sets += ["precision.params_dtype=bf16", f"precision.fp8={{recipe: {recipe}}}",
                     "model.transformer_impl=te"]
        return sets


def cpu_grid() -> list[Point]:
    """Tiny points that exercise every axis the CPU can run."""
    points = []
    for mbs, rc, prec in itertools.product((1, 2), ("none", "full"), PRECISIONS_CPU):
        points.append(Point("tiny", 1, False, 1, mbs, rc, prec, "varlen"))
    points.append(Point("tiny", 1, False, 1, 1, "selective", "fp32", "dense"))
    return points


def gpu_grid(gpus: int) -> list[Point]:
    """The GPU recipe: every combination whose TP·PP fits on this node."""
    points = []   # 1200 points on 8 GPUs (1–2 min each): choose with --filter/--limit
    for preset, (tp, sp, pp), mbs, rc, prec, attn in itertools.product(
            ("L/16", "So/16", "g/16", "G/16"), ((1, False, 1), (2, True, 1), (4, True, 1),
                                                (2, True, 2), (1, False, 2)),
            (1, 2), ("none", "selective", "full"), PRECISIONS_GPU, ("te", "flex")):
        if tp * pp <= gpus:
            points.append(Point(preset, tp, sp, pp, mbs, rc, prec, attn))
    return points


# ---------------------------------------------------------------------------------------------
# Running points
# ---------------------------------------------------------------------------------------------

def run_cpu_point(point: Point, data_dir: Path, steps: int = 2) -> None:
    """In-process: trainer steps on pre-built batches; memory by tensor accounting."""
    from genlip_megatron.training.flops import FlopDims
    from genlip_megatron.training.memory import SavedActivationMeter, model_state_storages
    from genlip_megatron.training.parallel import destroy_topology
    from genlip_megatron.training.trainer import Trainer

    w = Workload("sweep", point.preset, 2, 512, 1)
    drop = [s for s in point.overrides() if not s.startswith(("model.variant",))]
    cfg = load_cfg(w, data_dir, point.attention, 0,
                   extra=drop + [f"training.global_batch_size={point.micro_batch}"])
    trainer = Trainer(cfg)
    try:
        for chunk in trainer.model:
            chunk.train()
        batches = [next(trainer.loader) for _ in range(2)]
        trainer.loader = PrebuiltBatches(batches)
        trainer_step(trainer)                                 # warm-up, optimizer states
        state = model_state_storages(trainer.model, trainer.optimizer)
        dims = FlopDims.from_model_config(cfg.model)
        rates, tflops = [], []
        with SavedActivationMeter(state) as meter:
            for i in range(steps):
                b = batches[(i + 1) % len(batches)]
                t0 = time.perf_counter()
                trainer_step(trainer)
                dt = time.perf_counter() - t0
                rates.append(b.num_real_tokens / dt)
                tflops.append(batch_flops(dims, b) / dt / 1e12)
        point.tokens_per_s = statistics.median(rates)
        point.tflops_per_device = statistics.median(tflops)
        point.memory_gib = (sum(state.values()) + meter.peak) / 2**30
    finally:
        trainer.close()
        destroy_topology()


def run_gpu_point(point: Point, gpus: int, config: Path, data_sets: list[str], steps: int,
                  workdir: Path) -> None:
    """One torchrun launch of pretrain_genlip.py; reads the last logged window."""
    metrics = workdir / f"{abs(hash(point.label + point.precision))}.jsonl"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}",
           f"--master-port={port}", str(REPO / "pretrain_genlip.py"), "--config", str(config),
           "--set", *point.overrides(), *data_sets, f"training.train_steps={steps}",
           f"logging.log_interval={max(steps // 2, 1)}", f"logging.jsonl_path={metrics}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        point.status = ("oom" if "out of memory" in (proc.stderr or "").lower()
                        else f"failed: {tail[-1][:120] if tail else proc.returncode}")
        return
    last = [json.loads(x) for x in metrics.read_text().splitlines() if "throughput/tps" in x][-1]
    point.tokens_per_s = last["throughput/tps"]
    point.tflops_per_device = last["throughput/tflops_per_device"]
    point.memory_gib = last.get("memory/max_allocated(GiB)", float("nan"))


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def write_outputs(points: list[Point], out: Path, title: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(p) for p in points]
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    head = ("| preset | tp | sp | pp | mb | recompute | precision | attention | tokens/s | "
            "TFLOP/s/dev | memory GiB | status |")
    lines = [f"# {title}", "", head, "|" + "---|" * 12]
    for p in points:
        lines.append(f"| {p.preset} | {p.tp} | {p.sp} | {p.pp} | {p.micro_batch} | "
                     f"{p.recompute} | {p.precision} | {p.attention} | {p.tokens_per_s:.0f} | "
                     f"{p.tflops_per_device:.4f} | {p.memory_gib:.4f} | {p.status} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    plot(points, out / "sweep.png", title)
    return [out / "sweep.csv", out / "sweep.md", out / "sweep.png"]


def plot(points: list[Point], path: Path, title: str) -> None:
    """Two panels (tokens/s, memory) over the non-precision settings; a series per precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(p.label for p in points))
    precisions = list(dict.fromkeys(p.precision for p in points))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.55 * len(labels) + 3), 8), sharex=True)
    markers = "osD^vP*X"
    for k, prec in enumerate(precisions):
        mine = {p.label: p for p in points if p.precision == prec and p.status == "ok"}
        xs = [i for i, lab in enumerate(labels) if lab in mine]
        for ax, attr in zip(axes, ("tokens_per_s", "memory_gib")):
            ax.plot(xs, [getattr(mine[labels[i]], attr) for i in xs], marker=markers[k % 8],
                    linestyle="-", label=prec)
    axes[0].set_ylabel("throughput (tokens/s)")
    axes[1].set_ylabel("peak memory per rank (GiB)")
    axes[1].set_xlabel("setting (preset, TP/SP/PP, micro-batch, recompute, attention)")
    axes[1].set_xticks(range(len(labels)))
    axes[1].set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(title="precision", fontsize=8)
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def select(points: list[Point], filters: str, limit: Optional[int]) -> list[Point]:
    """Points whose ``label precision`` contains every comma-separated filter; first ``limit``."""
    want = [f.strip() for f in filters.split(",") if f.strip()]
    chosen = [p for p in points if all(w in f"{p.label} {p.precision}" for w in want)]
    return chosen[:limit]


def run_sweep(out: Path, gpu: bool = False, steps: int = 2, limit: Optional[int] = None,
              data_root: Optional[Path] = None, filters: str = "") -> int:
    """Run the grid, write CSV/markdown/PNG, print one BENCH line."""
    t0 = time.time()
    if gpu:
        import torch

        if not torch.cuda.is_available():
            print("error: --gpu-recipe needs CUDA GPUs; without --gpu-recipe the sweep runs "
                  "tiny CPU points.", file=sys.stderr)
            return 2
        gpus = torch.cuda.device_count()
        points = select(gpu_grid(gpus), filters, limit)
        data = ensure_data(data_root or REPO / ".cache" / "bench_throughput", 1)
        config = REPO / "examples" / "configs" / "base" / "stage1.yaml"
        sets = [f"data.sources=[{{paths: '{data}/train/*.tar'}}]", "checkpoint.save_dir=null",
                "logging.tensorboard_dir=null", "logging.attention_sink_interval=0",
                f"data.text.tokenizer_path={data}/tokenizer.json", "data.max_seq_len=8192",
                "data.image={policy: fixed, fixed_size: 224, decoder: dali, device: auto}",
                f"training.global_batch_size={gpus * 4}", "model.drop_path_rate=0.0"]
        with tempfile.TemporaryDirectory() as work:
            for p in points:
                run_gpu_point(p, gpus, config, sets, max(steps, 10), Path(work))
        title = f"GenLIP sweep on {gpus}× {torch.cuda.get_device_name()}"
    else:
        data = ensure_data(data_root or REPO / ".cache" / "bench_throughput", 1)
        points = select(cpu_grid(), filters, limit)
        if not points:
            print(f"error: --filter '{filters}' selects no point.", file=sys.stderr)
            return 2
        for p in points:
            try:
                run_cpu_point(p, data, steps)
            except Exception as e:  # noqa: BLE001 - a failed point is a row, not the sweep
                p.status = f"failed: {type(e).__name__}: {str(e)[:100]}"
        title = f"GenLIP tiny CPU sweep ({os.cpu_count()} cores, fp8 emulated)"
    if not points:
        print(f"error: --filter '{filters}' selects no point.", file=sys.stderr)
        return 2
    files = write_outputs(points, out, title)
    ok = [p for p in points if p.status == "ok"]
    best = max(ok, key=lambda p: p.tokens_per_s) if ok else None
    print(f"wrote {', '.join(str(f) for f in files)} ({time.time() - t0:.0f} s)")
    print(f"BENCH sweep points={len(points)} ok={len(ok)} "
          f"best_tokens_per_s={best.tokens_per_s if best else float('nan'):.1f} "
          f"best='{best.label + ' ' + best.precision if best else 'none'}'", flush=True)
    return 0 if ok else 1


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default="sweep_out", help="output folder")
    p.add_argument("--limit", type=int, default=None, help="run only the first N points (tests)")
    p.add_argument("--filter", default="",
                   help="comma-separated substrings a point's label must all contain, "
                        "e.g. 'L/16,tp2,fp8-mxfp8'")
    p.add_argument("--gpu-recipe", action="store_true",
                   help="the full GPU grid (needs GPUs); default: tiny CPU points")
    p.add_argument("--data-dir", default=str(REPO / ".cache" / "bench_throughput"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.manual_seed(0)
    init_single_process()
    return run_sweep(Path(args.out_dir), gpu=args.gpu_recipe, limit=args.limit,
                     data_root=Path(args.data_dir), filters=args.filter)


if __name__ == "__main__":
    sys.exit(main())
