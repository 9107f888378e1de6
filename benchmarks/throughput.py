#!/usr/bin/env python
"""Training throughput: our megatron stack vs a plain PyTorch GenLIP step, side by side.

    python benchmarks/throughput.py --quick     # CI-sized, < 5 min on 2 busy cores
    python benchmarks/throughput.py             # L/16 width, 1024 + 2048-token rows, 2 mixes
    python benchmarks/throughput.py --profile   # + per-op profile, plain step vs ours
    python benchmarks/throughput.py --packed-row-only   # packed 4096-token row vs its samples
    python benchmarks/sweep.py --out-dir /tmp/sweep                # tiny CPU points (sweep.py)
    python benchmarks/sweep.py --gpu-recipe                        # the GPU grid (one node)

In ONE process, on the same shapes (L/16 width, a few layers, packed rows, fp32 on CPU) and per
workload (stage-1 mix: fixed 224² images, ~5 samples per 1024-token row; stage-2-like mix:
native-resolution images, 64–1024 patches each):

(a) **gemm**: the machine's fp32 GEMM rate at the layer's shapes (qkv+gate, out, SwiGLU fc1,
    fc2 over the row's tokens; forward GEMMs only).
(b) **plain**: a minimal GenLIP training step written here in plain PyTorch (patch/word
    embeddings, pre-LN blocks with RoPE, sigmoid-gated attention under the prefix-LM rule done
    per sample with SDPA, SwiGLU, LayerScale, LM head on label positions only, AdamW). Its FLOPs
    are counted from the linears and attention calls it actually runs and must equal
    ``training/flops.py``'s count for (c) — the benchmark stops otherwise.
(c) **stack**: our ``Trainer.train_step`` (megatron DDP, distributed optimizer settings,
    schedules, loss, LR scheduler, logging) on pre-built batches (no loader).
(d) **e2e**: the same trainer with its real data loader (shard reading, decode, packing).

(b) and (c) alternate step by step, so machine load hits both alike; (d) runs as a block
between two further blocks of (b). Warm-up steps are excluded; each figure is the median of the
repetitions. Rates are model FLOPs (flops.py convention) per second. Ratios:
``stack_vs_plain = rate(c)/rate(b)``, ``e2e_vs_plain = rate(d)/rate(b)``, ``cpu_mfu =
rate(c)/rate(a)``, ``plain_mfu = rate(b)/rate(a)`` (summed over workloads: total FLOPs / total
median time). Peak memory: (b) and (c) each build their model, then run 3 steps on the same
pre-built batches, in a fresh subprocess; ``peak_mem_vs_plain`` = the larger, over workloads, of
(c)'s step peak over (b)'s (kernel high-water mark above the built model,
``benchmarks/peak_rss.py``: activations, gradients, optimizer state).
The packed-row check measures a 4096-token native-resolution row (and 16384 in the full run)
against its samples one by one, with the package's default attention backend (``auto``,
resolved for CPU) and ``dense``. The last line is machine-readable:

    BENCH throughput stack_vs_plain=<c/b> e2e_vs_plain=<d/b> cpu_mfu=<c/a> plain_mfu=<b/a>
        peak_mem_vs_plain=<c/b> row4096_vs_samples=<packed/one by one, default backend>
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from genlip_megatron.compat import apply_cpu_compat  # noqa: E402

apply_cpu_compat()

from genlip_megatron.data.batch import IGNORE_INDEX, PackedBatch  # noqa: E402
from genlip_megatron.training.flops import FlopDims, training_flops  # noqa: E402

logger = logging.getLogger("throughput")


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    """One measured shape: model width/depth, row length, sample mix."""

    name: str
    variant: str
    layers: int
    seq: int
    stage: int          # 1: fixed 224² images; 2: native resolution
    hidden: Optional[int] = None   # override the preset's width (quick runs)
    heads: Optional[int] = None
    ffn: Optional[int] = None


def workloads(quick: bool) -> list[Workload]:
    if quick:
        return [Workload("s1-1024-h384", "L/16", 2, 1024, 1, hidden=384, heads=6, ffn=1024),
                Workload("s2-1024-h384", "L/16", 2, 1024, 2, hidden=384, heads=6, ffn=1024)]
    return [Workload("s1-1024", "L/16", 2, 1024, 1), Workload("s2-1024", "L/16", 2, 1024, 2),
            Workload("s1-2048", "L/16", 2, 2048, 1), Workload("s2-2048", "L/16", 2, 2048, 2)]


def ensure_data(root: Path, stage: int) -> Path:
    """Synthetic webdataset shards + tokenizer (generated once, reused)."""
    from genlip_megatron.data.demo import generate_demo_data

    out = root / f"stage{stage}"
    if not (out / "meta.json").is_file():
        sides = (64, 192) if stage == 1 else (96, 560)
        generate_demo_data(out, num_train=160, num_eval=4, seed=stage, vocab_size=512,
                           min_side=sides[0], max_side=sides[1], samples_per_shard=40)
    return out


def load_cfg(w: Workload, data_dir: Path, backend: str, workers: int, extra=()):
    from genlip_megatron.config import load_config

    image = ("{policy: fixed, fixed_size: 224, decoder: dali, device: cpu}" if w.stage == 1 else
             "{policy: native, max_pixels: 262144, decoder: dali, device: cpu}")
    sets = [f"model.variant={w.variant}", f"model.num_layers={w.layers}",
            "model.drop_path_rate=0.0", f"model.attention_backend={backend}",
            f"data.sources=[{{paths: '{data_dir}/train/*.tar'}}]",
            f"data.text.tokenizer_path={data_dir}/tokenizer.json", f"data.max_seq_len={w.seq}",
            f"data.image={image}", f"data.reader.num_workers={workers}",
            "training.train_steps=100000", "training.micro_batch_size=1",
            "training.global_batch_size=1", "precision.params_dtype=fp32",
            "parallel.use_distributed_optimizer=false",   # DP = 1: it would only add copies
            "optimizer.lr=1.0e-4", "scheduler.warmup_steps=1", "logging.log_interval=10"]
    if w.hidden:
        sets += [f"model.hidden_size={w.hidden}", f"model.num_attention_heads={w.heads}",
                 f"model.ffn_hidden_size={w.ffn}", "model.text_dim=256",
                 "model.mrope_section=[8,12,12]"]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write("model: {variant: tiny}\n")
    cfg = load_config(f.name, sets + list(extra))
    os.unlink(f.name)
    from genlip_megatron.data.tokenizer import load_tokenizer

    cfg.model.vocab_size = load_tokenizer(cfg.data.text.tokenizer_path).vocab_size
    cfg.validate(world_size=1, has_cuda=False, has_te=False)
    return cfg


def init_single_process() -> None:
    """gloo world of one (free port) for megatron's parallel state."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)


# ---------------------------------------------------------------------------------------------
# (b) the plain PyTorch step
# ---------------------------------------------------------------------------------------------

class FlopMeter:
    """Counts the model FLOPs the plain model actually runs (forward; ×3 for a step)."""

    def __init__(self) -> None:
        self.forward = 0.0
        self.real_rows: Optional[int] = None   # rows of the [B·S] stream that are not padding

    def linear(self, rows: int, layer: nn.Linear) -> None:
        self.forward += 2.0 * rows * layer.in_features * layer.out_features


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class PlainBlock(nn.Module):
    """Pre-LN block: gated prefix-LM attention + SwiGLU, both with LayerScale."""

    def __init__(self, h: int, heads: int, ffn: int, eps: float) -> None:
        super().__init__()
        self.heads, self.dim, self.ffn = heads, h // heads, ffn
        self.ln1, self.ln2 = nn.LayerNorm(h, eps=eps), nn.LayerNorm(h, eps=eps)
        self.qkvg = nn.Linear(h, 4 * h)
        self.out = nn.Linear(h, h)
        self.fc1 = nn.Linear(h, 2 * ffn)
        self.fc2 = nn.Linear(ffn, h)
        self.ls1 = nn.Parameter(torch.full((h,), 0.1))
        self.ls2 = nn.Parameter(torch.full((h,), 0.1))

    def forward(self, x: Tensor, rows: list, cos: Tensor, sin: Tensor, meter: FlopMeter
                ) -> Tensor:
        N, h = x.shape
        n = meter.real_rows
        q, g, k, v = self.qkvg(self.ln1(x)).view(N, self.heads, 4, self.dim).unbind(2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        attn = prefix_lm_per_sample(q, k, v, rows, meter, h)
        x = x + self.ls1 * self.out(attn * torch.sigmoid(g.reshape(N, h)))
        gate, lin = self.fc1(self.ln2(x)).chunk(2, dim=-1)
        x = x + self.ls2 * self.fc2(F.silu(gate) * lin)
        for layer in (self.qkvg, self.out, self.fc1, self.fc2):
            meter.linear(n, layer)
        return x


def prefix_lm_per_sample(q: Tensor, k: Tensor, v: Tensor, rows: list, meter: FlopMeter,
                         hidden: int) -> Tensor:
    """q, k, v ``[N, heads, d]`` over the flattened rows → ``[N, heads·d]``; per sample two
    SDPA calls (image→image, text→sample, bottom-right causal); padding outputs v."""
    sizes = [t if i < 0 else i + t for _, i, t, _, _ in rows]     # [1, heads, L, d] runs:
    qr, kr, vr = (x.transpose(0, 1)[None].split(sizes, dim=2)     # 4-D takes the fused CPU
                  for x in (q, k, v))                             # kernel; split, not slices
    pieces = []
    for (_, i, t, mask, pairs), qs, ks, vs in zip(rows, qr, kr, vr):
        if i < 0:
            pieces.append(vs)
            continue
        if i:
            pieces.append(F.scaled_dot_product_attention(qs[:, :, :i], ks[:, :, :i],
                                                         vs[:, :, :i]))
        if t:
            pieces.append(F.scaled_dot_product_attention(qs[:, :, i:], ks, vs, attn_mask=mask))
        meter.forward += 4.0 * hidden * pairs
    return torch.cat(pieces, dim=2)[0].transpose(0, 1).reshape(q.shape[0], -1)


class PlainGenLIP(nn.Module):
    """The whole model; ``step`` = forward, loss on label positions, backward, AdamW."""

    def __init__(self, m) -> None:
        super().__init__()
        h, t = m.hidden_size, m.text_dim
        self.patch = nn.Linear(m.patch_dim, h)
        self.embed = nn.Embedding(m.vocab_size, t)
        self.in_proj = nn.Linear(t, h) if t != h else None
        self.blocks = nn.ModuleList(PlainBlock(h, m.num_attention_heads, m.ffn_hidden_size,
                                               m.layernorm_eps) for _ in range(m.num_layers))
        self.ln_post = nn.LayerNorm(h, eps=m.layernorm_eps)
        self.proj = nn.Linear(h, t) if t != h else None
        self.lm_head = nn.Linear(t, m.vocab_size, bias=False)
        self.theta, self.dim = m.rope_theta, h // m.num_attention_heads
        self.opt = torch.optim.AdamW(self.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                     weight_decay=0.05)
        self.meter = FlopMeter()

    def loss(self, b: PackedBatch, prepared: dict) -> Tensor:
        meter = self.meter
        B, S = b.tokens.shape
        img = b.image_mask.reshape(-1)
        x = torch.zeros(B * S, self.patch.out_features)
        x = x.index_put((img.nonzero().squeeze(1),), self.patch(b.pixel_values))
        meter.linear(b.pixel_values.shape[0], self.patch)
        txt = prepared["text_index"]
        words = self.embed(b.tokens.reshape(-1)[txt])
        if self.in_proj is not None:
            words = self.in_proj(words)
            meter.linear(txt.numel(), self.in_proj)
        x = x.index_put((txt,), words)
        for block in self.blocks:
            x = block(x, prepared["rows"], prepared["cos"], prepared["sin"], meter)
        where = prepared["label_index"]
        hsel = self.ln_post(x[where])
        if self.proj is not None:
            hsel = self.proj(hsel)
            meter.linear(where.numel(), self.proj)
        logits = self.lm_head(hsel)
        meter.linear(where.numel(), self.lm_head)
        loss_sum = F.cross_entropy(logits, b.labels.reshape(-1)[where], reduction="sum")
        return loss_sum / where.numel()

    def prepare(self, b: PackedBatch) -> dict:
        """Per-batch index work a hand-written loop does once (not per layer)."""
        B, S = b.tokens.shape
        seg, img = b.segment_ids.reshape(-1).long(), b.image_mask.reshape(-1)
        rows = []
        start_flags = torch.ones_like(seg, dtype=torch.bool)
        start_flags[1:] = seg[1:] != seg[:-1]
        start_flags[::S] = True
        firsts = start_flags.nonzero().squeeze(1).tolist() + [B * S]
        masks: dict = {}
        for a, z in zip(firsts[:-1], firsts[1:]):
            if int(seg[a]) < 0:
                rows.append((a, -1, z - a, None, 0))
                continue
            i = int(img[a:z].sum())
            t = z - a - i
            if t and (i, t) not in masks:
                masks[(i, t)] = torch.ones(t, z - a, dtype=torch.bool).tril(i)
            mask = masks.get((i, t))
            rows.append((a, i, t, mask, i * i + (int(mask.sum()) if t else 0)))
        pos = b.position_ids[:, 0].reshape(-1).float()   # 1-D rotary on the t/h mix is enough
        pos = pos + b.position_ids[:, 1].reshape(-1) + b.position_ids[:, 2].reshape(-1)
        self.meter.real_rows = int((seg >= 0).sum())
        inv = 1.0 / self.theta ** (torch.arange(0, self.dim, 2).float() / self.dim)
        ang = torch.cat([pos[:, None] * inv[None]] * 2, dim=-1)[:, None, :]
        return {"rows": rows, "cos": ang.cos(), "sin": ang.sin(),
                "text_index": (~img & (seg >= 0)).nonzero().squeeze(1),
                "label_index": (b.labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)}

    def step(self, b: PackedBatch) -> float:
        prepared = self.prepare(b)
        self.meter.forward = 0.0
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(b, prepared)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters(), 1.0)
        self.opt.step()
        return 3.0 * self.meter.forward


# ---------------------------------------------------------------------------------------------
# (a) GEMM rate
# ---------------------------------------------------------------------------------------------

def gemm_rate(m, tokens: int, reps: int) -> float:
    """FLOP/s of the block's forward GEMMs at ``tokens`` rows (median over reps)."""
    h, f = m.hidden_size, m.ffn_hidden_size
    shapes = [(h, 4 * h), (h, h), (h, 2 * f), (f, h)]
    mats = [(torch.randn(tokens, a), torch.randn(a, c)) for a, c in shapes]
    flops = sum(2.0 * tokens * a * c for a, c in shapes)
    times = []
    for r in range(reps + 1):
        t0 = CLOCK()
        for x, w in mats:
            torch.mm(x, w)
        if r:
            times.append(CLOCK() - t0)
    return flops / statistics.median(times)


# ---------------------------------------------------------------------------------------------
# (c)/(d) our trainer
# ---------------------------------------------------------------------------------------------

class PrebuiltBatches:
    """Stands in for the trainer's loader: cycles pre-built batches (no loader cost)."""

    def __init__(self, batches: list[PackedBatch]) -> None:
        self.batches, self.i = batches, 0

    def __iter__(self):
        return self

    def __next__(self) -> PackedBatch:
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b

    def counters(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def trainer_step(trainer) -> None:
    trainer.state.step += 1
    trainer.train_step()


def batch_flops(dims: FlopDims, b: PackedBatch) -> float:
    return training_flops(dims, b.image_lens.tolist(), b.text_lens.tolist(),
                          head_tokens=b.num_loss_tokens)


CLOCK: Callable[[], float] = time.perf_counter
"""Step clock: wall time, or this process's CPU time (``--clock cpu``: robust to other load)."""


def timed(fn: Callable[[], object]) -> float:
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


@dataclass
class Result:
    name: str
    flops: float          # mean model FLOPs per step of the pre-built batches
    gemm: float           # FLOP/s
    plain: float          # FLOP/s, median over steps
    stack: float
    e2e: float
    batches: list = field(default_factory=list, repr=False)   # for the peak-memory workers


class Recording:
    """Wraps the real loader and remembers the batches it handed out (for (d)'s FLOPs)."""

    def __init__(self, loader) -> None:
        self.loader, self.seen = loader, []

    def __next__(self) -> PackedBatch:
        b = next(self.loader)
        self.seen.append(b)
        return b

    def __getattr__(self, name):
        return getattr(self.loader, name)


def measure(w: Workload, data_root: Path, backend: str, reps: int, warmup: int,
            workers: int) -> Result:
    from genlip_megatron.training.trainer import Trainer

    cfg = load_cfg(w, ensure_data(data_root, w.stage), backend, workers)
    trainer = Trainer(cfg)
    for chunk in trainer.model:
        chunk.train()
    real_loader = trainer.loader
    batches = [next(real_loader) for _ in range(4)]
    dims = FlopDims.from_model_config(cfg.model)
    torch.manual_seed(0)
    plain = PlainGenLIP(cfg.model)
    # FLOP agreement: the plain step's own count equals flops.py's for every batch.
    for b in batches:
        ours, theirs = batch_flops(dims, b), plain.step(b)
        if not math.isclose(ours, theirs, rel_tol=1e-9):
            raise SystemExit(f"error: FLOP counts differ on {w.name}: flops.py {ours:.6g} vs "
                             f"plain step {theirs:.6g}")
    flops = [batch_flops(dims, b) for b in batches]
    trainer.loader = PrebuiltBatches(batches)
    plain_rates, stack_rates, e2e_rates = [], [], []
    for r in range(warmup + reps):            # (b) and (c) alternate, same batch each
        f = flops[r % len(batches)]
        tb = timed(lambda: plain.step(batches[r % len(batches)]))
        tc = timed(lambda: trainer_step(trainer))
        if r >= warmup:
            plain_rates.append(f / tb)
            stack_rates.append(f / tc)
    # (d): the real loader; FLOPs of the batches it actually produced.
    trainer.loader = Recording(real_loader)
    for r in range(warmup + reps):
        trainer.loader.seen.clear()
        t = timed(lambda: trainer_step(trainer))
        if r >= warmup:
            e2e_rates.append(sum(batch_flops(dims, b) for b in trainer.loader.seen) / t)
    for r in range(reps):                      # (b) again after (d), for drift
        f = flops[r % len(batches)]
        plain_rates.append(f / timed(lambda: plain.step(batches[r % len(batches)])))
    gemm = gemm_rate(cfg.model, w.seq, reps=5)
    trainer.loader = real_loader
    trainer.close()
    _reset_parallel_state()
    return Result(w.name, statistics.mean(flops), gemm, statistics.median(plain_rates),
                  statistics.median(stack_rates), statistics.median(e2e_rates), batches)


# ---------------------------------------------------------------------------------------------
# Peak memory: plain step vs our step, each in a fresh process
# ---------------------------------------------------------------------------------------------

def peak_memory_worker(path: str, w: Workload, data_root: Path, backend: str,
                       batches_file: Path, steps: int) -> int:
    """Bytes ``steps`` training steps of ``path`` allocate at their peak (model built before).

    Both models are built first (the trainer's data loader, which the plain step does not have,
    is closed), then the kernel's high-water mark is reset (``benchmarks/peak_rss.py``) and the
    steps run: activations, gradients, optimizer state (created at the first step in both) and
    temporaries. The plain step allocates its gradients inside the steps; megatron DDP holds
    its grad buffer from construction, so its bytes are added to the stack's figure.
    """
    from benchmarks.peak_rss import PeakRss
    from genlip_megatron.training.trainer import Trainer

    batches = torch.load(batches_file, weights_only=False)
    cfg = load_cfg(w, ensure_data(data_root, w.stage), backend, 0)
    torch.manual_seed(0)
    if path == "plain":
        plain = PlainGenLIP(cfg.model)
        with PeakRss() as meter:
            for r in range(steps):
                plain.step(batches[r % len(batches)])
        return meter.peak_bytes
    trainer = Trainer(cfg)
    for chunk in trainer.model:
        chunk.train()
    trainer.loader.close()
    trainer.loader = PrebuiltBatches(batches)
    grad_buffer = sum(p.main_grad.numel() * p.main_grad.element_size()
                      for chunk in trainer.model for p in chunk.parameters())
    with PeakRss() as meter:
        for _ in range(steps):
            trainer_step(trainer)
    return meter.peak_bytes + grad_buffer


def peak_memory_ratio(w: Workload, data_root: Path, backend: str, batches: list) -> dict:
    """Peak bytes of (c) and (b) on the same batches, each in its own subprocess."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        batches_file = Path(tmp) / "batches.pt"
        torch.save(batches, batches_file)
        out = {}
        for path in ("plain", "stack"):
            cmd = [sys.executable, __file__, "--peak-worker", path, "--peak-workload", w.name,
                   "--peak-batches", str(batches_file), "--backend", backend,
                   "--data-dir", str(data_root)]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
            lines = [x for x in proc.stdout.splitlines() if x.startswith("PEAK ")]
            if proc.returncode or not lines:
                raise SystemExit(f"error: peak-memory worker {path} failed:\n"
                                 f"{proc.stderr[-3000:]}")
            out[path] = int(lines[-1].split()[1])
    return out


def _reset_parallel_state() -> None:
    from genlip_megatron.training.parallel import destroy_topology

    destroy_topology()


# ---------------------------------------------------------------------------------------------
# Packed row vs its samples one by one
# ---------------------------------------------------------------------------------------------

def synthetic_row(samples: list[tuple[int, int, int]], seq: int, vocab: int, patch_dim: int,
                  gen: torch.Generator) -> dict:
    """One packed row of ``(grid_h, grid_w, text_len)`` samples, padded to ``seq``."""
    tokens = torch.zeros(1, seq, dtype=torch.long)
    labels = torch.full((1, seq), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros(1, 3, seq, dtype=torch.long)
    img = torch.zeros(1, seq, dtype=torch.bool)
    seg = torch.full((1, seq), -1, dtype=torch.int32)
    at, n_patches = 0, 0
    for j, (gh, gw, t) in enumerate(samples):
        n = gh * gw
        img[0, at:at + n] = True
        pos[0, 1, at:at + n] = torch.arange(gh).repeat_interleave(gw)
        pos[0, 2, at:at + n] = torch.arange(gw).repeat(gh)
        pos[0, :, at + n:at + n + t] = max(gh, gw) + torch.arange(t)
        tokens[0, at + n:at + n + t] = torch.randint(1, vocab, (t,), generator=gen)
        labels[0, at + n:at + n + t - 1] = tokens[0, at + n + 1:at + n + t]
        seg[0, at:at + n + t] = j
        at, n_patches = at + n + t, n_patches + n
    return {"tokens": tokens, "position_ids": pos, "image_mask": img, "segment_ids": seg,
            "pixel_values": torch.randn(n_patches, patch_dim, generator=gen), "labels": labels}


def synthetic_batch(rows: list[list[tuple[int, int, int]]], seq: int, vocab: int,
                    patch_dim: int, seed: int = 0) -> PackedBatch:
    """A PackedBatch of ``rows`` (each a list of ``(grid_h, grid_w, text_len)``)."""
    gen = torch.Generator().manual_seed(seed)
    parts = [synthetic_row(r, seq, vocab, patch_dim, gen) for r in rows]
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    samples = [s for r in rows for s in r]
    img = torch.tensor([h * w for h, w, _ in samples], dtype=torch.int32)
    txt = torch.tensor([t for _, _, t in samples], dtype=torch.int32)
    offsets, grid = [], torch.tensor([[h, w] for h, w, _ in samples], dtype=torch.int32)
    for i, r in enumerate(rows):
        at = i * seq
        for h, w, t in r:
            offsets.append(at)
            at += h * w + t

    def cu(x: Tensor) -> Tensor:
        return torch.cat([torch.zeros(1, dtype=torch.int32), x.cumsum(0).int()])

    return PackedBatch(cat["tokens"], cat["labels"], cat["position_ids"], cat["image_mask"],
                       cat["segment_ids"], cat["pixel_values"], grid,
                       torch.tensor(offsets, dtype=torch.int32), img, txt, cu(img + txt),
                       cu(img), cu(txt))


def _fwd_bwd(model, row: dict) -> float:
    def run():
        loss = model(row["tokens"], row["position_ids"], row["image_mask"], row["segment_ids"],
                     row["pixel_values"], labels=row["labels"])
        loss.sum().backward()
    return timed(run)


def packed_row_check(seqs: list[int], reps: int, dense_up_to: int) -> list[dict]:
    """Time fwd+bwd of a packed native-resolution row vs its samples one row each, with the
    package's default attention backend (``auto``, resolved for CPU) and the dense oracle."""
    from genlip_megatron.config import ParallelConfig, PrecisionConfig, decode_variant
    from genlip_megatron.model.genlip import GenLIPMegatronModel
    from genlip_megatron.model.transformer_config import build_transformer_config
    from genlip_megatron.training.parallel import initialize_topology

    initialize_topology(ParallelConfig())
    m = replace(decode_variant("tiny"), hidden_size=256, num_attention_heads=4,
                ffn_hidden_size=704, text_dim=256, mrope_section=[8, 12, 12], vocab_size=4096)
    gen = torch.Generator().manual_seed(0)
    models = {}
    for name, backend in (("default", m.attention_backend), ("dense", "dense")):
        tc = build_transformer_config(replace(m, attention_backend=backend), ParallelConfig(),
                                      PrecisionConfig(params_dtype="fp32"), init_seed=1,
                                      has_cuda=False)
        models[name] = GenLIPMegatronModel(tc)
    resolved = models["default"].config.prefix_attention_backend
    out = []
    for seq in seqs:
        # ~1000-token native-resolution samples: 31×31 … 32×30 grids + 40–60 text tokens
        n = seq // 1024
        samples = [(31 + (j % 2), 30 + (j % 3) // 2, 40 + 7 * j % 21) for j in range(n)]
        row = synthetic_row(samples, seq, m.vocab_size, m.patch_dim, gen)
        singles = [synthetic_row([s], s[0] * s[1] + s[2], m.vocab_size, m.patch_dim, gen)
                   for s in samples]
        rec = {"seq": seq, "samples": n, "backend": f"{m.attention_backend}->{resolved}"}
        for backend, model in models.items():
            if backend == "dense" and seq > dense_up_to:
                continue
            packed, alone = [], []
            for r in range(reps + 1):
                tp = _fwd_bwd(model, row)
                ta = sum(_fwd_bwd(model, s) for s in singles)
                if r:
                    packed.append(tp)
                    alone.append(ta)
            rec[backend] = (statistics.median(packed), statistics.median(alone))
        out.append(rec)
    _reset_parallel_state()
    return out


# ---------------------------------------------------------------------------------------------
# Profile
# ---------------------------------------------------------------------------------------------

def profile_steps(w: Workload, data_root: Path, backend: str, steps: int, top: int) -> str:
    """Per-op self CPU time of our trainer step next to the plain step's (same batches).

    Each step of (b) and (c) is profiled on its own, alternating; per op the smallest per-step
    time is kept (torch.profiler times are wall time: the minimum over steps drops most of the
    other jobs' preemptions). Rows are sorted by |stack - plain|: where the extra time goes.
    """
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    from genlip_megatron.training.trainer import Trainer

    cfg = load_cfg(w, ensure_data(data_root, w.stage), backend, 0)
    trainer = Trainer(cfg)
    for chunk in trainer.model:
        chunk.train()
    batches = [next(trainer.loader) for _ in range(2)]
    trainer.loader.close()
    trainer.loader = PrebuiltBatches(batches)
    torch.manual_seed(0)
    plain = PlainGenLIP(cfg.model)
    runs = {"plain": lambda i: plain.step(batches[i % 2]),
            "stack": lambda i: trainer_step(trainer)}
    per_op: dict = {name: defaultdict(list) for name in runs}
    for i in range(2 + steps):
        for name, run in runs.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run(i)
            for e in prof.key_averages() if i >= 2 else ():
                per_op[name][e.key].append((e.self_cpu_time_total / 1e3, e.count))
    trainer.close()
    _reset_parallel_state()
    best = {name: {k: min(v) for k, v in ops.items()} for name, ops in per_op.items()}
    keys = sorted(set(best["plain"]) | set(best["stack"]), key=lambda k: -abs(
        best["stack"].get(k, (0, 0))[0] - best["plain"].get(k, (0, 0))[0]))
    lines = [f"{'op':56s} {'plain ms':>9s} {'calls':>5s} {'stack ms':>9s} {'calls':>5s} "
             f"{'diff ms':>8s}"]
    for k in keys[:top]:
        (tb, nb), (tc, nc) = best["plain"].get(k, (0, 0)), best["stack"].get(k, (0, 0))
        lines.append(f"{k[:56]:56s} {tb:9.2f} {nb:5d} {tc:9.2f} {nc:5d} {tc - tb:8.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CI-sized run (< 5 min)")
    p.add_argument("--reps", type=int, default=None, help="measured steps per figure")
    p.add_argument("--backend", default="auto", choices=["auto", "varlen", "dense"],
                   help="our model's attention backend (auto: the package default)")
    p.add_argument("--packed-row-only", action="store_true",
                   help="only the packed-row check (default backend and dense)")
    p.add_argument("--peak-worker", choices=["plain", "stack"], help=argparse.SUPPRESS)
    p.add_argument("--peak-workload", help=argparse.SUPPRESS)
    p.add_argument("--peak-batches", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=None,
                   help="loader worker processes for (d) (default: 1; 0 with --quick or "
                        "--clock cpu)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or process CPU time (robust when other jobs share the "
                        "cores; use with OMP_NUM_THREADS=1 and --workers 0)")
    p.add_argument("--data-dir", default=str(REPO / ".cache" / "bench_throughput"))
    p.add_argument("--profile", action="store_true",
                   help="print a per-op torch.profiler comparison of the plain step and ours")
    p.add_argument("--profile-only", action="store_true",
                   help="only that comparison (first workload), no throughput run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.clock == "cpu" and (args.workers or 0) > 0:
        print("error: --clock cpu cannot see loader worker processes; use --workers 0.",
              file=sys.stderr)
        return 2
    torch.manual_seed(0)
    init_single_process()
    if args.peak_worker:
        w = next(x for x in workloads(True) + workloads(False) if x.name == args.peak_workload)
        peak = peak_memory_worker(args.peak_worker, w, Path(args.data_dir), args.backend,
                                  Path(args.peak_batches), steps=3)
        print(f"PEAK {peak}")
        return 0
    if args.profile_only:
        print(profile_steps(workloads(args.quick)[0], Path(args.data_dir), args.backend, 3, 25))
        return 0
    if args.packed_row_only:
        _print_packed_rows(packed_row_check([4096], reps=1 if args.quick else 2,
                                            dense_up_to=4096), bench=True)
        return 0
    reps = args.reps or (3 if args.quick else 5)
    workers = args.workers if args.workers is not None else \
        (0 if args.quick or args.clock == "cpu" else 1)
    data_root = Path(args.data_dir)
    t_start = time.time()
    results = []
    for w in workloads(args.quick):
        results.append(measure(w, data_root, args.backend, reps, warmup=2, workers=workers))
        r = results[-1]
        print(f"[{time.time() - t_start:5.0f} s] {r.name}: stack/plain {r.stack / r.plain:.3f}, "
              f"e2e/plain {r.e2e / r.plain:.3f}", flush=True)
    print(f"\nthroughput ({args.backend} attention, fp32, {torch.get_num_threads()} threads, "
          f"{reps} reps, medians, {args.clock} clock)")
    print(f"{'workload':14s} {'GFLOP/step':>10s} {'gemm GF/s':>9s} {'plain GF/s':>10s} "
          f"{'stack GF/s':>10s} {'e2e GF/s':>9s} {'stack/plain':>11s} {'e2e/plain':>9s}")
    for r in results:
        print(f"{r.name:14s} {r.flops / 1e9:10.1f} {r.gemm / 1e9:9.1f} {r.plain / 1e9:10.1f} "
              f"{r.stack / 1e9:10.1f} {r.e2e / 1e9:9.1f} {r.stack / r.plain:11.3f} "
              f"{r.e2e / r.plain:9.3f}")
    # over workloads: total FLOPs / total time at each workload's median rate
    total = sum(r.flops for r in results)
    rate = {k: total / sum(r.flops / getattr(r, k) for r in results)
            for k in ("plain", "stack", "e2e")}
    gemm = statistics.median(r.gemm for r in results)
    peaks = [peak_memory_ratio(w, data_root, args.backend, r.batches)
             for w, r in zip(workloads(args.quick), results)]
    print("\npeak memory of 3 steps (activations, grads, optimizer state), fresh process each")
    for r, pk in zip(results, peaks):
        print(f"  {r.name:14s} plain {pk['plain'] / 2**20:8.1f} MiB, stack "
              f"{pk['stack'] / 2**20:8.1f} MiB, ratio {pk['stack'] / pk['plain']:.3f}")
    peak_ratio = max(pk["stack"] / pk["plain"] for pk in peaks)
    rows = packed_row_check([4096] if args.quick else [4096, 16384], reps=1 if args.quick else 2,
                            dense_up_to=4096)
    _print_packed_rows(rows)
    if args.profile:
        print("\ntorch.profiler, plain step vs our step (self time per op, min over 3 steps)")
        print(profile_steps(workloads(args.quick)[0], data_root, args.backend, 3, 25))
    row4096 = next(r for r in rows if r["seq"] == 4096)["default"]
    print(f"\nwall time {time.time() - t_start:.0f} s")
    print(f"BENCH throughput stack_vs_plain={rate['stack'] / rate['plain']:.3f} "
          f"e2e_vs_plain={rate['e2e'] / rate['plain']:.3f} "
          f"cpu_mfu={rate['stack'] / gemm:.3f} plain_mfu={rate['plain'] / gemm:.3f} "
          f"peak_mem_vs_plain={peak_ratio:.3f} "
          f"row4096_vs_samples={row4096[0] / row4096[1]:.3f}", flush=True)
    return 0


def _print_packed_rows(rows: list[dict], bench: bool = False) -> None:
    print("\npacked native-resolution row vs its samples one by one (fwd+bwd, H 256, 2 layers)")
    for rec in rows:
        for backend in ("default", "dense"):
            if backend in rec:
                tp, ta = rec[backend]
                print(f"  {rec['seq']:6d} tokens, {rec['samples']:2d} samples, {backend:7s}: "
                      f"packed {tp:7.2f} s, one by one {ta:7.2f} s, ratio {tp / ta:5.2f}")
    row = next(r for r in rows if r["seq"] == 4096)["default"]
    if bench:   # --packed-row-only; the full run puts the ratio in its throughput line
            print(f"BENCH packed_row backend={rows[0]['backend']} row4096_vs_samples="
              f"{row[0] / row[1]:.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
