"""Attention-sink mass of a checkpoint on held-out samples (``sink/mass_mean``,
``sink/mass_layer_NN``), the quantity behind the paper's gated-attention ablation.

The measure is ``model/attention_probe.py``'s (the one the training loop logs as
``attention_sink/*`` with ``logging.attention_sink_interval``): per layer, the mean over heads
and valid queries of the softmax probability given to the first image token of the query's own
sample, under the prefix-LM rule, computed by its :func:`sink_mass`. Here it runs on the
HF-format module of the suite: every layer's attention gets a forward pre-hook that forms the
post-RoPE query and key with the layer's own ``GenLIPAttention.project`` (the code its forward
runs: gate split, QK-norm, MRoPE) and hands them to ``sink_mass``.
The rows are the held-out samples with their reference captions (``[IMG×N] prompt caption
<|im_end|>``), one sample per row, padding excluded.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from genlip_megatron.convert.hf.modeling_genlip import GenLIPModel
from genlip_megatron.data.inference import EvalSample
from genlip_megatron.data.tokenizer import TextTokenizer
from genlip_megatron.evaluation.captioning import shared_prompt
from genlip_megatron.evaluation.data_parallel import BatchedEvaluator, ordered_blocks
from genlip_megatron.evaluation.zeroshot import padded_ids
from genlip_megatron.model.attention_probe import first_image_token_index, sink_mass
from genlip_megatron.probes.generation import prefix_batch

__all__ = ["AttentionSinkEvaluator", "attention_sink_mass", "sink_totals"]


def _post_rope_qk(attn, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Query and key ``[L, B, heads, d]`` exactly as the attention forms them (gate split,
    QK-norm, MRoPE: ``GenLIPAttention.project``)."""
    q, k, _, _ = attn.project(x, cos, sin)
    return q.permute(2, 0, 1, 3), k.permute(2, 0, 1, 3)


@contextlib.contextmanager
def _capture(model: GenLIPModel, segment_ids: Tensor, image_mask: Tensor
             ) -> Iterator[Tensor]:
    """Yields float64 ``[layers, 2]`` (mass sum, terms), filled by the forwards inside."""
    layers = model.visual.layers
    stats = torch.zeros(len(layers), 2, dtype=torch.float64)
    sink = first_image_token_index(segment_ids, image_mask)
    handles = []
    for i, layer in enumerate(layers):
        def hook(module, args, i=i):
            q, k = _post_rope_qk(module, args[0], args[1], args[2])
            total, count = sink_mass(q.float(), k.float(), segment_ids, image_mask, sink)
            stats[i, 0] += total
            stats[i, 1] += count
        handles.append(layer.self_attn.register_forward_pre_hook(hook))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def sink_totals(model: GenLIPModel, samples: Sequence[EvalSample], tokenizer: TextTokenizer,
                prompt: Sequence[int]) -> Tensor:
    """float64 ``[layers, 2]``: per layer, the summed sink mass and the number of terms over
    the samples' full rows (image, prompt, caption), run as one batch."""
    device, dtype = model.ln_post.weight.device, model.ln_post.weight.dtype
    caps = [tokenizer.encode(s.caption.strip()) + list(tokenizer.end_ids) for s in samples]
    ids, valid = padded_ids(caps, device)
    lc = ids.shape[1]
    row_ids, img, attn, pos, pixels, _ = prefix_batch(
        [(s.patches, s.grid) for s in samples], list(prompt) + [0] * lc, dtype, device)
    row_ids[:, -lc:] = ids
    attn[:, -lc:] = valid.long()
    segments = torch.where(attn.bool(), 0, -1)
    with _capture(model, segments, img) as stats:
        model(input_ids=row_ids, pixel_values=pixels, image_mask=img, position_ids=pos,
              attention_mask=attn, return_logits=False)
    return stats


@dataclass
class AttentionSinkEvaluator(BatchedEvaluator):
    """``sink/mass_mean`` and ``sink/mass_layer_NN`` (layers numbered from 1, as the training
    loop's ``attention_sink/layer_NN``).

    Split over data-parallel ranks by batches: state per batch (first index, ``[layers, 2]``
    totals); the reduction sums them in batch order, as a single process does.
    """

    samples: list[EvalSample]
    tokenizer: TextTokenizer
    batch_size: int = 16
    name: str = "sink"

    def context(self) -> list[int]:
        return shared_prompt(self.samples)

    def block(self, model: GenLIPModel, batch: list[int], prompt: list[int]) -> tuple:
        return (sink_totals(model, [self.samples[i] for i in batch], self.tokenizer, prompt),)

    def reduce(self, states: Sequence[dict]) -> dict[str, float]:
        per_layer = self.per_layer(states)
        out = {f"sink/mass_layer_{i + 1:02d}": v for i, v in enumerate(per_layer)}
        out["sink/mass_mean"] = sum(per_layer) / len(per_layer)
        return out

    def per_layer(self, states: Sequence[dict]) -> list[float]:
        """Mean sink mass per layer: the batches' totals summed in batch order."""
        blocks = ordered_blocks(states)
        if not blocks or [b[0] for b in blocks] != list(range(0, self.num_items,
                                                               self.batch_size)):
            raise ValueError(f"attention-sink states cover {len(blocks)} batches of "
                             f"{self.num_items} samples; every batch is needed (and one sample "
                             "at least).")
        totals = blocks[0][1].clone()
        for _, block in blocks[1:]:
            totals += block
        return (totals[:, 0] / totals[:, 1].clamp_min(1)).tolist()


def attention_sink_mass(model: GenLIPModel, samples: Sequence[EvalSample],
                        tokenizer: TextTokenizer, batch_size: int = 16) -> list[float]:
    """Per-layer mean sink mass over the samples, ``batch_size`` rows per forward."""
    if not samples:
        raise ValueError("attention-sink mass needs at least one held-out sample.")
    ev = AttentionSinkEvaluator(list(samples), tokenizer, batch_size)
    return ev.per_layer([ev.partial(model, range(ev.num_items))])
