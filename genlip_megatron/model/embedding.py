"""GenLIP input embedding: patch embedding + text embedding (+ in_proj), merged per position.

Reference (docs/reference-architecture.md):
``input = in_proj(embeddings(input_ids))`` (T → H, only when T ≠ H),
then image positions are overwritten with ``patch_embedding(pixels)`` (H directly: image
embeddings bypass ``in_proj``). The reference's ``Conv2d(C, H, p, p)`` with stride p equals a
``Linear(C·p·p → H)`` on patches flattened in (C, ph, pw) order (``conv.weight.flatten(1)``).
No absolute position embedding: positions come from MRoPE only.

Image positions are overwritten, so their word embedding and ``in_proj`` are wasted work: on a
stage-1 row (≈ 90 % patches) the ``in_proj`` GEMM over every position costs ≈ 4 % of a 2-layer
L/16 CPU step. On CPU, where selecting rows by a boolean mask costs no device sync, only the
non-image positions (text and padding) are embedded and projected; on GPU the whole row is,
without a host sync (``masked_scatter``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

__all__ = ["GenLIPEmbedding"]


class GenLIPEmbedding(MegatronModule):
    """First-pipeline-stage embedding.

    Submodules (state-dict keys under ``embedding.``):
    ``patch_embed`` Linear ``[H, C·p·p]`` + bias ``[H]``; ``word_embeddings``
    VocabParallelEmbedding ``[V/tp, T]`` (vocab-sharded); ``in_proj`` Linear ``[H, T]`` + bias,
    only when T ≠ H.

    Args:
        config: ``GenLIPTransformerConfig``.
        tp_group: tensor-parallel group (None: megatron's global group).
    """

    def __init__(self, config: Any, tp_group: Optional[torch.distributed.ProcessGroup] = None):
        super().__init__(config=config)
        dtype = config.params_dtype
        self.tp_group = tp_group
        self.patch_embed = torch.nn.Linear(config.patch_dim, config.hidden_size, dtype=dtype)
        self.word_embeddings = VocabParallelEmbedding(
            config.vocab_size, config.text_dim, init_method=config.init_method,
            reduce_scatter_embeddings=False, config=config, tp_group=tp_group)
        self.in_proj = (torch.nn.Linear(config.text_dim, config.hidden_size, dtype=dtype)
                        if config.text_dim != config.hidden_size else None)

    def forward(self, tokens: Tensor, image_mask: Tensor,
                pixel_values: Optional[Tensor]) -> Tensor:
        """Embed one micro-batch.

        Args:
            tokens: int64 ``[B, S]`` (0 at image and padding positions).
            image_mask: bool ``[B, S]``, True at image patches.
            pixel_values: float ``[N, C·p·p]``, N = ``image_mask.sum()``, row-major order
                (None: no images in this micro-batch).

        Returns:
            ``[S, B, H]`` in ``params_dtype``; ``[S/tp, B, H]`` under sequence parallelism.
        """
        text = self._embed_text(tokens, image_mask)                # [B, S, H]
        if pixel_values is None:                                   # text-only micro-batch
            pixel_values = text.new_zeros(0, self.patch_embed.in_features)
        patches = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # [N, H]
        # masked_scatter fills mask positions in row-major [B, S] order, which is the order of
        # pixel_values (row 0 first); no host sync, unlike boolean indexing.
        mask = image_mask.unsqueeze(-1).expand_as(text)
        hidden = text.masked_scatter(mask, patches.to(text.dtype))
        hidden = hidden.transpose(0, 1).contiguous()               # [S, B, H]
        if self.config.sequence_parallel:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden,
                                                                         group=self.tp_group)
        return hidden

    def _embed_text(self, tokens: Tensor, image_mask: Tensor) -> Tensor:
        """``in_proj(word_embeddings(tokens))`` ``[B, S, H]``, computed at non-image positions
        only on CPU (image positions are zeros there; the caller overwrites them)."""
        if tokens.device.type != "cpu":
            text = self.word_embeddings(tokens)                    # [B, S, T] (TP all-reduced)
            return self.in_proj(text) if self.in_proj is not None else text
        B, S = tokens.shape
        keep = (~image_mask).reshape(-1).nonzero().squeeze(1)      # host sync: free on CPU
        text = self.word_embeddings(tokens.reshape(-1)[keep])      # [Nt, T]
        if self.in_proj is not None:
            text = self.in_proj(text)                              # [Nt, H]
        full = text.new_zeros(B * S, text.shape[-1])
        return full.index_copy(0, keep, text).view(B, S, -1)
