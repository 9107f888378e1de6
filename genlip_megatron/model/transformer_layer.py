"""LayerScale + DropPath residual branches, and the GenLIP TransformerLayer that hosts them.

Reference block (docs/reference-architecture.md): ``h = h + drop_path(ls1 · attn(ln1(h)))`` and
``h = h + drop_path(ls2 · mlp(ln2(h)))``. megatron-core's ``TransformerLayer`` ends each branch
with a "bias-dropout-add" slot called as ``bda(training, fused)(out_with_bias, residual, p)``;
:class:`LayerScaleDropPathAdd` fills both slots with ``residual + drop_path(ls · (out + bias))``.

megatron builds those slots without the config, so :class:`GenLIPTransformerLayer` rebuilds them
with it; nothing else of ``TransformerLayer`` is overridden.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.identity_op import IdentityFuncOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import Tensor

from genlip_megatron.model.norm import mark_sequence_parallel

__all__ = ["DROP_PATH_RNG_TRACKER_NAME", "drop_path", "DropPath", "LayerScaleDropPathAdd",
           "GenLIPTransformerLayer"]

DROP_PATH_RNG_TRACKER_NAME = "genlip-drop-path"
"""Optional megatron RNG-tracker state for DropPath (see :class:`DropPath`)."""


def drop_path(x: Tensor, rate: float, training: bool, batch_dim: int = 1) -> Tensor:
    """timm DropPath (``scale_by_keep=True``): zero whole samples along ``batch_dim``.

    Args:
        x: activations, e.g. ``[S, B, H]`` (one "sample" = one packed row).
        rate: drop probability.
        training: no-op when False.
        batch_dim: the dimension whose entries are kept or dropped together.

    Returns:
        ``x · mask / (1 - rate)`` with ``mask ~ Bernoulli(1 - rate)`` per row.
    """
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    shape = [1] * x.dim()
    shape[batch_dim] = x.shape[batch_dim]
    mask = x.new_empty(shape).bernoulli_(keep)
    return x * mask.div_(keep)


def _drop_path_rng_context():
    """RNG context that makes the same DropPath decision on every TP rank.

    Under sequence parallelism megatron runs the whole block inside the tracker's
    *tensor-parallel* RNG state (different per TP rank), so the default generator cannot be used
    there. Preference: the tracker state :data:`DROP_PATH_RNG_TRACKER_NAME` when the trainer
    added one (e.g. seeded per data-parallel rank, identical across TP ranks), else megatron's
    "data-parallel-rng" state (same seed on every TP and DP rank of a pipeline stage), else the
    current default generator (single-process use without megatron seeding).
    """
    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = tracker.get_states() if hasattr(tracker, "get_states") else {}
    for name in (DROP_PATH_RNG_TRACKER_NAME,
                 tensor_parallel.random.get_data_parallel_rng_tracker_name()):
        if name in states:
            return tracker.fork(name)
    return contextlib.nullcontext()


class DropPath(torch.nn.Module):
    """Stochastic depth over packed rows (dim 1 of ``[S, B, H]``), same rate in every layer."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: Tensor, training: Optional[bool] = None) -> Tensor:
        """``[S, B, H]`` → same shape; rows dropped with probability ``rate`` when training.

        ``training`` overrides the module's own flag (megatron passes the layer's).
        """
        training = self.training if training is None else training
        if self.rate == 0.0 or not training:
            return x
        with _drop_path_rng_context():
            return drop_path(x, self.rate, True, batch_dim=1)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class LayerScaleDropPathAdd(MegatronModule):
    """``residual + drop_path(layer_scale · (x + bias))``: megatron's bias-dropout-add slot.

    Parameter ``layer_scale`` ``[H]`` (init ``config.layerscale_init``), replicated over TP; under
    SP its gradient is partial per rank, so it is tagged ``sequence_parallel``.
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config=config)
        self.layer_scale = torch.nn.Parameter(
            torch.full((config.hidden_size,), float(config.layerscale_init),
                       dtype=config.params_dtype))
        mark_sequence_parallel(self, bool(config.sequence_parallel))
        self.drop_path = DropPath(config.drop_path_rate)

    def forward(self, training: bool, fused: bool) -> Callable[..., Tensor]:
        """megatron's protocol: ``bda(training, fused)`` returns the residual function.

        The returned callable takes ``((x [S, B, H], bias [H] | None), residual [S, B, H],
        dropout_p)`` and returns ``[S, B, H]``. ``fused`` is ignored (no fused kernel);
        ``dropout_p`` is megatron's ``hidden_dropout`` (0 for GenLIP), applied before DropPath.
        """
        return functools.partial(self._residual_add, training)

    def _residual_add(self, training: bool, x_with_bias: tuple[Tensor, Optional[Tensor]],
                      residual: Tensor, prob: float) -> Tensor:
        x, bias = x_with_bias
        if bias is not None:
            x = x + bias
        if prob == 0.0 and not (training and self.drop_path.rate > 0.0) \
                and residual.dtype == x.dtype:
            # residual + ls·x in one kernel: saves two passes over [S, B, H] per branch
            return torch.addcmul(residual, x, self.layer_scale)
        x = x * self.layer_scale
        if prob > 0.0:
            x = torch.nn.functional.dropout(x, p=prob, training=training)
        x = self.drop_path(x, training=training)
        return residual.to(x.dtype) + x


class GenLIPTransformerLayer(TransformerLayer):
    """megatron ``TransformerLayer`` whose two bias-dropout-add slots are built with the config.

    Same constructor as ``TransformerLayer`` (``config, submodules, layer_number, ...``; extra
    keyword arguments of newer megatron-core versions pass through). The ``self_attn_bda`` /
    ``mlp_bda`` specs (e.g. :class:`LayerScaleDropPathAdd`) receive ``config=``.
    """

    def __init__(self, config: Any, submodules: Any, *args: Any, **kwargs: Any) -> None:
        placeholder = dataclasses.replace(submodules, self_attn_bda=IdentityFuncOp,
                                          mlp_bda=IdentityFuncOp)
        super().__init__(config, placeholder, *args, **kwargs)
        self.submodules_config = submodules
        for name, spec in (("self_attn_bda", submodules.self_attn_bda),
                           ("mlp_bda", submodules.mlp_bda)):
            delattr(self, name)
            setattr(self, name, build_module(spec, config=self.config))
