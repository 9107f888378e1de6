#!/usr/bin/env python
"""Checkpoint conversion benchmark: wall time and peak RSS for a g/16-shaped checkpoint.

    python benchmarks/convert.py              # g/16 shape, 1.54 G params (3.1 GB bf16), ~3 min
    python benchmarks/convert.py --quick      # 0.2 G params, ~20 s (smoke run)
    python benchmarks/convert.py --tp 2 --pp 2 --workdir /scratch/bench   # keep the files there

Steps, each conversion in a fresh child process (so its peak RSS, VmHWM, is its own):
1. write a random g/16-shaped checkpoint in the released HF format (bf16, one model.safetensors,
   streamed, not timed);
2. from-hf: HF → Megatron torch_dist (--tp/--pp chunking, dtype kept: bf16);
3. to-hf: Megatron → HF (bf16), a fresh export.
The goal is peak RSS < 2× the checkpoint size in each direction (streaming: one rule's tensors
in memory at a time). Lines per direction come first; the last line is machine-readable:
    BENCH convert seconds=<from-hf + to-hf> peak_rss_gib=<max of both> checkpoint_gib=<size>
    rss_ratio=<peak / size>
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genlip_megatron.config import decode_variant  # noqa: E402

GIB = 1024 ** 3


def _vm_hwm() -> int:
    """Peak resident set size of this process in bytes (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _write_random_hf(dst: Path, m) -> int:
    """A random HF export (bf16), streamed tensor by tensor; returns its tensor bytes."""
    from genlip_megatron.convert.converter import write_hf_files
    from genlip_megatron.convert.registry import hf_pattern, hf_shapes, mapping_registry
    from genlip_megatron.convert.safetensors_io import SafetensorsStreamWriter

    dst.mkdir(parents=True)
    shapes = hf_shapes(m)
    keys = mapping_registry(m).hf_keys()
    layout = [(k, shapes[hf_pattern(k)], torch.bfloat16) for k in keys]
    gen = torch.Generator().manual_seed(0)
    with SafetensorsStreamWriter(dst / "model.safetensors", layout) as w:
        for name, shape, dtype in layout:
            w.write(name, (torch.randn(shape, generator=gen) * 0.02).to(dtype))
    write_hf_files(dst, m, dtype="bf16", vision_only=False)
    return sum(torch.Size(s).numel() * 2 for _, s, _ in layout)


def _child(direction: str, src: str, dst: str, tp: int, pp: int, queue) -> None:
    from genlip_megatron.convert import hf_to_megatron, megatron_to_hf

    base = _vm_hwm()
    t0 = time.perf_counter()
    if direction == "from-hf":
        hf_to_megatron(src, dst, tp=tp, pp=pp, progress=False)
    else:
        megatron_to_hf(src, dst, dtype="bf16", progress=False, require_tokenizer=False)
    queue.put((time.perf_counter() - t0, _vm_hwm(), base))


def _run(direction: str, src: Path, dst: Path, tp: int, pp: int) -> tuple[float, int, int]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(direction, str(src), str(dst), tp, pp, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if proc.exitcode:
        raise RuntimeError(f"{direction} failed with exit code {proc.exitcode}")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="0.2 G-param shape instead of g/16")
    p.add_argument("--tp", type=int, default=2, help="target TP layout of from-hf")
    p.add_argument("--pp", type=int, default=2, help="target PP layout of from-hf")
    p.add_argument("--workdir", help="where to write the checkpoints (kept); default: a temp "
                                     "dir that is removed")
    args = p.parse_args(argv)
    m = decode_variant("g/16")
    if args.quick:  # g/16 proportions, 6 layers, half width: ~0.2 G params (mostly vocab)
        m = dataclasses.replace(m, variant="custom", hidden_size=768, num_layers=6,
                                ffn_hidden_size=2048, text_dim=512)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_conv_"))
    try:
        for sub in ("hf", "mg", "hf_out"):
            shutil.rmtree(work / sub, ignore_errors=True)
        t0 = time.perf_counter()
        size = _write_random_hf(work / "hf", m)
        print(f"wrote a random {m.variant} HF checkpoint: {size / GIB:.2f} GiB "
              f"({size // 2 / 1e9:.2f} G params) in {time.perf_counter() - t0:.0f} s", flush=True)
        total, peak = 0.0, 0
        for direction, src, dst in (("from-hf", work / "hf", work / "mg"),
                                    ("to-hf", work / "mg", work / "hf_out")):
            sec, hwm, base = _run(direction, src, dst, args.tp, args.pp)
            total, peak = total + sec, max(peak, hwm)
            print(f"{direction}: {sec:.1f} s, peak RSS {hwm / GIB:.2f} GiB (process baseline "
                  f"{base / GIB:.2f} GiB) = {hwm / size:.2f}x the checkpoint", flush=True)
        print(f"BENCH convert seconds={total:.1f} peak_rss_gib={peak / GIB:.2f} "
              f"checkpoint_gib={size / GIB:.2f} rss_ratio={peak / size:.2f}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
