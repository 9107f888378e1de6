"""Per-tensor conversion rules between the Megatron and the Hugging Face GenLIP state dicts.

Each rule maps ONE megatron tensor to one or more HF tensors and owns both directions
(``to_hf`` / ``to_megatron``) plus its tensor-parallel split and gather (``shard`` / ``gather``).
Megatron tensors are always named and shaped as in a TP=1 model ("canonical"); TP shards are
produced and merged only through the rules. Layout diagrams use E = hidden, I = SwiGLU width,
nh = heads, hd = head dim, T = text width, V = vocab.

Tensor parallelism: megatron splits a tensor along ``tp_axis`` into ``tp`` equal pieces; with
``tp_stride = s`` the tensor is first viewed as s parts along that axis and every part is split
(GLU ``linear_fc1``: rank r holds ``[gate_r; up_r]``, megatron's partition_stride 2). The global
tensor of a torch_dist checkpoint is the TP=1 tensor for every rule here, so dist checkpoints are
TP-agnostic; ``shard``/``gather`` serve per-rank in-memory state dicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["Rule", "Rename", "ConvAsLinear", "QKVGateMapping", "GatedMLPMapping",
           "tp_shard", "tp_gather"]


def tp_shard(full: Tensor, rank: int, size: int, axis: Optional[int], stride: int = 1) -> Tensor:
    """Rank ``rank``'s piece of ``full`` (replicated tensors when ``axis`` is None).

    Raises:
        ValueError: the axis does not split evenly into ``size × stride`` pieces.
    """
    if axis is None or size == 1:
        return full
    if full.shape[axis] % (size * stride):
        raise ValueError(f"cannot split dimension {axis} of size {full.shape[axis]} into "
                         f"{size} tensor-parallel ranks (stride {stride}); pick a tp that "
                         "divides it.")
    parts = full.chunk(stride, dim=axis)
    return torch.cat([p.chunk(size, dim=axis)[rank] for p in parts], dim=axis)


def tp_gather(shards: list[Tensor], axis: Optional[int], stride: int = 1) -> Tensor:
    """Inverse of :func:`tp_shard` over all ranks' pieces (in rank order)."""
    if axis is None or len(shards) == 1:
        return shards[0]
    per_rank = [s.chunk(stride, dim=axis) for s in shards]
    return torch.cat([per_rank[r][p] for p in range(stride) for r in range(len(shards))],
                     dim=axis)


@dataclass(frozen=True)
class Rule:
    """One megatron tensor ⇄ its HF tensor(s).

    Attributes:
        megatron: canonical megatron name; ``*`` stands for the global layer index.
        tp_axis: axis megatron's tensor parallelism splits (None: replicated).
        tp_stride: number of interleaved parts per rank along ``tp_axis`` (2 for GLU fc1).
        text: belongs to the text/LM path (dropped by vision-only exports).
    """

    megatron: str
    tp_axis: Optional[int] = None
    tp_stride: int = 1
    text: bool = False

    def hf_names(self) -> tuple[str, ...]:
        """HF names (``*`` = layer index), in the order ``to_hf`` returns them."""
        raise NotImplementedError

    def to_hf(self, t: Tensor) -> tuple[Tensor, ...]:
        """Megatron (TP=1) tensor → HF tensors, aligned with :meth:`hf_names`."""
        raise NotImplementedError

    def to_megatron(self, hf: tuple[Tensor, ...]) -> Tensor:
        """HF tensors (aligned with :meth:`hf_names`) → megatron (TP=1) tensor."""
        raise NotImplementedError

    def shard(self, full: Tensor, rank: int, size: int) -> Tensor:
        """This rule's TP split of a canonical megatron tensor."""
        return tp_shard(full, rank, size, self.tp_axis, self.tp_stride)

    def gather(self, shards: list[Tensor]) -> Tensor:
        """This rule's TP gather of per-rank megatron tensors."""
        return tp_gather(shards, self.tp_axis, self.tp_stride)


@dataclass(frozen=True)
class Rename(Rule):
    """1:1 rename, same tensor."""

    hf: str = ""

    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)

    def to_hf(self, t: Tensor) -> tuple[Tensor, ...]:
        return (t,)

    def to_megatron(self, hf: tuple[Tensor, ...]) -> Tensor:
        return hf[0]


@dataclass(frozen=True)
class ConvAsLinear(Rule):
    """Patch embedding: megatron Linear ``[E, C·p·p]`` ⇄ HF Conv2d ``[E, C, p, p]``.

    ``linear.weight = conv.weight.flatten(1)``: the patch vector is flattened in (C, ph, pw)
    order, exactly the order of ``PackedBatch.pixel_values``.
    """

    hf: str = ""
    channels: int = 3
    patch_size: int = 16

    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)

    def to_hf(self, t: Tensor) -> tuple[Tensor, ...]:
        return (t.reshape(t.shape[0], self.channels, self.patch_size, self.patch_size),)

    def to_megatron(self, hf: tuple[Tensor, ...]) -> Tensor:
        return hf[0].flatten(1)


@dataclass(frozen=True)
class QKVGateMapping(Rule):
    """Fused ``linear_qkv`` with output gate ⇄ ``q_proj`` [query | gate], ``k_proj``, ``v_proj``.

    Layout (weight rows; the bias is the same with one column)::

        HF   q_proj [2E, E] = [ Wq (head 0..nh-1, hd rows each) ; Wg (head 0..nh-1) ]
             k_proj [E, E], v_proj [E, E]          (head-major)
        MCore linear_qkv [4E, E] = for h in heads: [ Wq_h ; Wg_h ; Wk_h ; Wv_h ]

    (megatron-core 0.16.1 ``attention_output_gate``: per query group ``[q, gate, k, v]``; MHA, so
    one head per group.) Without the gate (``gated=False``, ``model.gated_attention: false``)
    ``q_proj`` is ``[E, E]`` and ``linear_qkv`` ``[3E, E]`` = per head ``[Wq_h ; Wk_h ; Wv_h]``.
    Column-parallel: TP rank r holds groups ``r·nh/tp ... (r+1)·nh/tp - 1``, which is a
    contiguous block of rows, so ``tp_axis`` = 0.
    """

    q: str = ""
    k: str = ""
    v: str = ""
    num_heads: int = 1
    gated: bool = True

    def hf_names(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v)

    def to_hf(self, t: Tensor) -> tuple[Tensor, ...]:
        nh, parts = self.num_heads, 4 if self.gated else 3
        if t.shape[0] % (parts * nh):
            raise ValueError(f"{self.megatron}: {t.shape[0]} rows are not {parts} × heads ({nh}) "
                             "× head_dim; the checkpoint and the config disagree on heads or "
                             "on model.gated_attention.")
        grouped = t.reshape(nh, parts, t.shape[0] // (parts * nh), *t.shape[1:])  # [nh, p, hd]
        split = [grouped[:, j].reshape(-1, *t.shape[1:]) for j in range(parts)]
        if not self.gated:
            return tuple(split)
        q, g, k, v = split
        return torch.cat([q, g], dim=0), k, v

    def to_megatron(self, hf: tuple[Tensor, ...]) -> Tensor:
        qg, k, v = hf
        nh = self.num_heads
        heads = (*qg.chunk(2, dim=0), k, v) if self.gated else (qg, k, v)
        parts = [x.reshape(nh, x.shape[0] // nh, *x.shape[1:]) for x in heads]
        return torch.stack(parts, dim=1).reshape(-1, *qg.shape[1:])


@dataclass(frozen=True)
class GatedMLPMapping(Rule):
    """GLU ``linear_fc1`` ⇄ ``gate_fc`` (SiLU branch) and ``fc1`` (linear branch).

    Layout: ``linear_fc1 [2I, E] = cat[gate_fc [I, E], fc1 [I, E]]`` (megatron GLU computes
    ``act(x_glu) * x_linear`` with ``x_glu, x_linear = chunk(fc1(x), 2)``). TP rank r holds
    ``[gate_r; up_r]``: ``tp_axis`` 0 with ``tp_stride`` 2.
    """

    gate: str = ""
    up: str = ""

    def hf_names(self) -> tuple[str, ...]:
        return (self.gate, self.up)

    def to_hf(self, t: Tensor) -> tuple[Tensor, ...]:
        if t.shape[0] % 2:
            raise ValueError(f"{self.megatron}: {t.shape[0]} rows cannot be split into "
                             "[gate; up] halves.")
        gate, up = t.chunk(2, dim=0)
        return gate, up

    def to_megatron(self, hf: tuple[Tensor, ...]) -> Tensor:
        return torch.cat(hf, dim=0)
