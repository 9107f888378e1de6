"""Reference initialisation of GenLIP, identical under any TP/PP/VPP layout.

The rules: docs/reference-architecture.md, Initialization.

=====================================  ===========================================================
tensor                                 init
=====================================  ===========================================================
patch_embed, in_proj, output_proj      N(0, std), bias 0 (reference: Linear / Conv2d branch)
word_embeddings, output_layer          N(0, std) (lm_head has no bias)
linear_qkv                             xavier_uniform per UNFUSED projection: q_proj [2H, H]
                                       (query and gate rows together; [H, H] without the
                                       gate), k_proj, v_proj [H, H]; bias 0
linear_proj (out_proj)                 xavier_uniform [H, H], bias 0
linear_fc1 ([gate_fc; fc1]), fc2       N(0, std), bias 0 (SwiGLU keeps the Linear init)
LayerNorms (also q/k_layernorm)        weight 1, bias 0
LayerScale                             ``layerscale_init`` (0.1)
=====================================  ===========================================================

Every tensor is drawn in full (its TP=1 shape) in fp32 from its own generator, seeded from
``config.init_seed`` and the tensor's *global* name (layer index after the pipeline offset), then
sliced to this rank's TP shard like megatron's ``_initialize_affine_weight_cpu``. So TP=2 weights
are exact slices of TP=1 weights, and PP/VPP stages hold exactly the TP=1/PP=1 tensors.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["init_genlip_weights", "global_param_name", "full_shape_and_sharding"]

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")

# suffix → (init kind, TP partition dim or None, partition stride)
_RULES: tuple[tuple[str, str, Optional[int], int], ...] = (
    ("layer_scale", "layer_scale", None, 1),
    ("layernorm.weight", "ones", None, 1),            # input/pre_mlp/final LayerNorm (local)
    ("layer_norm_weight", "ones", None, 1),           # TE fused LayerNorm-linear
    ("linear_qkv.weight", "qkv", 0, 1),
    ("linear_proj.weight", "xavier", 1, 1),
    ("linear_fc1.weight", "normal", 0, 2),
    ("linear_fc2.weight", "normal", 1, 1),
    ("word_embeddings.weight", "normal", 0, 1),
    ("output_layer.weight", "normal", 0, 1),
    ("patch_embed.weight", "normal", None, 1),
    ("in_proj.weight", "normal", None, 1),
    ("output_proj.weight", "normal", None, 1),
    ("linear_qkv.bias", "zeros", 0, 1),
    ("linear_fc1.bias", "zeros", 0, 2),
    ("bias", "zeros", None, 1),                       # every other bias (replicated)
)


def global_param_name(name: str, layer_numbers: list[int]) -> str:
    """Replace the local layer index of ``decoder.layers.{j}.`` by the global one.

    Args:
        name: parameter name in this model chunk.
        layer_numbers: 1-based global ``layer_number`` of each local layer.
    """
    match = _LAYER.match(name)
    if match is None:
        return name
    return f"decoder.layers.{layer_numbers[int(match.group(1))] - 1}." + name[match.end():]


def full_shape_and_sharding(name: str, local_shape: torch.Size, tp_size: int
                            ) -> tuple[str, tuple[int, ...], Optional[int], int]:
    """``(init kind, full TP=1 shape, partition dim, stride)`` of a parameter.

    Raises:
        RuntimeError: a parameter no rule covers (a new module must declare its init here).
    """
    for suffix, kind, dim, stride in _RULES:
        if name.endswith(suffix):
            shape = list(local_shape)
            if dim is not None:
                shape[dim] *= tp_size
            return kind, tuple(shape), dim, stride
    raise RuntimeError(f"no reference initialisation rule for parameter {name!r}; add one to "
                       "genlip_megatron/model/init.py _RULES.")


def _seed(base: int, name: str) -> int:
    digest = hashlib.sha256(f"{base}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _xavier(shape: tuple[int, ...], gen: torch.Generator, device) -> Tensor:
    bound = math.sqrt(6.0 / (shape[0] + shape[1]))
    return torch.empty(shape, device=device).uniform_(-bound, bound, generator=gen)


def _qkv(shape: tuple[int, ...], gen: torch.Generator, device, heads: int) -> Tensor:
    """Fused ``[4H, H]`` with per-head ``[q_h; g_h; k_h; v_h]`` rows, xavier per projection.

    Without the gate (``[3H, H]``, ``model.gated_attention: false``) q_proj is ``[H, H]`` and
    its xavier bound is that of an ``[H, H]`` matrix, as the reference builds it.
    """
    hidden = shape[1]
    gated = shape[0] == 4 * hidden
    qg = _xavier(((2 if gated else 1) * hidden, hidden), gen, device)  # q_proj [query | gate]
    k = _xavier((hidden, hidden), gen, device)
    v = _xavier((hidden, hidden), gen, device)
    parts = (qg[:hidden], qg[hidden:], k, v) if gated else (qg, k, v)
    per_head = [t.view(heads, hidden // heads, hidden) for t in parts]
    return torch.stack(per_head, dim=1).reshape(len(parts) * hidden, hidden)


def _full_tensor(kind: str, shape: tuple[int, ...], gen: torch.Generator, device,
                 config) -> Tensor:
    makers: dict[str, Callable[[], Tensor]] = {
        "ones": lambda: torch.ones(shape, device=device),
        "zeros": lambda: torch.zeros(shape, device=device),
        "layer_scale": lambda: torch.full(shape, float(config.layerscale_init), device=device),
        "normal": lambda: torch.empty(shape, device=device).normal_(
            0.0, config.init_method_std, generator=gen),
        "xavier": lambda: _xavier(shape, gen, device),
        "qkv": lambda: _qkv(shape, gen, device, config.num_attention_heads),
    }
    return makers[kind]()


def _shard(full: Tensor, dim: Optional[int], stride: int, rank: int, size: int) -> Tensor:
    """This rank's slice, as megatron's ``_initialize_affine_weight_cpu`` takes it."""
    if dim is None or size == 1:
        return full
    chunks = torch.chunk(full, size * stride, dim=dim)
    return torch.cat(chunks[rank::size], dim=dim)


@torch.no_grad()
def init_genlip_weights(model: torch.nn.Module, tp_rank: int, tp_size: int,
                        layer_numbers: list[int]) -> None:
    """Overwrite every parameter of ``model`` (one model chunk) with the reference init.

    Args:
        model: a ``GenLIPMegatronModel`` chunk (its ``config`` is read).
        tp_rank, tp_size: this rank's tensor-parallel coordinates.
        layer_numbers: 1-based global layer number of each local decoder layer.
    """
    config = model.config
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            continue
        kind, shape, dim, stride = full_shape_and_sharding(name, param.shape, tp_size)
        gen = torch.Generator(device=param.device)
        gen.manual_seed(_seed(config.init_seed, global_param_name(name, layer_numbers)))
        full = _full_tensor(kind, shape, gen, param.device, config)
        param.copy_(_shard(full, dim, stride, tp_rank, tp_size).to(param.dtype))
