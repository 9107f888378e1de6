"""Interleaved MRoPE of GenLIP (docs/reference-architecture.md, MRoPE).

Frequency channel ``i`` (of ``head_dim / 2``) rotates by the H position when ``i % 3 == 1`` and
``i < 3·section[1]``, by the W position when ``i % 3 == 2`` and ``i < 3·section[2]``, and by the T
position otherwise (``section[0]`` is never used). Angles are ``pos · theta^(-2i / head_dim)`` in
fp32; ``emb = cat(freqs, freqs)`` is the NeoX "rotate-half" layout (not GPT-J pairs).

megatron-core's ``MultimodalRotaryEmbedding`` is the chunked (Qwen2-VL) kind, so this module
computes the angles itself and hands them to megatron's attention as ``rotary_pos_emb`` of shape
``[S, B, 1, head_dim]``; megatron's unfused ``_apply_rotary_pos_emb_bshd`` (``rotary_interleaved
=False``) then takes ``cos``/``sin`` of them in fp32, casts to the activation dtype and applies
``t·cos + rotate_half(t)·sin``, exactly as the reference does.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["mrope_channel_map", "mrope_inv_freq", "mrope_freqs", "mrope_cos_sin",
           "rotate_half", "apply_rope", "MRoPERotaryEmbedding"]

T_AXIS, H_AXIS, W_AXIS = 0, 1, 2


def mrope_channel_map(head_dim: int, mrope_section: Sequence[int]) -> Tensor:
    """Which position axis each frequency channel uses.

    Args:
        head_dim: attention head dimension (even).
        mrope_section: (T, H, W) sections; H/W channel sets are capped at 3·section.

    Returns:
        int64 ``[head_dim // 2]`` with values 0 (T), 1 (H), 2 (W).
    """
    i = torch.arange(head_dim // 2)
    axis = torch.full_like(i, T_AXIS)
    axis[(i % 3 == 1) & (i < 3 * mrope_section[1])] = H_AXIS
    axis[(i % 3 == 2) & (i < 3 * mrope_section[2])] = W_AXIS
    return axis


def mrope_inv_freq(head_dim: int, theta: float, device=None) -> Tensor:
    """``1 / theta^(2i / head_dim)`` for i < head_dim / 2, fp32 ``[head_dim // 2]``."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta ** exponent)


def mrope_freqs(position_ids: Tensor, head_dim: int, mrope_section: Sequence[int],
                theta: float) -> Tensor:
    """Rotation angles for megatron's attention.

    Args:
        position_ids: int64 ``[B, 3, S]`` (t, h, w) per token.
        head_dim: attention head dimension.
        mrope_section: (T, H, W) sections.
        theta: RoPE base.

    Returns:
        fp32 ``[S, B, 1, head_dim]``: ``cat(freqs, freqs)`` along the last dim.
    """
    if position_ids.dim() != 3 or position_ids.shape[1] != 3:
        raise ValueError(f"position_ids must be [B, 3, S] (t, h, w), got "
                         f"{tuple(position_ids.shape)}.")
    inv_freq = mrope_inv_freq(head_dim, theta, position_ids.device)           # [D/2]
    freqs = position_ids.float().unsqueeze(-1) * inv_freq                      # [B, 3, S, D/2]
    axis = mrope_channel_map(head_dim, mrope_section).to(position_ids.device)  # [D/2]
    index = axis.view(1, 1, 1, -1).expand(freqs.shape[0], 1, freqs.shape[2], -1)
    freqs = freqs.gather(1, index).squeeze(1)                                  # [B, S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)                                    # [B, S, D]
    return emb.transpose(0, 1).unsqueeze(2).contiguous()                       # [S, B, 1, D]


def mrope_cos_sin(position_ids: Tensor, head_dim: int, mrope_section: Sequence[int],
                  theta: float) -> tuple[Tensor, Tensor]:
    """fp32 ``cos``, ``sin`` of :func:`mrope_freqs`, each ``[B, S, head_dim]``."""
    emb = mrope_freqs(position_ids, head_dim, mrope_section, theta)[:, :, 0].transpose(0, 1)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    """NeoX layout: ``cat(-x2, x1)`` of the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """``x·cos + rotate_half(x)·sin`` with cos/sin computed in fp32 and cast to ``x.dtype``.

    Args:
        x: ``[S, B, heads, head_dim]``.
        freqs: ``[S, B, 1, head_dim]`` from :func:`mrope_freqs`.
    """
    cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
    return x * cos + rotate_half(x) * sin


class MRoPERotaryEmbedding(torch.nn.Module):
    """Position ids → rotation angles (no parameters, no state-dict entries)."""

    def __init__(self, head_dim: int, mrope_section: Sequence[int], theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.mrope_section = tuple(int(s) for s in mrope_section)
        self.theta = float(theta)

    def forward(self, position_ids: Tensor) -> Tensor:
        """``[B, 3, S]`` int64 → fp32 ``[S, B, 1, head_dim]`` (see :func:`mrope_freqs`)."""
        return mrope_freqs(position_ids, self.head_dim, self.mrope_section, self.theta)
