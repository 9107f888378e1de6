"""CPU stand-in for megatron's fused weight-gradient accumulation (``wgrad``).

Upstream: ``megatron.core.tensor_parallel.layers.LinearWithGradAccumulationAndAsyncCommunication
.backward`` with ``config.gradient_accumulation_fusion`` calls the CUDA extension
``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(input, grad_output, weight.main_grad)``
(Apex), which accumulates the weight gradient straight into megatron DDP's fp32 ``main_grad``
buffer. Without it (every CPU run) the linear returns a fresh ``param.grad`` that DDP's hook then
adds into ``main_grad``: one more allocation and a read-modify-write pass over every weight
gradient per micro-batch — at L/16 width and 1024-token rows ≈ 5 % of a CPU step.

:func:`install_cpu_wgrad_accumulation` provides the extension's two functions as ``addmm_`` into
``main_grad`` and marks the fusion available, so the trainer (whose linears always sit in
megatron DDP, hence have ``main_grad``) can turn ``gradient_accumulation_fusion`` on for CPU.
Bare models without DDP must keep it off (megatron then dereferences a missing ``main_grad``).
TODO(upstream): drop when megatron-core ships a non-CUDA fallback for the fused wgrad path.
"""

from __future__ import annotations

import torch

from genlip_megatron.compat._patching import PatchSet

__all__ = ["CpuWgradAccum", "install_cpu_wgrad_accumulation", "cpu_wgrad_accumulation_ready"]


class CpuWgradAccum:
    """``fused_weight_gradient_mlp_cuda`` on CPU: ``main_grad += grad_output.T @ input``."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor,
                              main_grad: torch.Tensor) -> None:
        g, x = grad_output.reshape(-1, grad_output.shape[-1]), \
            total_input.reshape(-1, total_input.shape[-1])
        if g.dtype == x.dtype == main_grad.dtype:
            main_grad.addmm_(g.t(), x)
        else:                       # 16-bit activations, fp32 buffer: as the unfused path does
            main_grad.add_(torch.mm(g.t(), x))

    wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32


def install_cpu_wgrad_accumulation(patches: PatchSet) -> None:
    """Expose :class:`CpuWgradAccum` as megatron's fused-wgrad extension."""
    from megatron.core.tensor_parallel import layers

    patches.setattr(layers, "fused_weight_gradient_mlp_cuda", CpuWgradAccum, create=True)
    patches.setattr(layers, "_grad_accum_fusion_available", True)


def cpu_wgrad_accumulation_ready() -> bool:
    """True when megatron's linears would use :class:`CpuWgradAccum` (CPU compat applied)."""
    from megatron.core.tensor_parallel import layers

    return getattr(layers, "fused_weight_gradient_mlp_cuda", None) is CpuWgradAccum
