#!/usr/bin/env python
"""Rank parallel layouts for a GenLIP training run by predicted throughput (analytic model).

    python tools/plan_parallelism.py --preset L/16 --gpus 8
    python tools/plan_parallelism.py --preset g/16 --gpus 512 --gpu H100 --seq 16384 \\
        --global-batch 1024 --image-tokens 1024 --text-tokens 256
    python tools/plan_parallelism.py --hidden 4096 --layers 48 --heads 32 --ffn 11008 --gpus 64
    python tools/plan_parallelism.py --preset G/16 --table 8,64,512    # docs/benchmarks.md rows

The model (``genlip_megatron/training/planner.py``): per-rank memory of params, fp32 grads,
Adam/main weights under the distributed optimizer and activations (recompute, SP, pipeline
in-flight micro-batches), step time from flops.py's model FLOPs, TP/DP/PP traffic and the
pipeline bubble. Prints the fitting layouts, best first, with their ``--set`` flags.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genlip_megatron.config import VARIANTS, decode_variant  # noqa: E402
from genlip_megatron.config.loader import ConfigError  # noqa: E402
from genlip_megatron.training.planner import GPUS, ModelDims, plan  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="model variant, e.g. L/16, So/16, g/16, G/16")
    for name in ("hidden", "layers", "heads", "ffn", "text-dim", "vocab"):
        p.add_argument(f"--{name}", type=int, default=None, help="custom size (overrides)")
    p.add_argument("--gpus", type=int, default=8, help="total GPUs")
    p.add_argument("--gpu", default="H100", help=f"GPU type: {', '.join(GPUS)}")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--seq", type=int, default=8192, help="packed row length (data.max_seq_len)")
    p.add_argument("--global-batch", type=int, default=256, help="packed rows per step")
    p.add_argument("--image-tokens", type=int, default=196, help="image tokens per sample")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens per sample")
    p.add_argument("--intra-bw", type=float, default=None, help="GB/s per GPU inside a node")
    p.add_argument("--inter-bw", type=float, default=None, help="GB/s per GPU between nodes")
    p.add_argument("--efficiency", type=float, default=None, help="GEMM fraction of peak")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--table", default=None,
                   help="comma-separated GPU counts: print one best-layout row per count")
    return p.parse_args(argv)


def model_dims(args: argparse.Namespace) -> ModelDims:
    if args.preset is None and args.hidden is None:
        raise ConfigError("give --preset (one of "
                          f"{[k + '/16' for k in VARIANTS if k not in ('tiny', 'demo')]}) or a "
                          "custom size with --hidden/--layers/--heads/--ffn.")
    base = decode_variant(args.preset or "L/16")
    over = {"hidden_size": args.hidden, "num_layers": args.layers,
            "num_attention_heads": args.heads, "ffn_hidden_size": args.ffn,
            "text_dim": args.text_dim, "vocab_size": args.vocab}
    m = replace(base, **{k: v for k, v in over.items() if v is not None})
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"--hidden ({m.hidden_size}) must be divisible by --heads "
                          f"({m.num_attention_heads}).")
    return ModelDims.from_model_config(m)


def hardware(args: argparse.Namespace):
    gpu = args.gpu.upper()  # 'h100' and 'H100' name the same part
    if gpu not in GPUS:
        raise ConfigError(f"--gpu '{args.gpu}' is unknown; choose one of {list(GPUS)}.")
    hw = replace(GPUS[gpu], gpus_per_node=args.gpus_per_node)
    if args.intra_bw:
        hw = replace(hw, intra_bw=args.intra_bw * 1e9)
    if args.inter_bw:
        hw = replace(hw, inter_bw=args.inter_bw * 1e9)
    if args.efficiency:
        hw = replace(hw, efficiency=args.efficiency)
    return hw


def _row(p) -> str:
    lay = p.layout
    return (f"{lay.tp:>2d} {lay.pp:>2d} {str(lay.vpp or '-'):>3s} {lay.dp:>4d} "
            f"{p.micro_batch_size:>3d} {str(lay.recompute or '-'):>9s} "
            f"{p.memory / 2**30:8.1f} {p.tokens_per_s / 1e3:9.1f} {100 * p.mfu:5.1f}")


HEADER = (f"{'tp':>2s} {'pp':>2s} {'vpp':>3s} {'dp':>4s} {'mbs':>3s} {'recompute':>9s} "
          f"{'GiB/GPU':>8s} {'ktok/s':>9s} {'MFU%':>5s}")


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        dims, hw = model_dims(args), hardware(args)
        counts = [int(x) for x in args.table.split(",")] if args.table else [args.gpus]
        if any(c < 1 for c in counts):
            raise ConfigError(f"GPU counts must be ≥ 1, got {counts}.")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# {args.preset or 'custom'}: H {dims.hidden}, {dims.layers} layers, "
          f"{dims.heads} heads, F {dims.ffn}, V {dims.vocab}; {args.gpu}; seq {args.seq}, "
          f"global batch {args.global_batch} rows, samples {args.image_tokens}+"
          f"{args.text_tokens} tokens; bf16, distributed optimizer, TE attention")
    for gpus in counts:
        plans = plan(dims, hw, gpus, args.global_batch, args.seq, args.image_tokens,
                     args.text_tokens, top=args.top)
        if not plans:
            print(f"{gpus} GPUs: no layout fits in {hw.memory / 1e9:.0f} GB; lower --seq or "
                  "use more GPUs.")
            continue
        print(f"\n{gpus} GPUs\n{HEADER}")
        for p in plans[:1] if args.table else plans:
            print(f"{_row(p)}   --set {' '.join(p.flags)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
