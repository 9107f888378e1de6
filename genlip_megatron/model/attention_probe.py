"""Attention-sink probe: how much attention mass lands on each sample's FIRST image token.

Large language-model transformers park attention on the first token of a sequence; GenLIP
removes BOS/vision-start tokens partly to curb this (reference chat template notes). The probe
measures, per layer, the mean over heads and (non-padding) queries of the softmax probability
given to the first image token of the query's own sample.

It hooks every layer's core attention (any backend: the hook sees the post-RoPE query and key
``[S, B, heads/tp, d]``) and recomputes the probabilities densely from the prefix-LM rule, so it
is meant for a small probe batch, not for every training step.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import Tensor

from genlip_megatron.model.attention import prefix_lm_allowed


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


def sink_mass(query: Tensor, key: Tensor, allowed: Tensor, sink: Tensor) -> tuple[float, int]:
    """(sum over heads × valid queries of the mass on the sink key, number of such terms).

    Args:
        query, key: ``[S, B, heads, d]`` after rotary embedding.
        allowed: bool ``[B, S, S]`` prefix-LM mask (query, key).
        sink: int64 ``[B, S]`` sink key per query, -1 to skip the query.
    """
    q = query.permute(1, 2, 0, 3).float()                       # [B, h, S, d]
    k = key.permute(1, 2, 0, 3).float()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])   # [B, h, S, S]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = scores.softmax(dim=-1)
    valid = sink >= 0                                           # [B, S]
    idx = sink.clamp(min=0)[:, None, :, None].expand(-1, probs.shape[1], -1, 1)
    mass = probs.gather(-1, idx).squeeze(-1)                    # [B, h, S]
    mass = mass * valid[:, None, :]
    return float(mass.sum()), int(valid.sum()) * probs.shape[1]


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
    allowed = prefix_lm_allowed(segment_ids, image_mask)
    sink = first_image_token_index(segment_ids, image_mask)
    handles = []
    for layer_number, core in _core_attentions(model_chunks):
        def hook(_module, args, kwargs, n=layer_number):
            query = args[0] if args else kwargs["query"]
            key = args[1] if len(args) > 1 else kwargs["key"]
            total, count = sink_mass(query.detach(), key.detach(), allowed.to(query.device),
                                     sink.to(query.device))
            stats[n - 1, 0] += total
            stats[n - 1, 1] += count
        handles.append(core.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
