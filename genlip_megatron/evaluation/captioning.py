"""Caption evaluation of a GenLIP model on held-out images: perplexity, exact match, CIDEr-D.

- ``caption/loss`` (nats per token) and ``caption/perplexity``: the reference caption and its
  ``<|im_end|>\\n`` (the labelled tokens of the training template) scored after
  ``[IMG×N] prompt``, token-weighted over the whole set, as the training loss is. On the same
  rows it equals the in-loop ``loss/val`` up to float rounding (one sample per row here; the
  trainer packs rows, which the prefix-LM mask makes irrelevant).
- ``caption/exact_match`` and ``caption/cider``: greedy captions (KV cache, ``probes``)
  compared with the reference, exact string match and CIDEr-D (``evaluation/cider.py``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from genlip_megatron.convert.hf.modeling_genlip import GenLIPModel
from genlip_megatron.data.inference import EvalSample
from genlip_megatron.data.tokenizer import TextTokenizer
from genlip_megatron.evaluation.cider import cider_d
from genlip_megatron.evaluation.zeroshot import padded_ids, row_log_probs
from genlip_megatron.probes.generation import generate_captions

__all__ = ["caption_loss", "caption_metrics"]


def shared_prompt(samples: Sequence[EvalSample]) -> list[int]:
    """The prompt ids every sample uses (held-out sets share the training prompt)."""
    first = [int(t) for t in samples[0].prompt_ids]
    if any([int(t) for t in s.prompt_ids] != first for s in samples):
        raise ValueError("held-out samples use different prompts; evaluate them separately.")
    return first


def caption_loss(model: GenLIPModel, samples: Sequence[EvalSample], tokenizer: TextTokenizer,
                 batch_size: int = 16) -> tuple[float, int]:
    """(Σ NLL / Σ tokens, tokens) of the reference captions + end tokens given the images."""
    prompt = shared_prompt(samples)
    total, tokens = 0.0, 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        caps = [tokenizer.encode(s.caption.strip()) + list(tokenizer.end_ids) for s in chunk]
        ids, valid = padded_ids(caps, model.ln_post.weight.device)
        lp = row_log_probs(model, [(s.patches, s.grid) for s in chunk], prompt, ids, valid)
        total -= float(lp.double().sum())
        tokens += int(valid.sum())
    return total / max(tokens, 1), tokens


@torch.no_grad()
def caption_metrics(model: GenLIPModel, samples: Sequence[EvalSample],
                    tokenizer: TextTokenizer, *, max_new_tokens: int = 48,
                    batch_size: int = 16) -> tuple[dict[str, float], list[str]]:
    """Caption metrics (module docstring) and the generated captions, in sample order."""
    if not samples:
        raise ValueError("caption evaluation needs at least one held-out sample.")
    loss, _ = caption_loss(model, samples, tokenizer, batch_size)
    captions = generate_captions(model, [(s.patches, s.grid) for s in samples], tokenizer,
                                 prompt_ids=shared_prompt(samples),
                                 max_new_tokens=max_new_tokens, batch_size=batch_size)
    refs = [[s.caption.strip()] for s in samples]
    cider, _ = cider_d(captions, refs)
    exact = sum(c == r[0] for c, r in zip(captions, refs)) / len(samples)
    return {"caption/loss": loss, "caption/perplexity": math.exp(min(loss, 50.0)),
            "caption/exact_match": exact, "caption/cider": cider}, captions
