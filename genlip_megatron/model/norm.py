"""torch LayerNorm for megatron specs that also works under sequence parallelism.

megatron-core's local spec falls back to ``WrappedTorchNorm`` when Apex is missing (always on
PyPI installs), and that class asserts ``not config.sequence_parallel``. Nothing in a LayerNorm
forward depends on SP: each TP rank normalises its own sequence chunk with replicated weights.
Only the gradients differ: each rank's weight/bias gradient covers its chunk only, so the params
carry ``sequence_parallel=True`` and megatron's ``finalize_model_grads``
(``_allreduce_non_tensor_model_parallel_grads``) sums them over the TP group.

This is a layer, not a patch of upstream code, so it lives in ``model/`` (the Transformer Engine
spec uses ``TENorm`` / fused LayerNorm-linear instead).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["GenLIPLayerNorm", "mark_sequence_parallel"]


def mark_sequence_parallel(module: torch.nn.Module, enabled: bool) -> None:
    """Tag every parameter of ``module`` with ``sequence_parallel=enabled``.

    Use for replicated parameters that only see the local sequence chunk under SP (norms,
    LayerScale, the output projection): megatron all-reduces their grads over TP when tagged.
    """
    for param in module.parameters():
        setattr(param, "sequence_parallel", enabled)


class GenLIPLayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` with megatron's norm-builder signature; allows SP.

    Args:
        config: megatron ``TransformerConfig`` (``normalization`` must be "LayerNorm";
            ``params_dtype`` and ``sequence_parallel`` are read).
        hidden_size: normalised width H.
        eps: epsilon (GenLIP: ``layernorm_epsilon`` = 1e-6).
        kwargs: other megatron norm arguments (``persist_layer_norm``, ...), accepted and unused.

    Forward: ``[S, B, H]`` (``[S/tp, B, H]`` under SP) → same shape.
    """

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **kwargs: Any) -> None:
        if config.normalization != "LayerNorm":
            raise ValueError(f"GenLIPLayerNorm builds LayerNorm, but config.normalization is "
                             f"{config.normalization!r}; GenLIP uses normalization='LayerNorm'.")
        if getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError("layernorm_zero_centered_gamma is not supported by GenLIPLayerNorm "
                             "(the reference LayerNorm has weight 1, bias 0).")
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        mark_sequence_parallel(self, bool(config.sequence_parallel))
