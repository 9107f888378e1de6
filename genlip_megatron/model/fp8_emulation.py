"""FP8 *emulation* of the transformer's linear layers, for numerics studies without a GPU.

This module does not make anything faster. It reproduces, on any device, the numbers that a
Transformer Engine FP8 GEMM with per-tensor current scaling (TE ``Float8CurrentScaling``)
produces, so that the effect of FP8 on the loss can be studied and tested on CPU:

* every GEMM operand is quantised per tensor: ``amax = max|x|``, ``scale = fp8_max / amax``
  (divided by ``2**margin``, as TE's ``DelayedScaling`` does), ``x_fp8 = cast(x * scale)`` with
  round-to-nearest-even and saturation at ``±fp8_max``; the GEMM sees ``x_fp8 * scale_inv``;
* products are accumulated in FP32, the bias is added in FP32, the output is cast to the
  input's dtype;
* the format follows TE's ``Format``: ``"e4m3"`` quantises everything to E4M3, ``"hybrid"``
  quantises activations and weights to E4M3 and output gradients to E5M2;
* backward: ``dgrad = dY_q @ W_q`` and ``wgrad = dY_q^T @ X_q`` reuse the forward's quantised
  ``X_q``/``W_q`` (TE keeps the FP8 copies for backward); the bias gradient is ``sum(dY)`` in
  FP32 from the unquantised gradient.

What it does not model: delayed scaling's amax history (scales here are always "current"),
MXFP8/blockwise block scales, TE's fused casts/transposes, FP8 attention, and Hopper's reduced
precision "fast accumulation" in the forward GEMM (TE's current-scaling recipe disables it for
dgrad/wgrad only). Weights are scaled per local TP shard; under sequence parallelism the input is
quantised after the all-gather, so all ranks share one input scale (TE reduces the input amax
over the TP group to the same effect).

Which matmul path runs where (probed once per device type and dtype pair, see
:func:`scaled_mm_supported`): with torch 2.13 ``torch._scaled_mm`` runs on CPU for every
E4M3/E5M2 pairing with singleton FP32 scales, any shape and either operand layout, accumulating
in FP32; it is used there and on CUDA GPUs that support it (sm_89+, dims multiples of 16). Where
it is missing or fails (CPU before torch 2.8, :data:`CPU_SCALED_MM_TORCH`), the operands are
dequantised to FP32 and multiplied with ``torch.matmul``, which gives the same numbers up to FP32
summation order; a warning says so once per device type.

The layer classes are drop-in ``ModuleSpec`` classes for megatron-core's
``ColumnParallelLinear``/``RowParallelLinear``: same constructor, parameters, state-dict keys and
tensor-parallel communication; only the local GEMM (megatron's ``_forward_impl`` hook, present in
megatron-core 0.16.1 through 0.20) is replaced. They read their settings from the layer's
``TransformerConfig``: ``fp8_emulation_format`` ("e4m3" | "hybrid"; a field the GenLIP config
subclass adds, default "hybrid"), ``fp8_margin`` and ``fp8_wgrad`` (megatron's own fields).
``config.fp8`` must stay ``None`` for the emulation: setting it turns on megatron's TE-only code
paths (``te_checkpoint`` under recompute, ``get_fp8_context``), see :func:`emulation_config_kwargs`.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

logger = logging.getLogger(__name__)

__all__ = [
    "FP8_FORMATS",
    "Fp8EmulatedColumnParallelLinear",
    "Fp8EmulatedRowParallelLinear",
    "compute_scale",
    "dequantize_fp8",
    "emulation_config_kwargs",
    "fp8_emulated_linear",
    "fp8_layer_numbers",
    "fp8_matmul",
    "fp8_max",
    "quantize_fp8",
    "scaled_matmul",
    "scaled_mm_supported",
]

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2

FP8_FORMATS: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "e4m3": (E4M3, E4M3),    # (activations and weights, output gradients)
    "hybrid": (E4M3, E5M2),
}
"""TE ``Format`` names → (forward dtype, gradient dtype)."""

_FP32_MAX = torch.finfo(torch.float32).max


# ---------------------------------------------------------------------------------------------
# Quantisation
# ---------------------------------------------------------------------------------------------

def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an FP8 dtype (448 for E4M3FN, 57344 for E5M2)."""
    if dtype not in (E4M3, E5M2):
        raise ValueError(f"FP8 dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got "
                         f"{dtype}.")
    return float(torch.finfo(dtype).max)


def compute_scale(amax: torch.Tensor, dtype: torch.dtype = E4M3, *, margin: int = 0,
                  power_of_2: bool = False) -> torch.Tensor:
    """Per-tensor scale from an amax, as TE's ``compute_scale_from_amax``.

    Args:
        amax: FP32 scalar tensor ``[]``, the absolute maximum of the tensor to quantise.
        dtype: target FP8 dtype.
        margin: scale is divided by ``2**margin`` (TE ``DelayedScaling.margin``).
        power_of_2: round the scale down to a power of two (TE ``use_power_2_scales``).

    Returns:
        FP32 scalar ``[]``: ``fp8_max / amax / 2**margin``; 1 when amax is 0, inf or NaN (nothing
        to scale, or the tensor is already broken), FP32 max when the quotient overflows.
    """
    amax = amax.detach().float()
    bad = (amax == 0) | ~torch.isfinite(amax)
    scale = torch.where(bad, torch.ones_like(amax), fp8_max(dtype) / amax)
    scale = torch.clamp(scale, max=_FP32_MAX)       # tiny amax: inf → FP32 max, as TE
    if margin:
        scale = scale / (2.0 ** margin)
    if power_of_2:   # keep only the exponent bits, as TE does (frexp: scale = m * 2**e, m < 1)
        scale = torch.ldexp(torch.ones_like(scale), torch.frexp(scale).exponent - 1)
    return scale


def quantize_fp8(x: torch.Tensor, dtype: torch.dtype = E4M3, *, margin: int = 0,
                 power_of_2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a tensor to FP8 with one current scale for the whole tensor.

    Args:
        x: any-shape floating tensor.
        dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        margin, power_of_2: see :func:`compute_scale`.

    Returns:
        ``(x_fp8, scale_inv)``: ``x_fp8`` has ``x``'s shape and the FP8 dtype; ``scale_inv`` is an
        FP32 scalar ``[]`` with ``x ≈ x_fp8.float() * scale_inv``.
    """
    amax = x.detach().abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
    scale = compute_scale(amax, dtype, margin=margin, power_of_2=power_of_2)
    limit = fp8_max(dtype)
    # The FP32 product then the cast rounds to nearest even; clamp first because E5M2 casts
    # overflow to inf (E4M3FN casts saturate on CPU, but not necessarily elsewhere).
    x_fp8 = (x.detach().float() * scale).clamp(-limit, limit).to(dtype)
    return x_fp8, scale.reciprocal()


def dequantize_fp8(x_fp8: torch.Tensor, scale_inv: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x_fp8 * scale_inv`` in ``dtype`` (same shape as ``x_fp8``)."""
    return (x_fp8.float() * scale_inv).to(dtype)


# ---------------------------------------------------------------------------------------------
# Scaled GEMM
# ---------------------------------------------------------------------------------------------

CPU_SCALED_MM_TORCH = "2.8"
"""First torch release with a CPU kernel for FP8 ``torch._scaled_mm`` (checked in the wheels: 2.7.0
has only ``_scaled_mm_cuda``, 2.8.0 adds ``_scaled_mm_cpu``)."""

_WARNED_FALLBACK: set[str] = set()


def _warn_fallback(device_type: str, a_dtype: torch.dtype, b_dtype: torch.dtype,
                   why: str) -> None:
    """Say once per device type that the emulation takes the slower dequantise path, and why."""
    if device_type in _WARNED_FALLBACK:
        logger.debug("torch._scaled_mm unusable on %s for %s x %s: %s", device_type, a_dtype,
                     b_dtype, why)
        return
    _WARNED_FALLBACK.add(device_type)
    hint = (f" (CPU FP8 _scaled_mm needs torch >= {CPU_SCALED_MM_TORCH})"
            if device_type == "cpu" else "")
    logger.warning("FP8 emulation: torch %s cannot run torch._scaled_mm on %s for %s x %s (%s)%s;"
                   " using dequantise-then-matmul instead: the same numbers up to FP32 summation"
                   " order, only slower.", torch.__version__, device_type, a_dtype, b_dtype, why,
                   hint)


@functools.cache
def scaled_mm_supported(device_type: str, a_dtype: torch.dtype, b_dtype: torch.dtype) -> bool:
    """True when ``torch._scaled_mm`` runs for these FP8 dtypes on this device type and agrees
    with a dequantise-then-matmul on a 16x16 probe (cached)."""
    if not hasattr(torch, "_scaled_mm"):
        _warn_fallback(device_type, a_dtype, b_dtype, "torch has no _scaled_mm")
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(16, 16, generator=gen).to(device_type).to(a_dtype)
        b = torch.randn(16, 16, generator=gen).to(device_type).to(b_dtype)
        sa = torch.tensor(0.5, device=device_type)
        sb = torch.tensor(2.0, device=device_type)
        got = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
        want = (a.float() * sa) @ (b.float() * sb).t()
        ok = torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    except Exception as exc:  # noqa: BLE001 - unsupported device/dtype raises RuntimeError
        _warn_fallback(device_type, a_dtype, b_dtype, f"{type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}")
        return False
    if not ok:
        logger.warning("torch._scaled_mm on %s gives wrong results for %s x %s; using the "
                       "dequantise-then-matmul path.", device_type, a_dtype, b_dtype)
    return ok


def scaled_matmul(a_fp8: torch.Tensor, a_scale_inv: torch.Tensor, b_fp8: torch.Tensor,
                  b_scale_inv: torch.Tensor, out_dtype: torch.dtype = torch.float32
                  ) -> torch.Tensor:
    """``(a_fp8 * a_scale_inv) @ (b_fp8 * b_scale_inv).T`` with FP32 accumulation.

    Args:
        a_fp8: ``[M, K]`` FP8.
        a_scale_inv: FP32 scalar ``[]``.
        b_fp8: ``[N, K]`` FP8 (row-major, i.e. the "TN" layout of TE and cuBLASLt).
        b_scale_inv: FP32 scalar ``[]``.
        out_dtype: output dtype.

    Returns:
        ``[M, N]`` in ``out_dtype``.
    """
    if scaled_mm_supported(a_fp8.device.type, a_fp8.dtype, b_fp8.dtype):
        try:
            return torch._scaled_mm(a_fp8.contiguous(), b_fp8.contiguous().t(),
                                    scale_a=a_scale_inv.float(), scale_b=b_scale_inv.float(),
                                    out_dtype=out_dtype)
        except RuntimeError as exc:  # e.g. CUDA needs dims that are multiples of 16
            logger.debug("torch._scaled_mm refused %s x %s: %s; dequantising", tuple(a_fp8.shape),
                         tuple(b_fp8.shape), exc)
    out = torch.matmul(dequantize_fp8(a_fp8, a_scale_inv), dequantize_fp8(b_fp8, b_scale_inv).t())
    return out.to(out_dtype)


def fp8_matmul(a: torch.Tensor, b: torch.Tensor, *, a_dtype: torch.dtype = E4M3,
               b_dtype: torch.dtype = E4M3, margin: int = 0,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Emulated FP8 ``a @ b.T``: quantise both operands per tensor, scaled GEMM, dequantise.

    Args:
        a: ``[M, K]`` high precision.
        b: ``[N, K]`` high precision.
        a_dtype, b_dtype: FP8 dtypes of the operands.
        margin: scaling margin (see :func:`compute_scale`).
        out_dtype: output dtype, default ``a.dtype``.

    Returns:
        ``[M, N]`` in ``out_dtype``.
    """
    a_q, a_si = quantize_fp8(a, a_dtype, margin=margin)
    b_q, b_si = quantize_fp8(b, b_dtype, margin=margin)
    return scaled_matmul(a_q, a_si, b_q, b_si, out_dtype or a.dtype)


# ---------------------------------------------------------------------------------------------
# Autograd function (local GEMM plus megatron's TP/SP communication)
# ---------------------------------------------------------------------------------------------

def _gather_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather ``[s, ...]`` shards into ``[s * tp, ...]`` (any device, unlike megatron's)."""
    out = torch.empty((x.shape[0] * group.size(), *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    """Sum ``[s * tp, ...]`` over the group and keep this rank's ``[s, ...]`` shard."""
    out = torch.empty((x.shape[0] // group.size(), *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


class _Fp8EmulatedLinear(torch.autograd.Function):
    """``Y = X W^T + b`` with emulated FP8 GEMMs; see the module docstring for the numerics.

    Communication mirrors megatron's ``LinearWithGradAccumulationAndAsyncCommunication``:
    with ``sequence_parallel`` the input is all-gathered along dim 0 in forward and dgrad is
    reduce-scattered in backward; with ``allreduce_dgrad`` dgrad is all-reduced.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, fmt, margin, fp8_wgrad, sequence_parallel,
                allreduce_dgrad, tp_group):
        fwd_dtype, grad_dtype = FP8_FORMATS[fmt]
        total_x = _gather_first_dim(x, tp_group) if sequence_parallel else x
        x2d = total_x.reshape(-1, total_x.shape[-1])                        # [M, K]
        x_q, x_si = quantize_fp8(x2d, fwd_dtype, margin=margin)
        w_q, w_si = quantize_fp8(weight, fwd_dtype, margin=margin)          # [N, K]
        out = scaled_matmul(x_q, x_si, w_q, w_si, torch.float32)            # [M, N]
        if bias is not None:
            out = out + bias.float()
        ctx.save_for_backward(x_q, x_si, w_q, w_si, None if fp8_wgrad else x2d)
        ctx.meta = (total_x.shape, x.dtype, weight.dtype, bias is not None, grad_dtype,
                    margin, fp8_wgrad, sequence_parallel, allreduce_dgrad, tp_group)
        return out.to(x.dtype).reshape(*total_x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x_q, x_si, w_q, w_si, x_hp = ctx.saved_tensors
        (total_shape, x_dtype, w_dtype, has_bias, grad_dtype, margin, fp8_wgrad,
         sequence_parallel, allreduce_dgrad, tp_group) = ctx.meta
        dy = grad_out.reshape(-1, grad_out.shape[-1])                       # [M, N]
        dy_q, dy_si = quantize_fp8(dy, grad_dtype, margin=margin)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # dgrad [M, K] = dY_q [M, N] @ W_q [N, K]; scaled_matmul takes the second operand
            # as [K, N] (TE computes this GEMM on W's transposed FP8 copy).
            grad_x = scaled_matmul(dy_q, dy_si, w_q.t().contiguous(), w_si, x_dtype)
            grad_x = grad_x.reshape(total_shape)
            if sequence_parallel:
                grad_x = _reduce_scatter_first_dim(grad_x, tp_group)
            elif allreduce_dgrad:
                dist.all_reduce(grad_x, group=tp_group)
        if ctx.needs_input_grad[1]:
            if fp8_wgrad:   # wgrad [N, K] = dY_q^T [N, M] @ X_q [M, K]
                grad_w = scaled_matmul(dy_q.t().contiguous(), dy_si, x_q.t().contiguous(), x_si,
                                       w_dtype)
            else:           # TransformerConfig.fp8_wgrad=False: wgrad in high precision
                grad_w = (dy.float().t() @ x_hp.float()).to(w_dtype)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = dy.float().sum(dim=0).to(w_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def fp8_emulated_linear(x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None, *, fp8_format: str = "hybrid",
                        margin: int = 0, fp8_wgrad: bool = True, sequence_parallel: bool = False,
                        allreduce_dgrad: bool = False, tp_group=None) -> torch.Tensor:
    """Emulated-FP8 ``x @ weight.T + bias`` with autograd (the functional form of the layers).

    Args:
        x: ``[S, B, K]`` (or any ``[..., K]``); with ``sequence_parallel`` this rank's sequence
            shard ``[S / tp, B, K]``.
        weight: ``[N, K]``.
        bias: ``[N]`` or None; added in FP32 after the GEMM.
        fp8_format: "e4m3" or "hybrid" (E5M2 output gradients).
        margin: scaling margin (see :func:`compute_scale`).
        fp8_wgrad: quantise the weight-gradient GEMM too (megatron ``fp8_wgrad``).
        sequence_parallel: all-gather ``x`` along dim 0 / reduce-scatter its gradient.
        allreduce_dgrad: all-reduce the input gradient over ``tp_group``.
        tp_group: tensor-parallel process group (needed only for the two options above).

    Returns:
        ``[S, B, N]`` in ``x.dtype``; under sequence parallelism ``S`` is the full (gathered) length.
    """
    if fp8_format not in FP8_FORMATS:
        raise ValueError(f"precision.fp8.format ({fp8_format!r}) must be one of "
                         f"{sorted(FP8_FORMATS)}.")
    if sequence_parallel and allreduce_dgrad:
        raise ValueError("sequence_parallel and allreduce_dgrad cannot both be set (megatron "
                         "reduce-scatters the input gradient under sequence parallelism).")
    if (sequence_parallel or allreduce_dgrad) and tp_group is None:
        raise ValueError("sequence_parallel/allreduce_dgrad need the tensor-parallel tp_group.")
    return _Fp8EmulatedLinear.apply(x, weight, bias, fp8_format, int(margin), bool(fp8_wgrad),
                                    bool(sequence_parallel), bool(allreduce_dgrad), tp_group)


# ---------------------------------------------------------------------------------------------
# megatron-core drop-in layers
# ---------------------------------------------------------------------------------------------

def _settings_from_config(config) -> tuple[str, int, bool]:
    """(format, margin, fp8_wgrad) from a TransformerConfig, with the defaults of Fp8Config."""
    fmt = getattr(config, "fp8_emulation_format", None) or "hybrid"
    if fmt not in FP8_FORMATS:
        raise ValueError(f"TransformerConfig.fp8_emulation_format ({fmt!r}, from "
                         f"precision.fp8.format) must be one of {sorted(FP8_FORMATS)}.")
    return fmt, int(getattr(config, "fp8_margin", 0) or 0), bool(getattr(config, "fp8_wgrad", True))


def _emulated_forward_impl(module, input, weight, bias=None, gradient_accumulation_fusion=False,
                           allreduce_dgrad=False, sequence_parallel=False,
                           grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None,
                           gtp_remat_size=1, **unknown: Any) -> torch.Tensor:
    """Replacement for megatron's ``_forward_impl`` (same keyword arguments, 0.16–0.20).

    ``gradient_accumulation_fusion`` is ignored on purpose: the weight gradient goes back through
    autograd and megatron's DDP hook adds ``param.grad`` to ``main_grad`` (the fused path is only
    a kernel-level optimisation that needs apex).
    """
    if unknown:
        raise RuntimeError(f"{type(module).__name__}._forward_impl got arguments it does not "
                           f"know ({sorted(unknown)}); this megatron-core version changed the "
                           "hook, update genlip_megatron/model/fp8_emulation.py.")
    if grad_output_buffer is not None:
        raise RuntimeError("The FP8 emulation does not support defer_embedding_wgrad_compute; "
                           "set it to False (it only concerns the output layer).")
    if gtp_remat_size != 1:
        raise RuntimeError(f"The FP8 emulation does not support GTP-sharded weights "
                           f"(gtp_remat_size={gtp_remat_size}); disable GTP remat.")
    fmt, margin, fp8_wgrad = _settings_from_config(module.config)
    return fp8_emulated_linear(input, weight, bias, fp8_format=fmt, margin=margin,
                               fp8_wgrad=fp8_wgrad, sequence_parallel=sequence_parallel,
                               allreduce_dgrad=allreduce_dgrad, tp_group=tp_group)


class Fp8EmulatedColumnParallelLinear(ColumnParallelLinear):
    """megatron-core ``ColumnParallelLinear`` whose local GEMM runs in emulated FP8.

    Same constructor, parameters, state-dict keys, TP/SP communication and ``skip_bias_add``
    behaviour as the parent; forward input ``[S, B, K]`` → ``([S, B, N / tp], bias or None)``.
    Settings come from ``config.fp8_emulation_format``, ``config.fp8_margin`` and
    ``config.fp8_wgrad`` (module docstring).
    """

    def _forward_impl(self, input, weight, *args, **kwargs):
        if args:
            raise RuntimeError("megatron-core passed positional arguments to _forward_impl; "
                               "update genlip_megatron/model/fp8_emulation.py.")
        return _emulated_forward_impl(self, input, weight, **kwargs)


class Fp8EmulatedRowParallelLinear(RowParallelLinear):
    """megatron-core ``RowParallelLinear`` whose local GEMM runs in emulated FP8.

    Same constructor, parameters, state-dict keys, TP/SP communication and ``skip_bias_add``
    behaviour as the parent; forward input ``[S, B, K / tp]`` → ``([S, B, N], bias or None)``.
    The bias is added after the TP reduction, in the input dtype, exactly as in the parent.
    """

    def _forward_impl(self, input, weight, *args, **kwargs):
        if args:
            raise RuntimeError("megatron-core passed positional arguments to _forward_impl; "
                               "update genlip_megatron/model/fp8_emulation.py.")
        return _emulated_forward_impl(self, input, weight, **kwargs)


# ---------------------------------------------------------------------------------------------
# Config helpers
# ---------------------------------------------------------------------------------------------

def fp8_layer_numbers(num_layers: int, fp8_cfg) -> set[int]:
    """1-based global numbers of the transformer layers that run their linears in FP8.

    Mirrors megatron-core's ``fp8_utils.is_first_last_bf16_layer`` (0-based ``layer_no`` is BF16
    when ``layer_no < num_layers_at_start_in_bf16`` or ``layer_no >= num_layers -
    num_layers_at_end_in_bf16``, only with ``first_last_layers_bf16``), so the emulated spec
    keeps exactly the layers in BF16 that TE's ``get_fp8_context`` would.

    Args:
        num_layers: total transformer layers (all pipeline stages).
        fp8_cfg: ``Fp8Config`` or None (no FP8: empty set).

    Returns:
        Set of layer numbers in ``1..num_layers``.
    """
    if fp8_cfg is None:
        return set()
    start = fp8_cfg.num_layers_at_start_in_bf16 if fp8_cfg.first_last_layers_bf16 else 0
    end = fp8_cfg.num_layers_at_end_in_bf16 if fp8_cfg.first_last_layers_bf16 else 0
    if start < 0 or end < 0:
        raise ValueError(f"precision.fp8.num_layers_at_start_in_bf16 ({start}) and "
                         f"num_layers_at_end_in_bf16 ({end}) must be >= 0.")
    layers = {n + 1 for n in range(num_layers) if start <= n < num_layers - end}
    if not layers and num_layers:
        logger.warning("precision.fp8 keeps all %d layers in BF16 (start %d, end %d): no layer "
                       "runs in FP8; lower num_layers_at_*_in_bf16 or set first_last_layers_bf16: "
                       "false.", num_layers, start, end)
    return layers


def emulation_config_kwargs(fp8_cfg) -> dict:
    """TransformerConfig fields that configure the emulated layers (``config.fp8`` stays None).

    ``fp8_emulation_format`` is not a megatron field: the GenLIP TransformerConfig subclass must
    declare ``fp8_emulation_format: str | None = None``. ``fp8_margin`` is megatron's own.
    """
    return {"fp8_emulation_format": fp8_cfg.format, "fp8_margin": fp8_cfg.margin}
