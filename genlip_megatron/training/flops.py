"""Analytic FLOP count of GenLIP training steps, for TFLOP/s and MFU.

Model FLOPs (the MFU convention: recomputation not counted, padding not counted), per packed
sample with ``i`` image tokens and ``t`` text tokens, forward pass, one multiply-add = 2 FLOPs:

- per layer, linears: ``2 (i + t) (5 H² + 3 H F)``: q and gate (2H²), k, v (2H²), out (H²);
  SwiGLU gate_fc and fc1 (2HF) and fc2 (HF). Without the gate (``model.gated_attention:
  false``) ``4 H²`` instead of ``5 H²``; QK LayerNorm is not counted (O(H) per token).
- per layer, attention: ``4 H P`` with ``P`` the (query, key) pairs the prefix-LM mask allows:
  ``P = i² + t·i + t(t+1)/2`` (image tokens see their image; text token k sees the image and
  text tokens 0..k). QKᵀ and AV each cost ``2 · hd`` per pair per head.
- embeddings: patch linear ``2 i (C p²) H``; in_proj ``2 t T H`` when T ≠ H.
- head on the ``h`` positions that carry a label (the model skips the others): proj
  ``2 h H T`` (T ≠ H) and LM head ``2 h T V``.

A training step costs 3× the forward (backward = 2× forward). Hardware peak: dense BF16 tensor
core rates (no sparsity), as torchtitan and Megatron report MFU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class FlopDims:
    """The model dimensions the count needs."""

    hidden: int
    ffn: int
    layers: int
    text_dim: int
    vocab: int
    patch_dim: int
    gated_attention: bool = True

    @classmethod
    def from_model_config(cls, m) -> "FlopDims":
        return cls(m.hidden_size, m.ffn_hidden_size, m.num_layers, m.text_dim, m.vocab_size,
                   m.num_channels * m.patch_size * m.patch_size,
                   getattr(m, "gated_attention", True))


def attention_pairs(image_len: int, text_len: int) -> int:
    """(query, key) pairs allowed by the prefix-LM mask in one sample."""
    return image_len * image_len + text_len * image_len + text_len * (text_len + 1) // 2


def forward_flops(dims: FlopDims, image_lens: Sequence[int], text_lens: Sequence[int],
                  head_tokens: Optional[int] = None) -> float:
    """Forward FLOPs of a batch of samples; ``head_tokens`` defaults to every text token."""
    h, f, tdim = dims.hidden, dims.ffn, dims.text_dim
    n_img, n_txt = int(sum(image_lens)), int(sum(text_lens))
    pairs = sum(attention_pairs(int(i), int(t)) for i, t in zip(image_lens, text_lens))
    attn_linears = (5 if dims.gated_attention else 4) * h * h
    per_layer = 2 * (n_img + n_txt) * (attn_linears + 3 * h * f) + 4 * h * pairs
    embed = 2 * n_img * dims.patch_dim * h + (2 * n_txt * tdim * h if tdim != h else 0)
    heads = n_txt if head_tokens is None else head_tokens
    head = 2 * heads * tdim * dims.vocab + (2 * heads * h * tdim if tdim != h else 0)
    return float(dims.layers * per_layer + embed + head)


def training_flops(dims: FlopDims, image_lens: Sequence[int], text_lens: Sequence[int],
                   head_tokens: Optional[int] = None) -> float:
    """Model FLOPs of one forward+backward over the samples (3× forward)."""
    return 3.0 * forward_flops(dims, image_lens, text_lens, head_tokens)


# Dense BF16 peaks (FLOP/s), matched against torch.cuda.get_device_name(); first match wins.
_PEAKS = (
    ("GB200", 2.5e15), ("B200", 2.25e15), ("H200", 989e12), ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12),
    ("A800", 312e12), ("L40S", 362e12), ("A10", 125e12),
)


def peak_flops_per_device(override_tflops: Optional[float] = None) -> Optional[float]:
    """Dense BF16 peak of this device, the override when given, or None (e.g. on CPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in _PEAKS:
        if key in name:
            return peak
    return None
