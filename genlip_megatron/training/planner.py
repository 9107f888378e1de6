"""Analytic memory and step-time model of GenLIP training, for choosing a parallel layout.

Used by ``tools/plan_parallelism.py``; checked against measured per-rank memory on CPU
(``tests/multirank/test_plan_memory.py``, accounting in ``training/memory.py``) and against
``training/flops.py`` (the FLOP count is flops.py's, not a second formula).

**Model state per rank** (megatron DDP with ``grad_reduce_in_fp32``, Adam):
parameters of this rank's layers and embeddings/head (TP-sharded as the model shards them) ×
(param bytes + 4 fp32 grad-buffer bytes) + optimizer state: Adam moments (8 bytes) and, for
16-bit params, an fp32 main copy (4 bytes) — divided by DP under the distributed optimizer.

**Activations per layer and micro-batch** (``N = S·B`` tokens, ``b`` bytes of the activation
dtype; counted on the local layer path by :class:`~genlip_megatron.training.memory.
SavedActivationMeter`, unit = ``N·H·b``):

- 6 units on the residual stream (LayerNorm inputs/outputs, the LayerScale branch inputs):
  replicated over TP, split by TP under sequence parallelism;
- 10 units inside attention (q, k after RoPE, the qkv output, attention output, sigmoid gate,
  gated product) and ``5·F/H`` units in the SwiGLU MLP (fc1 output, SiLU, product): split by TP;
- RoPE angles (cos, sin for q and k): ``4·N·hd·b``, replicated; LayerNorm statistics ``4·N·b``;
- backend ``dense``: the fp32 softmax probabilities ``B·(heads/tp)·S²·4`` (16-bit runs add
  their 16-bit copy and an fp32 ``N·H/tp`` context), plus one shared ``B·S²`` bool mask per
  micro-batch; ``varlen``: its per-sample SDPA outputs, one more unit split by TP;
  ``te``/``flex``: nothing quadratic.
- selective recompute drops the backend term; full recompute keeps only each layer's input
  (1 unit, split under SP) plus one layer recomputed during backward.

Embeddings (first stage): pixel rows ``P·C·p²·b``, text embeddings ``N·T·b``, token ids. Head
(last stage): final-LN input (1 unit), selected rows ``n·(H + T)·b`` and fp32 logits
``n·V/tp·4`` for the ``n`` label positions (``model.loss_impl: full``), or of one block of
at most 2^24 logits with the default chunked loss (``model/lm_loss.py``). Pipeline:
the first stage holds ``min(pp, micro-batches)`` micro-batches of activations (1F1B), interleaved
``(pp-1)·2 + (vpp-1)·pp + 1`` chunks.

**Step time**: model FLOPs / (devices · peak · efficiency) + the pipeline bubble
``(pp-1)/(vpp·m)`` of the compute + TP collectives (4 per layer per micro-batch, ring volume
``2(tp-1)/tp · N·H·b`` each) + DP gradient reduce-scatter/all-gather (``2(dp-1)/dp`` × grad
bytes, a fraction overlapped) + PP point-to-point activations. Bandwidths are parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from genlip_megatron.training.flops import FlopDims, forward_flops

__all__ = ["ModelDims", "SampleMix", "Layout", "Hardware", "GPUS", "MemoryEstimate",
           "param_counts", "memory_per_rank", "step_flops", "step_time", "plan"]


@dataclass(frozen=True)
class ModelDims:
    """What the estimates need of the model."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    text_dim: int
    vocab: int
    patch_dim: int
    gated_attention: bool = True

    @classmethod
    def from_model_config(cls, m) -> "ModelDims":
        return cls(m.hidden_size, m.num_layers, m.num_attention_heads, m.ffn_hidden_size,
                   m.text_dim, m.vocab_size, m.patch_dim, m.gated_attention)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def flop_dims(self) -> FlopDims:
        return FlopDims(self.hidden, self.ffn, self.layers, self.text_dim, self.vocab,
                        self.patch_dim, gated_attention=self.gated_attention)


@dataclass(frozen=True)
class SampleMix:
    """One micro-batch: ``rows`` packed rows of ``seq`` tokens holding these samples.

    ``image_lens``/``text_lens`` list the samples of the WHOLE micro-batch; ``labels`` is the
    number of positions with a target (default: one per text token minus one per sample).
    """

    seq: int
    rows: int
    image_lens: tuple[int, ...]
    text_lens: tuple[int, ...]
    labels: Optional[int] = None

    @classmethod
    def uniform(cls, seq: int, rows: int, image: int, text: int) -> "SampleMix":
        """Rows filled with identical ``image + text`` samples (as many as fit)."""
        per_row = max(1, seq // (image + text))
        n = per_row * rows
        return cls(seq, rows, (image,) * n, (text,) * n)

    @property
    def tokens(self) -> int:
        return self.seq * self.rows

    @property
    def patches(self) -> int:
        return sum(self.image_lens)

    @property
    def label_count(self) -> int:
        if self.labels is not None:
            return self.labels
        return sum(max(t - 1, 0) for t in self.text_lens)


@dataclass(frozen=True)
class Layout:
    """A parallel layout and the settings that change memory/time."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: Optional[int] = None
    sp: bool = False
    distributed_optimizer: bool = True
    recompute: Optional[str] = None        # None | "selective" | "full"
    micro_batches: int = 1                 # per DP rank per step
    params_bytes: int = 2                  # 4 fp32, 2 bf16
    attention: str = "te"                  # dense | varlen | te | flex
    loss_impl: str = "chunked"             # chunked | full (model.loss_impl)

    def set_flags(self, micro_batch_size: int) -> list[str]:
        """The ``--set`` overrides of this layout."""
        flags = [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}",
                 f"parallel.sp={'true' if self.sp else 'false'}",
                 f"parallel.use_distributed_optimizer="
                 f"{'true' if self.distributed_optimizer else 'false'}",
                 f"training.micro_batch_size={micro_batch_size}"]
        if self.vpp:
            flags.append(f"parallel.vpp={self.vpp}")
        if self.recompute:
            flags.append(f"parallel.recompute.granularity={self.recompute}")
        return flags


@dataclass(frozen=True)
class Hardware:
    """One accelerator type; bandwidths in bytes/s per GPU."""

    name: str
    memory: float               # bytes
    peak: float                 # dense bf16 FLOP/s
    intra_bw: float             # NVLink, per GPU, one direction
    inter_bw: float             # network, per GPU
    gpus_per_node: int = 8
    efficiency: float = 0.55    # achievable fraction of peak for this model's GEMMs


GPUS = {
    "H100": Hardware("H100", 80e9, 989e12, 450e9, 50e9),
    "H200": Hardware("H200", 141e9, 989e12, 450e9, 50e9),
    "A100": Hardware("A100", 80e9, 312e12, 300e9, 25e9),
    "B200": Hardware("B200", 180e9, 2.25e15, 900e9, 50e9),
}


# ---------------------------------------------------------------------------------------------
# Parameters and model state
# ---------------------------------------------------------------------------------------------

def param_counts(d: ModelDims, tp: int) -> dict[str, int]:
    """Per-rank parameter counts: one layer, first-stage extras, last-stage extras."""
    h, f, t, v = d.hidden, d.ffn, d.text_dim, d.vocab
    qkv = 4 if d.gated_attention else 3                          # q, k, v (+ the sigmoid gate)
    layer = ((qkv * h * h + qkv * h) // tp + (h * h) // tp + h   # qkv(+gate), proj (+bias)
             + (2 * f * h + 2 * f) // tp + (f * h) // tp + h     # fc1, fc2 (+bias)
             + 4 * h + 2 * h)                                    # two LayerNorms, LayerScales
    first = d.patch_dim * h + h + (v // tp) * t + ((t * h + h) if t != h else 0)
    last = 2 * h + ((h * t + t) if t != h else 0) + (v // tp) * t
    return {"layer": layer, "first": first, "last": last}


def _stage_layers(d: ModelDims, lay: Layout) -> int:
    return d.layers // lay.pp


def _rank_params(d: ModelDims, lay: Layout, stage: int) -> int:
    c = param_counts(d, lay.tp)
    n = c["layer"] * _stage_layers(d, lay)
    if stage == 0:
        n += c["first"]
    if stage == lay.pp - 1:
        n += c["last"]
    return n


def _state_bytes(params: int, lay: Layout) -> float:
    optim = 8 + (4 if lay.params_bytes < 4 else 0)       # Adam moments (+ fp32 main params)
    if lay.distributed_optimizer:
        optim /= lay.dp
    return params * (lay.params_bytes + 4 + optim)       # + fp32 grad buffer


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------

def _layer_activation_bytes(d: ModelDims, lay: Layout, mix: SampleMix) -> float:
    n, b, h, tp = mix.tokens, lay.params_bytes, d.hidden, lay.tp
    unit = n * h * b
    residual = 6 * unit / (tp if lay.sp else 1)
    attn_units = 10 if d.gated_attention else 8                 # no gate, no gated product
    inner = (attn_units * unit + 5 * n * d.ffn * b) / tp
    fixed = 4 * n * d.head_dim * b + 4 * n * b            # RoPE angles, LayerNorm statistics
    backend = 0.0
    if lay.recompute != "selective":
        if lay.attention == "dense":
            # fp32 softmax output; 16-bit runs also keep its 16-bit copy and an fp32 context
            probs = mix.rows * (d.heads // tp) * mix.seq ** 2
            backend = probs * 4 + (probs * b + n * h * 4 / tp if b < 4 else 0)
        elif lay.attention == "varlen":
            backend = unit / tp
    return residual + inner + fixed + backend


def _in_flight(lay: Layout, stage: int) -> int:
    """Micro-batch chunks whose activations a stage holds at its peak."""
    chunks = lay.micro_batches * (lay.vpp or 1)
    if lay.pp == 1:
        return 1
    if lay.vpp:
        return min((lay.pp - stage - 1) * 2 + (lay.vpp - 1) * lay.pp + 1, chunks)
    return min(lay.pp - stage, chunks)


def _activation_bytes(d: ModelDims, lay: Layout, mix: SampleMix, stage: int) -> float:
    b, n = lay.params_bytes, mix.tokens
    per_layer = _layer_activation_bytes(d, lay, mix)
    chunk_layers = _stage_layers(d, lay) // (lay.vpp or 1)
    if lay.recompute == "full":
        kept = n * d.hidden * b / (lay.tp if lay.sp else 1)
        chunk = chunk_layers * kept
        recomputed = per_layer
    else:
        chunk, recomputed = chunk_layers * per_layer, 0.0
    first = 0.0
    if stage == 0:
        first = mix.patches * d.patch_dim * b + n * d.text_dim * b + n * 8
        if lay.attention == "dense":
            first += mix.rows * mix.seq ** 2                # the shared bool mask
    inflight = _in_flight(lay, stage)
    total = inflight * (chunk + first) + recomputed
    if stage == lay.pp - 1:
        lab, shard = mix.label_count, d.vocab // lay.tp
        logits = lab * shard if lay.loss_impl == "full" else min(lab * shard, CHUNK_LOGITS)
        total += n * d.hidden * b + lab * (d.hidden + d.text_dim) * b + logits * 4
    return total


CHUNK_LOGITS = 2 ** 24
"""Logits per block of the default chunked loss: ``model/lm_loss.py``'s CHUNK_LOGITS (repeated
so that the planner CLI stays free of megatron imports; a unit test keeps the two equal)."""


@dataclass
class MemoryEstimate:
    """Predicted bytes of one rank (pipeline stage)."""

    stage: int
    params: int
    state: float
    activations: float

    @property
    def total(self) -> float:
        return self.state + self.activations


def memory_per_rank(d: ModelDims, lay: Layout, mix: SampleMix) -> list[MemoryEstimate]:
    """One estimate per pipeline stage (TP/DP ranks of a stage are alike)."""
    if d.layers % (lay.pp * (lay.vpp or 1)):
        raise ValueError(f"model.num_layers ({d.layers}) must divide by pp × vpp "
                         f"({lay.pp} × {lay.vpp or 1}).")
    out = []
    for stage in range(lay.pp):
        params = _rank_params(d, lay, stage)
        out.append(MemoryEstimate(stage, params, _state_bytes(params, lay),
                                  _activation_bytes(d, lay, mix, stage)))
    return out


# ---------------------------------------------------------------------------------------------
# FLOPs and time
# ---------------------------------------------------------------------------------------------

def step_flops(d: ModelDims, mix: SampleMix, micro_batches_global: int) -> float:
    """Model FLOPs of one optimizer step (flops.py's count, 3× forward)."""
    fwd = forward_flops(d.flop_dims(), mix.image_lens, mix.text_lens,
                        head_tokens=mix.label_count)
    return 3.0 * fwd * micro_batches_global


@dataclass
class TimeEstimate:
    compute: float
    bubble: float
    tp_comm: float
    dp_comm: float
    pp_comm: float

    @property
    def total(self) -> float:
        return self.compute + self.bubble + self.tp_comm + self.dp_comm + self.pp_comm


def step_time(d: ModelDims, lay: Layout, mix: SampleMix, hw: Hardware,
              dp_overlap: float = 0.5) -> TimeEstimate:
    """Seconds per optimizer step on ``tp·pp·dp`` GPUs of type ``hw``."""
    gpus = lay.tp * lay.pp * lay.dp
    flops = step_flops(d, mix, lay.micro_batches * lay.dp)
    recompute = {"full": 4 / 3, "selective": 1.0 + 0.05}.get(lay.recompute or "", 1.0)
    compute = flops * recompute / (gpus * hw.peak * hw.efficiency)
    bubble = compute * (lay.pp - 1) / ((lay.vpp or 1) * lay.micro_batches)
    b, n = lay.params_bytes, mix.tokens
    tp_bw = hw.intra_bw if lay.tp <= hw.gpus_per_node else hw.inter_bw
    per_collective = 2 * (lay.tp - 1) / lay.tp * n * d.hidden * b / tp_bw
    tp_comm = 4 * (d.layers // lay.pp) * lay.micro_batches * per_collective
    grads = _rank_params(d, lay, 0) * 4
    in_node = lay.tp * lay.pp * lay.dp <= hw.gpus_per_node
    dp_bw = hw.intra_bw if in_node else hw.inter_bw
    dp_comm = (1 - dp_overlap) * 2 * (lay.dp - 1) / lay.dp * grads / dp_bw
    pp_bw = hw.intra_bw if lay.tp * lay.pp <= hw.gpus_per_node else hw.inter_bw
    pp_comm = (2 * lay.micro_batches * (lay.vpp or 1) * n * d.hidden * b / lay.tp / pp_bw
               if lay.pp > 1 else 0.0)
    return TimeEstimate(compute, bubble, tp_comm, dp_comm, pp_comm)


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------

@dataclass
class Plan:
    layout: Layout
    micro_batch_size: int
    memory: float              # bytes, worst stage
    seconds: float
    tokens_per_s: float
    mfu: float
    flags: list[str] = field(default_factory=list)


def _divisors(n: int, limit: int) -> list[int]:
    return [k for k in range(1, min(n, limit) + 1) if n % k == 0]


def plan(d: ModelDims, hw: Hardware, gpus: int, global_batch: int, seq: int, image: int,
         text: int, headroom: float = 0.9, top: int = 10) -> list[Plan]:
    """Fitting layouts ranked by predicted tokens/s (bf16, distributed optimizer, TE attn)."""
    plans = []
    for tp in [k for k in (1, 2, 4, 8) if k <= hw.gpus_per_node and d.heads % k == 0
               and d.vocab % k == 0]:
        for pp in _divisors(d.layers, 16):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            for vpp in (None, 2):
                if vpp and (pp == 1 or d.layers % (pp * vpp)):
                    continue
                for mbs in (1, 2, 4):
                    if global_batch % (mbs * dp):
                        continue
                    m = global_batch // (mbs * dp)
                    if vpp and m % pp:
                        continue
                    for rc in (None, "selective", "full"):
                        lay = Layout(tp=tp, pp=pp, dp=dp, vpp=vpp, sp=tp > 1,
                                     recompute=rc, micro_batches=m)
                        mix = SampleMix.uniform(seq, mbs, image, text)
                        mem = max(e.total for e in memory_per_rank(d, lay, mix))
                        if mem > headroom * hw.memory:
                            continue
                        t = step_time(d, lay, mix, hw)
                        flops = step_flops(d, mix, m * dp)
                        real = sum(mix.image_lens) + sum(mix.text_lens)
                        plans.append(Plan(lay, mbs, mem, t.total,
                                          real * m * dp / t.total,
                                          flops / (t.total * gpus * hw.peak),
                                          lay.set_flags(mbs)))
    plans.sort(key=lambda p: (-p.tokens_per_s, p.memory))
    return plans[:top]


def with_dtype(lay: Layout, params_bytes: int) -> Layout:
    """``lay`` with another parameter/activation width (4 fp32, 2 bf16)."""
    return replace(lay, params_bytes=params_bytes)
