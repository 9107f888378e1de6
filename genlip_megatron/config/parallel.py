"""Parallel layout section (TP/PP/VPP/SP/CP, DP optimizer, recompute) and its rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from genlip_megatron.config.loader import ConfigError
from genlip_megatron.config.model import ModelConfig
from genlip_megatron.config.training import TrainingConfig

__all__ = ["RecomputeConfig", "ParallelConfig", "divisors", "microbatch_count",
           "validate_parallel", "validate_batch"]


@dataclass(kw_only=True)
class RecomputeConfig:
    """Activation recomputation (megatron-core ``recompute_*`` settings)."""

    granularity: Optional[Literal["selective", "full"]] = None
    """None: keep activations; selective: core attention only; full: whole layers."""
    method: Literal["uniform", "block"] = "uniform"
    """For full recompute: split layers into uniform chunks, or recompute the first N per stage."""
    num_layers: int = 1
    """For full recompute: layers per chunk (uniform) or recomputed layers per stage (block)."""


@dataclass(kw_only=True)
class ParallelConfig:
    """Model/data parallel layout. Data parallel size is world_size / (tp · pp)."""

    tp: int = 1
    """Tensor model parallel size; must divide the attention heads."""
    pp: int = 1
    """Pipeline model parallel size; must divide the layers (× vpp)."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per pipeline rank (interleaved 1F1B); None disables."""
    sp: bool = False
    """Sequence parallelism (needs tp > 1)."""
    cp: int = 1
    """Context parallel size; GenLIP's prefix-LM attention supports only 1."""
    use_distributed_optimizer: Optional[bool] = None
    """Shard optimizer state (and fp32 main params) across data-parallel ranks. None (default):
    on when data-parallel size > 1, off (with a log line) at DP = 1, where it shards nothing
    and costs three full-buffer copies per step; true/false force it."""
    overlap_grad_reduce: bool = False
    """Overlap the gradient reduce-scatter/all-reduce with the backward pass."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward."""
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    """Activation recomputation."""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate_parallel(m: ModelConfig, p: ParallelConfig, world_size: Optional[int]) -> None:
    if p.tp < 1 or p.pp < 1:
        raise ConfigError(f"parallel.tp ({p.tp}) and parallel.pp ({p.pp}) must be ≥ 1.")
    if m.num_attention_heads % p.tp:
        valid = [d for d in divisors(m.num_attention_heads)]
        raise ConfigError(f"model.num_attention_heads ({m.num_attention_heads}) is not divisible "
                          f"by parallel.tp ({p.tp}); use tp in {valid}.")
    if m.vocab_size % p.tp:
        raise ConfigError(f"model.vocab_size ({m.vocab_size}) is not divisible by parallel.tp "
                          f"({p.tp}); pad the vocabulary or pick another tp.")
    if m.ffn_hidden_size % p.tp:
        raise ConfigError(f"model.ffn_hidden_size ({m.ffn_hidden_size}) is not divisible by "
                          f"parallel.tp ({p.tp}).")
    if p.cp != 1:
        raise ConfigError(f"parallel.cp ({p.cp}) must be 1: GenLIP's prefix-LM mask needs "
                          "bottom-right-aligned causal masks, which Transformer Engine disables "
                          "under context parallelism; use tp/sp to split long rows instead.")
    if p.sp and p.tp == 1:
        raise ConfigError("parallel.sp is true but parallel.tp is 1; sequence parallelism shards "
                          "activations over the tensor-parallel group, so set tp > 1 or sp: false.")
    stages = p.pp * (p.vpp or 1)
    if p.vpp is not None and (p.vpp < 1 or p.pp == 1):
        raise ConfigError(f"parallel.vpp ({p.vpp}) needs parallel.pp > 1 and vpp ≥ 1; "
                          "set vpp: null for a non-interleaved schedule.")
    if m.num_layers % stages:
        raise ConfigError(f"model.num_layers ({m.num_layers}) is not divisible by parallel.pp × "
                          f"vpp ({stages}); use a stage count in {divisors(m.num_layers)}.")
    if world_size is not None and world_size % (p.tp * p.pp):
        raise ConfigError(f"world size ({world_size}) is not divisible by parallel.tp × "
                          f"parallel.pp ({p.tp} × {p.pp}); the data-parallel size must be whole.")


def validate_batch(t: TrainingConfig, p: ParallelConfig, world_size: Optional[int]) -> None:
    if world_size is None or world_size % (p.tp * p.pp):
        return
    microbatch_count(t, p, world_size // (p.tp * p.pp))


def microbatch_count(t: TrainingConfig, p: ParallelConfig, dp: int) -> int:
    """Micro-batches per step: global_batch_size / (micro_batch_size × dp), refusing remainders
    (and, under interleaved pipelining, counts that are not a multiple of parallel.pp)."""
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError(f"training.global_batch_size ({t.global_batch_size}) is not divisible by"
                          f" training.micro_batch_size × data-parallel size ({t.micro_batch_size}"
                          f" × {dp}); pick a multiple of {per_step}.")
    n = t.global_batch_size // per_step
    if p.vpp and n % p.pp:
        raise ConfigError(f"interleaved pipelining needs the number of microbatches ({n}) to be "
                          f"a multiple of parallel.pp ({p.pp}); raise training.global_batch_size.")
    return n


