"""Fixtures for single-process model tests: a gloo world of size 1 and megatron parallel state.

Tests here build GenLIP models with megatron-core's local (CPU) path, which needs the CPU compat
layer and an initialised model-parallel state even with TP = PP = 1.
"""

from __future__ import annotations

import dataclasses

import pytest

from genlip_megatron.compat import apply_cpu_compat

# Before any test module imports megatron: on megatron-core >= 0.19 without triton the
# triton_stub group must precede the first import of megatron's pipeline code.
apply_cpu_compat()


@pytest.fixture
def make_config():
    """Factory for tiny-preset configs (see :func:`tiny_config`)."""
    return tiny_config


def tiny_config(params_dtype: str = "fp32", init_seed: int = 1234, parallel=None, precision=None,
                **model_overrides):
    """``GenLIPTransformerConfig`` of the "tiny" preset (H 64, T 48, 2 layers, 4 heads)."""
    from genlip_megatron.config import ParallelConfig, PrecisionConfig, decode_variant
    from genlip_megatron.model.transformer_config import build_transformer_config

    model = dataclasses.replace(decode_variant("tiny"), **model_overrides)
    return build_transformer_config(model, parallel or ParallelConfig(),
                                    precision or PrecisionConfig(params_dtype=params_dtype),
                                    init_seed=init_seed, has_cuda=False)
