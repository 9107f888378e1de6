"""Precision section (parameter dtype, FP8) and the FP8 shape rules TE's kernels impose.

:func:`fp8_alignment` is the one home of the FP8 GEMM alignment rule; the config validation
here and ``genlip_megatron/model/fp8.py`` (``fp8_gemm_shape_problems``) both read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from genlip_megatron.config.loader import ConfigError
from genlip_megatron.config.model import ModelConfig
from genlip_megatron.config.parallel import ParallelConfig, divisors

__all__ = ["Fp8Config", "PrecisionConfig", "fp8_alignment", "validate_precision",
           "validate_fp8_te_alignment"]


@dataclass(kw_only=True)
class Fp8Config:
    """FP8 training through Transformer Engine (or its CPU emulation for numerics studies)."""

    recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "tensorwise"
    """TE scaling recipe: delayed (amax history), tensorwise (current scaling), mxfp8, blockwise."""
    format: Literal["e4m3", "hybrid"] = "hybrid"
    """e4m3 everywhere, or hybrid (e4m3 forward, e5m2 gradients)."""
    amax_history_len: int = 1024
    """Delayed scaling: amax history length."""
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    """Delayed scaling: how the scale is derived from the history."""
    margin: int = 0
    """Scaling margin (powers of two)."""
    first_last_layers_bf16: bool = False
    """Keep the first/last transformer layers in BF16 (not with the delayed recipe)."""
    num_layers_at_start_in_bf16: int = 1
    """Layers kept in BF16 at the start when first_last_layers_bf16."""
    num_layers_at_end_in_bf16: int = 1
    """Layers kept in BF16 at the end when first_last_layers_bf16."""
    emulate: bool = False
    """CPU emulation of FP8 GEMM numerics (per-tensor current scaling); no TE/GPU needed."""


@dataclass(kw_only=True)
class PrecisionConfig:
    """Parameter dtype and FP8."""

    params_dtype: Literal["fp32", "bf16"] = "bf16"
    """Model parameter/activation dtype; the optimizer keeps fp32 main params for bf16."""
    fp8: Optional[Fp8Config] = None
    """FP8 settings, or None for no FP8."""


def fp8_alignment(recipe: str) -> tuple[int, int]:
    """(GEMM inner-dim multiple, token-count multiple) TE's FP8 GEMMs need for ``recipe``:
    TE ``assert_dim_for_fp8_exec`` (16, 8); MXFP8 ``MXFP8Quantizer.is_quantizable`` (32, 32)."""
    return (32, 32) if recipe == "mxfp8" else (16, 8)


def validate_precision(m: ModelConfig, p: ParallelConfig, prec: PrecisionConfig,
                       has_cuda: bool, has_te: bool) -> None:
    fp8 = prec.fp8
    if fp8 is None:
        return
    if not fp8.emulate and not (has_cuda and has_te):
        missing = " and ".join(x for x, ok in (("a CUDA GPU", has_cuda),
                                                ("transformer_engine", has_te)) if not ok)
        raise ConfigError(f"precision.fp8 needs {missing}; install the 'gpu' extra on a Hopper/"
                          "Blackwell machine, or set precision.fp8.emulate: true to study FP8 "
                          "numerics on CPU, or precision.fp8: null.")
    if not fp8.emulate and m.transformer_impl != "te":
        raise ConfigError("precision.fp8 runs through Transformer Engine layers; set "
                          "model.transformer_impl: te (or precision.fp8.emulate: true).")
    if fp8.recipe == "delayed" and fp8.first_last_layers_bf16:
        raise ConfigError("precision.fp8.first_last_layers_bf16 is not supported with recipe "
                          "'delayed' (megatron-core refuses it); use recipe 'tensorwise' or set "
                          "first_last_layers_bf16: false.")
    align, _ = fp8_alignment(fp8.recipe)
    ffn_shard = m.ffn_hidden_size // p.tp
    if ffn_shard % align:
        ok = [t for t in divisors(m.num_attention_heads)
              if m.ffn_hidden_size % t == 0 and (m.ffn_hidden_size // t) % align == 0]
        raise ConfigError(f"model.ffn_hidden_size / parallel.tp ({m.ffn_hidden_size}/{p.tp} = "
                          f"{ffn_shard}) is not a multiple of {align}, which FP8 ({fp8.recipe}) "
                          f"GEMMs require; use tp in {ok} or pad ffn_hidden_size.")
    if m.hidden_size % align:
        raise ConfigError(f"model.hidden_size ({m.hidden_size}) must be a multiple of {align} for "
                          f"FP8 ({fp8.recipe}).")


def validate_fp8_te_alignment(m: ModelConfig, p: ParallelConfig, prec: PrecisionConfig,
                              max_seq_len: int, micro_batch_size: int) -> None:
    """FP8 through TE: refuse, before any model is built, layouts whose GEMM operands TE's FP8
    kernels cannot take (they would fail at the first forward on the GPU).

    * ``linear_proj`` (row-parallel) multiplies ``[tokens, H/tp]``: H/tp must be a multiple of
      16 (32 for MXFP8).
    * Every linear quantizes this rank's packed tokens of one micro-batch, ``S × B`` rows, or
      ``S/tp × B`` under sequence parallelism (quantized before the all-gather): a multiple of
      8 (32 for MXFP8).
    """
    fp8 = prec.fp8
    if fp8 is None or fp8.emulate:
        return
    inner, rows = fp8_alignment(fp8.recipe)
    proj_in = m.hidden_size // p.tp
    if m.hidden_size % p.tp == 0 and proj_in % inner:
        ok = [t for t in divisors(m.num_attention_heads)
              if m.hidden_size % t == 0 and (m.hidden_size // t) % inner == 0]
        raise ConfigError(f"model.hidden_size / parallel.tp ({m.hidden_size}/{p.tp} = {proj_in}, "
                          f"the input width of linear_proj) is not a multiple of {inner}, which "
                          f"FP8 ({fp8.recipe}) GEMMs require; use parallel.tp in {ok}.")
    S, B = max_seq_len, micro_batch_size
    shard = p.tp if p.sp else 1
    if S % shard == 0 and (S // shard * B) % rows:
        where = f"data.max_seq_len / parallel.tp × training.micro_batch_size ({S}/{p.tp} × {B}" \
            if p.sp else f"data.max_seq_len × training.micro_batch_size ({S} × {B}"
        good_s = next(s for s in range(S + 1, S + rows * shard + 1)
                      if s % shard == 0 and (s // shard * B) % rows == 0)
        good_b = next(b for b in range(B + 1, B + rows + 1) if (S // shard * b) % rows == 0)
        raise ConfigError(f"{where} = {S // shard * B} tokens per micro-batch) is not a multiple "
                          f"of {rows}, which TE's FP8 ({fp8.recipe}) GEMMs require; set "
                          f"data.max_seq_len: {good_s} or training.micro_batch_size: {good_b}.")


