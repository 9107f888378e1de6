"""SwiGLU on the fused ``linear_fc1`` output without the split copies (CPU path).

GenLIP's MLP is ``fc2(silu(gate_fc(x)) · fc1(x))`` with ``linear_fc1 = [gate_fc; fc1]``.
megatron's unfused GLU (``MLP.forward``, ``bias_activation_fusion`` off) chunks the ``[..., 2F]``
output, adds ``glu_linear_offset`` (0 for GenLIP: a full pass that changes nothing) and lets
autograd differentiate ``silu(a) · b``: backward makes the two ``[..., F]`` halves of the
gradient separately and concatenates them (one more pass over ``[..., 2F]``).
:class:`SwiGLU` computes the same values (bit for bit: the same ``silu``, products and
``silu_backward``) and writes both gradient halves straight into one ``[..., 2F]`` tensor. It
keeps what autograd keeps (the fc1 output and ``silu(a)``).

It plugs into megatron's MLP through its activation-module slot (``MLPSubmodules.activation_func``,
used when ``config.use_te_activation_func`` is set: the MLP then applies the module to the
whole fc1 output); ``build_transformer_config`` enables it with ``fold_bias_into_gemm`` on the
CPU path, where the fc1 bias is already inside the GEMM. The GPU paths keep megatron's fused
bias-SwiGLU (local) or Transformer Engine's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

__all__ = ["SwiGLU", "swiglu"]


class _SwiGLUFunction(torch.autograd.Function):
    """``y [..., 2F] → silu(y[..., :F]) · y[..., F:]``; backward into one ``[..., 2F]`` buffer."""

    @staticmethod
    def forward(ctx: Any, y: Tensor) -> Tensor:
        a, b = y.chunk(2, dim=-1)
        s = F.silu(a)
        ctx.save_for_backward(y, s)
        return s * b

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        y, s = ctx.saved_tensors
        a, b = y.chunk(2, dim=-1)
        grad_y = torch.empty_like(y, memory_format=torch.contiguous_format)
        grad_a, grad_b = grad_y.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad * b, a, grad_input=grad_a)
        torch.mul(grad, s, out=grad_b)
        return grad_y


def swiglu(y: Tensor) -> Tensor:
    """``silu(gate) · linear`` of ``y = [gate | linear]`` along the last dim (``[..., 2F]``)."""
    return _SwiGLUFunction.apply(y)


class SwiGLU(MegatronModule):
    """megatron MLP activation module (``MLPSubmodules.activation_func``): :func:`swiglu`.

    Raises:
        ValueError: the config asks for something other than GenLIP's plain SwiGLU
            (``activation_func`` not SiLU, no gated linear unit, a GLU offset or clamp).
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config=config)
        if (config.activation_func is not F.silu or not config.gated_linear_unit
                or getattr(config, "glu_linear_offset", 0.0)
                or getattr(config, "activation_func_clamp_value", None) is not None):
            raise ValueError("the SwiGLU activation module computes silu(gate) · linear only: "
                             "set activation_func=silu, gated_linear_unit=True, no GLU offset "
                             "or clamp (or leave use_te_activation_func off).")

    def forward(self, y: Tensor) -> Tensor:
        """``[S, B, 2F/tp] → [S, B, F/tp]``."""
        return swiglu(y)
