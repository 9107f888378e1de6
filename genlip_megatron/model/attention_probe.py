"""Attention-sink probe: how much attention mass lands on each sample's FIRST image token.

Large language-model transformers park attention on the first token of a sequence; GenLIP
removes BOS/vision-start tokens partly to curb this (reference chat template notes). The probe
measures, per layer, the mean over heads and (non-padding) queries of the softmax probability
given to the first image token of the query's own sample.

It hooks every layer's core attention (any backend: the hook sees the post-RoPE query and key
``[S, B, heads/tp, d]``) and recomputes the probabilities from the prefix-LM rule in chunks of
queries (:data:`PROBE_QUERY_CHUNK`), so a full 16384-token row costs O(S × chunk) memory, not
the O(S²) of dense scores; it is still meant for one probe batch, not for every training step.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import Tensor


def first_image_token_index(segment_ids: Tensor, image_mask: Tensor) -> Tensor:
    """int64 ``[B, S]``: position of the first image token of each token's sample (-1 if none).

    Samples are laid out ``[image | text]``, so that is the sample's first position when the
    sample has an image.
    """
    B, S = segment_ids.shape
    pos = torch.arange(S, device=segment_ids.device).expand(B, S)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_pos = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
    has_image = torch.gather(image_mask, 1, start_pos)
    valid = (segment_ids >= 0) & has_image
    return torch.where(valid, start_pos, torch.full_like(start_pos, -1))


PROBE_QUERY_CHUNK = 512
"""Queries per probe step: peak memory is O(B · heads · chunk · S) instead of O(B · heads · S²)
(a 16384-token row with 16 heads: 0.5 GiB per step instead of 17 GiB of fp32 scores)."""


def _allowed_rows(segment_ids: Tensor, image_mask: Tensor, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of :func:`prefix_lm_allowed` (bool ``[B, stop-start, S]``), built
    without the full ``[B, S, S]`` mask."""
    S = segment_ids.shape[1]
    pos = torch.arange(S, device=segment_ids.device)
    q_pos = pos[start:stop]
    seg_q, seg_k = segment_ids[:, start:stop, None], segment_ids[:, None, :]
    img_q, img_k = image_mask[:, start:stop, None], image_mask[:, None, :]
    causal = q_pos[:, None] >= pos[None, :]
    same = (seg_q == seg_k) & (seg_q >= 0)
    allowed = same & ((img_q & img_k) | (~img_q & causal))
    return allowed | ((seg_q < 0) & (q_pos[:, None] == pos[None, :]))


def sink_mass(query: Tensor, key: Tensor, segment_ids: Tensor, image_mask: Tensor, sink: Tensor,
              chunk: int = PROBE_QUERY_CHUNK) -> tuple[float, int]:
    """(sum over heads × valid queries of the mass on the sink key, number of such terms).

    Computed ``chunk`` queries at a time (scores ``[B, heads, chunk, S]``), so peak memory grows
    linearly with the row length.

    Args:
        query, key: ``[S, B, heads, d]`` after rotary embedding.
        segment_ids, image_mask: ``[B, S]`` (prefix-LM rule of ``attention.prefix_lm_allowed``).
        sink: int64 ``[B, S]`` sink key per query, -1 to skip the query.
        chunk: queries per step.
    """
    k = key.permute(1, 2, 3, 0).float()                         # [B, h, d, S]
    scale = 1.0 / math.sqrt(query.shape[-1])
    heads, S = query.shape[2], query.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=query.device)
    for start in range(0, S, chunk):
        stop = min(start + chunk, S)
        q = query[start:stop].permute(1, 2, 0, 3).float()       # [B, h, c, d]
        scores = (q @ k) * scale                                # [B, h, c, S]
        allowed = _allowed_rows(segment_ids, image_mask, start, stop)
        scores.masked_fill_(~allowed[:, None], float("-inf"))
        rows = sink[:, start:stop]                              # [B, c]
        sink_score = scores.gather(-1, rows.clamp(min=0)[:, None, :, None].expand(
            -1, heads, -1, 1)).squeeze(-1)                      # [B, h, c]
        mass = (sink_score - scores.logsumexp(dim=-1)).exp()
        total += (mass * (rows >= 0)[:, None, :]).sum(dtype=torch.float64)
        del scores, allowed
    return float(total), int((sink >= 0).sum()) * heads


def _core_attentions(model_chunks: list) -> Iterator[tuple[int, torch.nn.Module]]:
    for chunk in model_chunks:
        module = getattr(chunk, "module", chunk)  # DDP-wrapped or bare
        for layer in module.decoder.layers:
            yield layer.layer_number, layer.self_attention.core_attention


@contextlib.contextmanager
def capture_attention_sink(model_chunks: list, segment_ids: Tensor, image_mask: Tensor,
                           num_layers: int):
    """Inside the block, forwards of ``model_chunks`` on this batch record the sink mass.

    Yields a float64 tensor ``[num_layers, 2]`` (mass sum, term count) per GLOBAL layer, filled
    for the layers this rank holds; reduce it over TP (heads) and PP (layers) groups.
    """
    stats = torch.zeros(num_layers, 2, dtype=torch.float64)
    sink = first_image_token_index(segment_ids, image_mask)
    handles = []
    for layer_number, core in _core_attentions(model_chunks):
        def hook(_module, args, kwargs, n=layer_number):
            query = args[0] if args else kwargs["query"]
            key = args[1] if len(args) > 1 else kwargs["key"]
            dev = query.device
            total, count = sink_mass(query.detach(), key.detach(), segment_ids.to(dev),
                                     image_mask.to(dev), sink.to(dev))
            stats[n - 1, 0] += total
            stats[n - 1, 1] += count
        handles.append(core.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
