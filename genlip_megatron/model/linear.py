"""megatron's local parallel linears with the bias added inside the GEMM (``torch.addmm``).

megatron's ``LinearWithGradAccumulationAndAsyncCommunication`` computes ``matmul(x, W.t())`` and
then ``output + bias``: a second pass over every linear's output (and, for the linears built
with ``skip_bias_add=True``, one more pass where the caller adds the returned bias). On the CPU
path nothing fuses that add, so at L/16 width it is ≈ 2 % of a training step
(docs/performance.md, "The step on the CPU path"). :class:`BiasGemmColumnParallelLinear` and
:class:`BiasGemmRowParallelLinear` are megatron's ``ColumnParallelLinear`` /
``RowParallelLinear`` (same constructor, parameters, checkpoint keys, TP sharding) whose
matmul is :class:`_BiasGemm`: ``addmm(bias, x, W.t())`` forward; backward as megatron's
(input gradient ``g @ W``, all-reduced over TP when megatron would; weight gradient
accumulated into DDP's ``main_grad`` through megatron's fused-wgrad hook when
``gradient_accumulation_fusion`` is on; bias gradient ``g.sum(0)``).

Active only with ``config.fold_bias_into_gemm`` (``build_transformer_config`` sets it on the
CPU path). Otherwise, and in the cases the fast path does not cover (sequence parallelism,
deferred embedding wgrad, frozen weights, newer megatron keyword arguments), megatron's own
implementation runs unchanged. A row-parallel linear folds its bias only at TP = 1: with TP > 1
megatron adds it once after the all-reduce of the partial outputs.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import layers as mcore_layers
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.utils import get_pg_size
from torch import Tensor

__all__ = ["BiasGemmColumnParallelLinear", "BiasGemmRowParallelLinear", "bias_gemm_linear"]


class _BiasGemm(torch.autograd.Function):
    """``x [..., in] → addmm(bias, x, W.t()) [..., out]`` with megatron's backward contract."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor], wgrad_fusion: bool,
                allreduce_dgrad: bool, tp_group: Any) -> Tensor:
        ctx.save_for_backward(x, weight)
        # as megatron: the fused path needs DDP's main_grad (a bare model has none)
        ctx.use_bias = bias is not None
        ctx.wgrad_fusion = wgrad_fusion and hasattr(weight, "main_grad")
        # kept on ctx, not saved, as megatron's linear does: a saved-tensor hook (activation
        # offload, the benchmarks' memory meter) unpacks a plain tensor without main_grad
        ctx.main_grad = weight.main_grad if ctx.wgrad_fusion else None
        ctx.allreduce_dgrad, ctx.tp_group = allreduce_dgrad, tp_group
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2.mm(weight.t())
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor):
        x, weight = ctx.saved_tensors
        if ctx.wgrad_fusion:
            weight.main_grad = ctx.main_grad
        g = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = g.mm(weight).view(x.shape)
        handle = None
        if ctx.allreduce_dgrad:   # column-parallel input is replicated: sum its TP partials
            handle = dist.all_reduce(grad_input, group=ctx.tp_group, async_op=True)
        x2 = x.reshape(-1, x.shape[-1])
        grad_weight = _weight_grad(weight, g, x2, ctx.wgrad_fusion)
        grad_bias = g.sum(dim=0) if ctx.use_bias else None
        if handle is not None:
            handle.wait()
        return grad_input, grad_weight, grad_bias, None, None, None


def _weight_grad(weight: Tensor, g: Tensor, x2: Tensor, wgrad_fusion: bool) -> Optional[Tensor]:
    """``g.t() @ x``, or accumulated straight into ``weight.main_grad`` as megatron does.

    With the fusion the returned tensor is megatron's placeholder: DDP's hook sees
    ``grad_added_to_main_grad`` and discards it (``empty``, or zeros when the weight asks for
    ``zero_out_wgrad``); without DDP there is no hook and no placeholder.
    """
    if not wgrad_fusion:
        return g.t().mm(x2)
    main_grad = weight.main_grad
    if main_grad.dtype == torch.float32:
        mcore_layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(x2, g, main_grad)
    else:
        mcore_layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp16(x2, g, main_grad)
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    return make(main_grad.shape, dtype=x2.dtype, device=x2.device)


def bias_gemm_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                     gradient_accumulation_fusion: bool = False, allreduce_dgrad: bool = False,
                     tp_group: Any = None) -> Tensor:
    """``x @ weight.t() + bias`` in one ``addmm``, with megatron's linear backward.

    Args:
        x: ``[..., in]`` (e.g. ``[S, B, H]``).
        weight: ``[out, in]``; with ``gradient_accumulation_fusion`` it must carry DDP's
            ``main_grad``.
        bias: ``[out]`` or None.
        allreduce_dgrad: all-reduce the input gradient over ``tp_group`` (column-parallel
            linear with TP > 1 and no sequence parallelism).

    Returns:
        ``[..., out]``.
    """
    return _BiasGemm.apply(x, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                           tp_group)


def _fast_path(weight: Tensor, sequence_parallel: bool, grad_output_buffer: Any,
               extra: dict) -> bool:
    """The cases :func:`bias_gemm_linear` reproduces exactly (else megatron's own path runs).

    ``extra``: keyword arguments of newer megatron-core releases; only their inactive values
    qualify (megatron-core 0.19's ``gtp_remat_size`` is 1 unless the weight is GTP-sharded).
    """
    inactive = {"gtp_remat_size": (None, 1)}
    return (weight.requires_grad and not sequence_parallel and grad_output_buffer is None
            and all(v in inactive.get(k, (None,)) for k, v in extra.items()))


class BiasGemmColumnParallelLinear(ColumnParallelLinear):
    """megatron ``ColumnParallelLinear`` whose bias goes into the GEMM (``fold_bias_into_gemm``).

    Each rank's bias shard belongs to its own output columns, so folding is exact at any TP:
    the layer keeps the bias (``skip_bias_add`` off) and returns ``(output, None)``; megatron's
    callers (attention, MLP) then have no bias left to add.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fold_bias = bool(getattr(self.config, "fold_bias_into_gemm", False))
        if self.fold_bias:
            self.skip_bias_add = False

    def _forward_impl(self, input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                      gradient_accumulation_fusion: bool = False, allreduce_dgrad: bool = False,
                      sequence_parallel: bool = False, grad_output_buffer: Any = None,
                      wgrad_deferral_limit: Any = None, tp_group: Any = None,
                      **extra: Any) -> Tensor:
        if self.fold_bias and _fast_path(weight, sequence_parallel, grad_output_buffer, extra):
            return bias_gemm_linear(input, weight, bias, gradient_accumulation_fusion,
                                    allreduce_dgrad, tp_group)
        return super()._forward_impl(
            input, weight, bias=bias, gradient_accumulation_fusion=gradient_accumulation_fusion,
            allreduce_dgrad=allreduce_dgrad, sequence_parallel=sequence_parallel,
            grad_output_buffer=grad_output_buffer, wgrad_deferral_limit=wgrad_deferral_limit,
            tp_group=tp_group, **extra)


class BiasGemmRowParallelLinear(RowParallelLinear):
    """megatron ``RowParallelLinear`` whose bias goes into the GEMM at TP = 1.

    megatron adds a row-parallel bias after the TP all-reduce (or returns it for the caller to
    add, ``skip_bias_add``); with a single TP rank there is no reduction, so the bias joins the
    GEMM and ``(output, None)`` is returned. TP > 1, sequence parallelism and expert layers keep
    megatron's forward.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fold_bias = (bool(getattr(self.config, "fold_bias_into_gemm", False))
                          and self.bias is not None and not self.sequence_parallel
                          and not self.explicit_expert_comm and get_pg_size(self.tp_group) == 1
                          and getattr(self, "gtp_remat_size", 1) == 1)   # 0.19: GTP-sharded

    def forward(self, input_: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """``[S, B, in] → ([S, B, out], None)`` when folding, else megatron's forward."""
        if not (self.fold_bias and _fast_path(self.weight, False, None, {})):
            return super().forward(input_)
        output = bias_gemm_linear(input_, self.weight, self.bias,
                                  self.gradient_accumulation_fusion)
        return output, None
