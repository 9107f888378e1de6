"""The ``wgrad`` group: megatron's fused weight-gradient accumulation on CPU."""

from __future__ import annotations

import pytest
import torch

from genlip_megatron.compat import cpu_compat_disabled
from genlip_megatron.compat.wgrad import CpuWgradAccum, cpu_wgrad_accumulation_ready


def _linear(mp_state):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from genlip_megatron.config import ParallelConfig, PrecisionConfig, decode_variant
    from genlip_megatron.model.transformer_config import build_transformer_config

    cfg = build_transformer_config(decode_variant("tiny"), ParallelConfig(),
                                   PrecisionConfig(params_dtype="fp32"), has_cuda=False)
    cfg.gradient_accumulation_fusion = True
    return ColumnParallelLinear(8, 6, config=cfg, init_method=torch.nn.init.normal_, bias=True,
                                gather_output=False)


def test_megatron_refuses_fusion_without_the_group(mp_state):
    with cpu_compat_disabled("wgrad"):
        assert not cpu_wgrad_accumulation_ready()
        with pytest.raises(RuntimeError, match="fused_weight_gradient_mlp_cuda"):
            _linear(mp_state)
    assert cpu_wgrad_accumulation_ready()


def test_weight_gradient_accumulates_into_main_grad(mp_state):
    """Two backward passes: main_grad = start + Σ dY_iᵀ X_i, param.grad stays unused."""
    layer = _linear(mp_state)
    start = torch.randn(6, 8)
    layer.weight.main_grad = start.clone()
    layer.weight.grad_added_to_main_grad = False          # what megatron DDP sets up
    expected = start.clone()
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(5, 2, 8, generator=gen)
        dy = torch.randn(5, 2, 6, generator=gen)
        out, _ = layer(x)
        out.backward(dy)
        expected += dy.reshape(-1, 6).t() @ x.reshape(-1, 8)
    torch.testing.assert_close(layer.weight.main_grad, expected)
    assert layer.weight.grad_added_to_main_grad


def test_mixed_precision_falls_back_to_mm_then_add():
    main = torch.zeros(3, 4)
    x, g = torch.randn(7, 4).bfloat16(), torch.randn(7, 3).bfloat16()
    CpuWgradAccum.wgrad_gemm_accum_fp32(x, g, main)
    torch.testing.assert_close(main, (g.t() @ x).float())
