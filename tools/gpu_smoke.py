#!/usr/bin/env python
"""GPU smoke test: the first thing to run on a new cluster (one GPU node, under 5 minutes).

    python tools/gpu_smoke.py                      # every check, small model
    python tools/gpu_smoke.py --checks te_spec dali_mixed --workdir /scratch/smoke

One line per check, ``PASS <check>: <detail>`` or ``FAIL <check>: <reason>``, then
``GPU_SMOKE passed=N failed=M``; exit status 1 when a check failed. Checks, in order:

  te_spec         the Transformer Engine layer spec builds (TE linears + two-call attention)
  te_vs_dense     ``te`` vs ``dense`` prefix-LM attention, forward and backward, bf16 tolerance,
                  on a packed batch with several samples per row
  train_bf16      20 training steps in bf16 (TE layers), loss decreasing
  train_fp8       20 training steps in FP8 (tensorwise current scaling), loss decreasing
  async_resume    async checkpoint at step 2, resume → steps 3-4 and weights bit-identical
  dali_mixed      DALI ``mixed`` (nvJPEG) decode vs CPU decode, within 2 intensity levels
  nccl_allreduce  NCCL all-reduce across every visible GPU (one process per GPU)
  step_time_mfu   step time and MFU of the bf16 run

Synthetic data is generated in ``--workdir`` (default: a temporary directory); nothing is
downloaded. On a machine without CUDA it prints one line saying so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHECKS = ("te_spec", "te_vs_dense", "train_bf16", "train_fp8", "async_resume", "dali_mixed",
          "nccl_allreduce", "step_time_mfu")

# Model sizes: "small" for GPUs (MFU means something), "tiny" for CPU tests of this script.
SIZES = {
    "small": dict(model=dict(hidden_size=1024, num_layers=8, num_attention_heads=16,
                             ffn_hidden_size=2816, text_dim=1024, mrope_section=[8, 12, 12]),
                  seq=2048, micro_batch=4, image=224, steps=20),
    "tiny": dict(model=dict(hidden_size=64, num_layers=2, num_attention_heads=4,
                            ffn_hidden_size=176, text_dim=64, mrope_section=[2, 3, 3]),
                 seq=256, micro_batch=2, image=64, steps=6),
}
VOCAB = 512
BF16_LOSS_RTOL = 1e-2
BF16_GRAD_RTOL = 3e-2
DALI_MAX_LEVELS = 2


@dataclass
class Result:
    """One check's verdict."""

    name: str
    ok: bool
    detail: str


@dataclass
class Smoke:
    """Shared state of one smoke run (work dir, synthetic data, results of earlier checks)."""

    workdir: Path
    size: str = "small"
    data_dir: Optional[Path] = None
    runs: dict = field(default_factory=dict)

    @property
    def spec(self) -> dict:
        return SIZES[self.size]


# ---------------------------------------------------------------------------------- set-up
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    from genlip_megatron.training.distributed import init_distributed

    init_distributed()


def _data(ctx: Smoke) -> Path:
    if ctx.data_dir is None:
        from genlip_megatron.data.demo import generate_demo_data

        ctx.data_dir = ctx.workdir / "data"
        if not (ctx.data_dir / "meta.json").is_file():
            side = ctx.spec["image"]
            generate_demo_data(ctx.data_dir, num_train=400, num_eval=8, seed=5, vocab_size=VOCAB,
                               min_side=side // 2, max_side=side, samples_per_shard=100)
    return ctx.data_dir


def _config(ctx: Smoke, **kwargs):
    """A validated RunConfig for this smoke run (see :func:`raw_config`)."""
    import torch.distributed as dist

    from genlip_megatron.config import config_from_dict

    _data(ctx)
    return config_from_dict(raw_config(ctx, **kwargs)).validate(
        world_size=dist.get_world_size())


def raw_config(ctx: Smoke, *, te: bool = True, fp8: bool = False, steps: int = 0,
               save_dir: Optional[Path] = None, async_save: bool = False,
               metrics: Optional[Path] = None) -> dict:
    """The run config of one smoke check as a YAML-shaped dict (data in ``ctx.data_dir``)."""
    d, spec = ctx.data_dir or ctx.workdir / "data", ctx.spec
    precision: dict = {"params_dtype": "bf16"}
    if fp8:
        precision["fp8"] = {"recipe": "tensorwise", "format": "hybrid"}
    raw = {
        "model": {"variant": "tiny", **spec["model"], "vocab_size": VOCAB, "drop_path_rate": 0.0,
                  "transformer_impl": "te" if te else "local",
                  "attention_backend": "te" if te else "dense"},
        "precision": precision,
        "parallel": {"use_distributed_optimizer": True},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4},
        "scheduler": {"warmup_steps": 2},
        "training": {"train_steps": steps or spec["steps"], "seed": 1234,
                     "micro_batch_size": spec["micro_batch"],
                     "global_batch_size": spec["micro_batch"], "dp_invariant_data": True},
        "data": {"max_seq_len": spec["seq"],
                 "sources": [{"paths": f"{d}/train/*.tar"}],
                 "text": {"tokenizer_path": f"{d}/tokenizer.json"},
                 "image": {"policy": "fixed", "fixed_size": spec["image"]},
                 "reader": {"num_workers": 0}},
        "checkpoint": {"save_dir": str(save_dir) if save_dir else None, "save_interval": 2,
                       "keep_last": 3, "async_save": async_save},
        "logging": {"log_interval": 1,
                    "jsonl_path": str(metrics) if metrics else None},
    }
    return raw


def _device():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


# ---------------------------------------------------------------------------------- checks
def check_te_spec(ctx: Smoke) -> str:
    from genlip_megatron.compat.te import require_transformer_engine

    require_transformer_engine("tools/gpu_smoke.py")
    model = _build_models(ctx, te_only=True)[0]
    layer = model.decoder.layers[0]
    names = [type(m).__name__ for m in (layer.self_attention.linear_qkv,
                                        layer.self_attention.linear_proj,
                                        layer.self_attention.core_attention)]
    want = ["TELayerNormColumnParallelLinear", "TERowParallelLinear", "TEPrefixLMAttention"]
    if names != want:
        raise RuntimeError(f"layer modules {names}, expected {want}")
    import transformer_engine

    version = getattr(transformer_engine, "__version__", "?")
    try:
        from transformer_engine.pytorch.utils import get_cudnn_version

        cudnn = ".".join(str(v) for v in get_cudnn_version())
    except Exception:  # noqa: BLE001 - informational only
        cudnn = "?"
    return f"{'/'.join(names)}; TE {version}, cuDNN {cudnn}"


def _build_models(ctx: Smoke, te_only: bool = False) -> list:
    """GenLIP models (TE, then local/dense) with identical reference initialisation."""
    import torch
    from megatron.core import parallel_state, tensor_parallel

    from genlip_megatron.model.genlip import GenLIPMegatronModel
    from genlip_megatron.model.transformer_config import build_transformer_config

    _ensure_process_group()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(1234)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    models = []
    for te in ((True,) if te_only else (True, False)):
        cfg = _config(ctx, te=te)
        tconfig = build_transformer_config(cfg.model, cfg.parallel, cfg.precision, init_seed=1)
        models.append(GenLIPMegatronModel(tconfig).to(_device()))
    return models


def _packed_batch(ctx: Smoke):
    from genlip_megatron.training.data_stream import build_microbatch_source

    cfg = _config(ctx)
    source = build_microbatch_source(cfg.data, dp_invariant=True, dp_rank=0, dp_size=1,
                                     micro_batch_size=cfg.training.micro_batch_size, per_rank=1,
                                     seed=7)
    try:
        return next(source)
    finally:
        source.close()


def check_te_vs_dense(ctx: Smoke) -> str:
    import torch

    from genlip_megatron.model.layer_spec import canonical_name

    batch = _packed_batch(ctx).to(_device())
    samples = int(batch.image_lens.numel())
    if samples < 2 * batch.tokens.shape[0]:
        raise RuntimeError(f"packed batch holds only {samples} samples in "
                           f"{batch.tokens.shape[0]} rows; need several per row")
    losses, grads = [], []
    for model in _build_models(ctx):
        per_token = model(batch.tokens, batch.position_ids, batch.image_mask, batch.segment_ids,
                          batch.pixel_values, labels=batch.labels)
        mask = batch.loss_mask.to(per_token.device)
        loss = (per_token.float() * mask).sum() / mask.sum()
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({canonical_name(n): p.grad.detach().float()
                      for n, p in model.named_parameters()})
    (l_te, l_dense), (g_te, g_dense) = losses, grads
    if g_te.keys() != g_dense.keys():
        raise RuntimeError(f"parameter names differ: {sorted(g_te.keys() ^ g_dense.keys())[:4]}")
    num = math.sqrt(sum(float((g_te[k] - g_dense[k]).float().norm()) ** 2 for k in g_te))
    den = math.sqrt(sum(float(g.float().norm()) ** 2 for g in g_dense.values()))
    loss_err, grad_err = abs(l_te - l_dense) / max(abs(l_dense), 1e-6), num / max(den, 1e-12)
    detail = (f"loss {l_te:.5f} vs {l_dense:.5f} (rel {loss_err:.1e}), grads rel {grad_err:.1e}, "
              f"{samples} samples in {batch.tokens.shape[0]} rows")
    if loss_err > BF16_LOSS_RTOL or grad_err > BF16_GRAD_RTOL or not torch.isfinite(
            torch.tensor([l_te, l_dense])).all():
        raise RuntimeError(detail)
    return detail


def _train(cfg, step_hook: Optional[Callable] = None) -> dict:
    """Run the Trainer on ``cfg``; per-step losses, step times and the final weights."""
    import torch

    from genlip_megatron.training.checkpointing import unwrap_model
    from genlip_megatron.training.parallel import destroy_topology
    from genlip_megatron.training.trainer import Trainer

    _ensure_process_group()
    destroy_topology()
    trainer = Trainer(cfg)
    times: list[float] = []
    original = trainer.train_step

    def timed_step():
        if step_hook is not None:
            step_hook(trainer)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = original()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        return out

    trainer.train_step = timed_step
    try:
        summary = trainer.train()
    finally:
        trainer.close()
        weights = {k: v.detach().clone() for k, v in
                   unwrap_model(trainer.model[0]).state_dict().items()
                   if torch.is_tensor(v) and not k.endswith("_extra_state")}
        destroy_topology()
    return {"losses": {s: loss for s, loss, _ in summary.losses}, "times": times,
            "weights": weights}


def _decreasing(losses: dict) -> str:
    values = [losses[s] for s in sorted(losses)]
    k = max(1, len(values) // 4)
    first, last = statistics.mean(values[:k]), statistics.mean(values[-k:])
    detail = f"{len(values)} steps, loss {values[0]:.4f} → {values[-1]:.4f} (mean of " \
             f"first/last {k}: {first:.4f} → {last:.4f})"
    if not all(math.isfinite(v) for v in values) or not last < first:
        raise RuntimeError(f"loss not decreasing: {detail}")
    return detail


def check_train_bf16(ctx: Smoke) -> str:
    metrics = ctx.workdir / "metrics_bf16.jsonl"
    metrics.unlink(missing_ok=True)
    run = _train(_config(ctx, metrics=metrics))
    run["metrics"] = metrics
    ctx.runs["bf16"] = run
    return _decreasing(run["losses"])


def check_train_fp8(ctx: Smoke) -> str:
    run = _train(_config(ctx, fp8=True))
    ctx.runs["fp8"] = run
    return _decreasing(run["losses"]) + " (FP8 tensorwise, hybrid)"


def check_async_resume(ctx: Smoke) -> str:
    from genlip_megatron.training.checkpoint_layout import iteration_dir, read_latest, \
        write_latest

    full, resumed = ctx.workdir / "ckpt_full", ctx.workdir / "ckpt_resumed"
    for d in (full, resumed):
        shutil.rmtree(d, ignore_errors=True)
    a = _train(_config(ctx, steps=4, save_dir=full, async_save=True))
    latest, problem = read_latest(full)
    if latest != iteration_dir(full, 4):
        raise RuntimeError(f"after the run `latest` is {problem or latest or 'missing'}, "
                           "expected a finished iter_0000004")
    resumed.mkdir(parents=True)
    shutil.copytree(iteration_dir(full, 2), iteration_dir(resumed, 2))
    write_latest(resumed, iteration_dir(resumed, 2).name)
    b = _train(_config(ctx, steps=4, save_dir=resumed, async_save=True))
    want = {s: a["losses"][s] for s in (3, 4)}
    if b["losses"] != want:
        raise RuntimeError(f"resumed losses {b['losses']} != uninterrupted {want}")
    diff = max(float((a["weights"][k].float() - b["weights"][k].float()).abs().max())
               for k in a["weights"])
    if diff != 0.0:
        raise RuntimeError(f"resumed weights differ from the uninterrupted run (max {diff:.3e})")
    return "async save at steps 2 and 4 published; resumed steps 3-4 and weights bit-identical"


def check_dali_mixed(ctx: Smoke) -> str:
    import io

    import numpy as np
    from PIL import Image

    from genlip_megatron.config.data import ImageConfig
    from genlip_megatron.data.image import DaliDecoder

    rng = np.random.default_rng(0)
    datas, sizes = [], []
    for h, w in ((96, 128), (224, 224), (150, 333), (64, 48)):
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)),
                        rng.integers(0, 256, (h, w))], axis=-1).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        datas.append(buf.getvalue())
        sizes.append((h, w))
    cfg = ImageConfig(decoder="dali", resize_backend="torch")
    gpu, cpu = DaliDecoder(cfg, device="gpu"), DaliDecoder(cfg, device="cpu")
    out_gpu, out_cpu = gpu.decode(datas, sizes), cpu.decode(datas, sizes)
    if gpu.fallbacks or cpu.fallbacks:
        raise RuntimeError(f"DALI fell back to Pillow (gpu {gpu.fallbacks}, cpu {cpu.fallbacks} "
                           "batches): the mixed decoder does not work here")
    worst = max(int((a.cpu().int() - b.int()).abs().max()) for a, b in zip(out_gpu, out_cpu))
    detail = f"{len(datas)} JPEGs, max |nvJPEG − CPU| = {worst} levels"
    if worst > DALI_MAX_LEVELS:
        raise RuntimeError(detail)
    return detail


def _nccl_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    x = torch.full((64 * 1024 * 1024,), float(rank + 1), device="cuda")  # 256 MB fp32
    dist.all_reduce(x)
    torch.cuda.synchronize()
    ok = bool((x == world * (world + 1) / 2).all())
    start = time.perf_counter()
    for _ in range(5):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 5
    busbw = x.numel() * 4 * 2 * (world - 1) / world / seconds / 1e9 if world > 1 else 0.0
    if rank == 0:
        Path(out).write_text(json.dumps({"ok": ok, "busbw": busbw}))
    dist.destroy_process_group()


def check_nccl_allreduce(ctx: Smoke) -> str:
    import torch
    import torch.multiprocessing as mp

    world = torch.cuda.device_count()
    if world < 1:
        raise RuntimeError("no visible CUDA device (check CUDA_VISIBLE_DEVICES)")
    out = ctx.workdir / "nccl.json"
    out.unlink(missing_ok=True)
    mp.spawn(_nccl_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True)
    res = json.loads(out.read_text())
    if not res["ok"]:
        raise RuntimeError(f"all-reduce over {world} GPUs returned a wrong sum")
    bw = f", bus bandwidth {res['busbw']:.0f} GB/s (256 MB)" if world > 1 else " (1 GPU)"
    return f"{world} GPU(s), sum correct{bw}"


def check_step_time_mfu(ctx: Smoke) -> str:
    run = ctx.runs.get("bf16")
    if run is None:
        raise RuntimeError("needs the train_bf16 check")
    times = run["times"][2:] or run["times"]  # skip warm-up steps
    step = statistics.median(times)
    mfu, tflops = [], []
    metrics = run.get("metrics")
    if metrics and Path(metrics).is_file():
        for line in Path(metrics).read_text().splitlines():
            rec = json.loads(line)
            if "mfu(%)" in rec:
                mfu.append(float(rec["mfu(%)"]))
            if "throughput/tflops_per_device" in rec:
                tflops.append(float(rec["throughput/tflops_per_device"]))
    mfu_s = f"MFU {statistics.median(mfu[2:] or mfu):.1f}%" if mfu else \
        "MFU n/a (unknown GPU peak: set logging.peak_tflops)"
    tf_s = f", {statistics.median(tflops[2:] or tflops):.1f} TFLOP/s" if tflops else ""
    return f"step {step * 1e3:.1f} ms (median of {len(times)}){tf_s}, {mfu_s}"


CHECK_FUNCS: dict[str, Callable[[Smoke], str]] = {
    "te_spec": check_te_spec, "te_vs_dense": check_te_vs_dense,
    "train_bf16": check_train_bf16, "train_fp8": check_train_fp8,
    "async_resume": check_async_resume, "dali_mixed": check_dali_mixed,
    "nccl_allreduce": check_nccl_allreduce, "step_time_mfu": check_step_time_mfu,
}


def run_checks(names: list[str], ctx: Smoke,
               report: Optional[Callable[[Result], None]] = None) -> list[Result]:
    """Run ``names`` in order; a failing check becomes a FAIL result, never a traceback.

    Args:
        names: check names from :data:`CHECKS`.
        ctx: the run's shared state.
        report: called with each result as soon as its check finishes.
    """
    results = []
    for name in names:
        start = time.perf_counter()
        try:
            detail = CHECK_FUNCS[name](ctx)
            ok = True
        except Exception as exc:  # noqa: BLE001 - one line per failed check
            detail, ok = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", \
                False
        results.append(Result(name, ok, f"{detail} [{time.perf_counter() - start:.0f} s]"))
        if report is not None:
            report(results[-1])
    return results


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS),
                   help="subset of checks to run (default: all, in the documented order)")
    p.add_argument("--workdir", help="where synthetic data and checkpoints go (default: temp)")
    p.add_argument("--size", choices=sorted(SIZES), default="small",
                   help="model size of the training checks (default: small)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device present (torch.cuda.is_available() is False); "
              "nothing to check on this machine.")
        return 0
    # Bit-identical resume needs deterministic kernels (TE's cuDNN attention backward, cuBLAS).
    os.environ.setdefault("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="gpu_smoke_") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"gpu_smoke: {torch.cuda.device_count()} × {torch.cuda.get_device_name()}, "
              f"torch {torch.__version__}, work dir {workdir}", flush=True)
        results = run_checks(args.checks, Smoke(workdir, size=args.size), report=lambda r: print(
            f"{'PASS' if r.ok else 'FAIL'} {r.name}: {r.detail}", flush=True))
        failed = sum(not r.ok for r in results)
        print(f"GPU_SMOKE passed={len(results) - failed} failed={failed}", flush=True)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
