#!/usr/bin/env python
"""Peak memory of the LM head + loss: the chunked loss vs the full-logits path.

    python benchmarks/loss_memory.py            # N = 4096 label positions, T = 1024, V = 151936
    python benchmarks/loss_memory.py --quick    # N = 2048, T = 256, V = 32768, 2^21 logits/block

Both paths compute the per-position cross-entropy of ``hidden [N, T] @ weight [V, T]ᵀ``, fp32,
forward and backward (loss = mean over the N positions, as the trainer normalises):

* **full**: what ``model.loss_impl: full`` runs, all ``[N, 1, V]`` logits through megatron's
  ``vocab_parallel_cross_entropy``;
* **chunked**: ``model/lm_loss.py`` (the default), the vocabulary in blocks of
  ``chunk / N`` entries.

Method: each path runs in its own fresh subprocess (``--worker``). After the inputs are built,
the kernel's resident-set high-water mark is reset and, after forward + backward, read
(``benchmarks/peak_rss.py``: ``/proc/self/clear_refs``, ``VmHWM``). Peak bytes = high-water
mark - RSS after the inputs: everything the head + loss allocated, its weight gradient
(``[V, T]``, needed by any head) included. glibc returns large blocks to the OS on free, so RSS
follows the live tensors. The workers save loss and gradients; the parent compares them. Last
line:

    BENCH loss_memory peak_ratio=<chunked/full> max_abs_grad_diff=<…> max_abs_loss_diff=<…>
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _inputs(n: int, t: int, v: int):
    """hidden [N, T], weight [V, T] (both requiring grad) and targets [N], built in place."""
    import torch

    gen = torch.Generator().manual_seed(0)
    hidden = torch.empty(n, t).normal_(0.0, 1.0, generator=gen).requires_grad_()
    weight = torch.empty(v, t).normal_(0.0, 0.02, generator=gen).requires_grad_()
    target = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, target


def _run_path(impl: str, hidden, weight, target, chunk: int):
    import torch
    import torch.nn.functional as F
    from megatron.core import tensor_parallel

    from genlip_megatron.model.lm_loss import chunked_linear_cross_entropy

    if impl == "chunked":
        loss = chunked_linear_cross_entropy(hidden, weight, target, chunk_logits=chunk)
    else:   # the model's "full" head: ColumnParallelLinear at TP = 1 is this linear
        logits = F.linear(hidden[:, None], weight)                       # [N, 1, V]
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits, target[:, None])[:, 0]
        del logits
    (loss.sum() / loss.numel()).backward()
    return loss.detach()


def worker(impl: str, n: int, t: int, v: int, chunk: int, out: Path) -> None:
    """One path in this process; writes {peak_bytes, seconds} and the loss/grads to ``out``."""
    import torch

    from benchmarks.peak_rss import PeakRss
    from genlip_megatron.compat import apply_cpu_compat

    apply_cpu_compat()
    _init_world_of_one()
    import genlip_megatron.model.lm_loss  # noqa: F401  (imports are not the head's memory)

    hidden, weight, target = _inputs(n, t, v)
    start = time.perf_counter()
    with PeakRss() as meter:
        loss = _run_path(impl, hidden, weight, target, chunk)
    seconds = time.perf_counter() - start
    torch.save({"loss": loss, "dh": hidden.grad, "dw": weight.grad}, out / f"{impl}.pt")
    (out / f"{impl}.json").write_text(json.dumps({"peak_bytes": meter.peak_bytes,
                                                  "seconds": seconds}))


def _init_world_of_one() -> None:
    """megatron's vocab_parallel_cross_entropy reads the TP group from parallel_state."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    store = tempfile.NamedTemporaryFile(delete=False)
    dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)


def _spawn(impl: str, args, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--n", str(args.n), "--t", str(args.t),
           "--v", str(args.v), "--chunk", str(args.chunk), "--out", str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{impl} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads((out / f"{impl}.json").read_text())


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="N 2048, T 256, V 32768, 2^21 logits per block")
    parser.add_argument("--n", type=int, default=4096, help="label positions")
    parser.add_argument("--t", type=int, default=1024, help="text width T")
    parser.add_argument("--v", type=int, default=151936, help="vocabulary V")
    parser.add_argument("--chunk", type=int, default=None,
                        help="logits per block (default: model.loss_chunk_logits' 2^24)")
    parser.add_argument("--worker", choices=["full", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.t, args.v, args.chunk = 2048, 256, 32768, args.chunk or 2 ** 21
    if args.chunk is None:
        from genlip_megatron.model.lm_loss import CHUNK_LOGITS

        args.chunk = CHUNK_LOGITS
    if args.worker:
        worker(args.worker, args.n, args.t, args.v, args.chunk, args.out)
        return 0
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        stats = {impl: _spawn(impl, args, out) for impl in ("full", "chunked")}
        full, ours = torch.load(out / "full.pt"), torch.load(out / "chunked.pt")
    grad_diff = max(float((full[k] - ours[k]).abs().max()) for k in ("dh", "dw"))
    loss_diff = float((full["loss"] - ours["loss"]).abs().max())
    ratio = stats["chunked"]["peak_bytes"] / stats["full"]["peak_bytes"]
    print(f"loss_memory N={args.n} T={args.t} V={args.v} fp32, {args.chunk} logits per block, "
          f"load "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for impl, s in stats.items():
        print(f"  {impl:8s} peak {s['peak_bytes'] / 2**20:9.1f} MiB   {s['seconds']:7.1f} s")
    print(f"  weight grad alone: {args.v * args.t * 4 / 2**20:.1f} MiB; "
          f"full logits: {args.n * args.v * 4 / 2**20:.1f} MiB")
    mib = {impl: s["peak_bytes"] / 2**20 for impl, s in stats.items()}
    print(f"BENCH loss_memory peak_ratio={ratio:.3f} max_abs_grad_diff={grad_diff:.3e} "
          f"max_abs_loss_diff={loss_diff:.3e} full_peak_mib={mib['full']:.0f} "
          f"chunked_peak_mib={mib['chunked']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
