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

__all__ = ["caption_nll", "caption_loss", "caption_block", "caption_scores",
           "caption_metrics", "shared_prompt"]


def shared_prompt(samples: Sequence[EvalSample]) -> list[int]:
    """The prompt ids every sample uses (held-out sets share the training prompt)."""
    first = [int(t) for t in samples[0].prompt_ids]
    if any([int(t) for t in s.prompt_ids] != first for s in samples):
        raise ValueError("held-out samples use different prompts; evaluate them separately.")
    return first


def caption_nll(model: GenLIPModel, samples: Sequence[EvalSample], tokenizer: TextTokenizer,
                prompt: Sequence[int]) -> tuple[float, int]:
    """(Σ NLL, tokens) of the reference captions + end tokens of ONE batch of samples."""
    caps = [tokenizer.encode(s.caption.strip()) + list(tokenizer.end_ids) for s in samples]
    ids, valid = padded_ids(caps, model.ln_post.weight.device)
    lp = row_log_probs(model, [(s.patches, s.grid) for s in samples], prompt, ids, valid)
    return -float(lp.double().sum()), int(valid.sum())


def caption_loss(model: GenLIPModel, samples: Sequence[EvalSample], tokenizer: TextTokenizer,
                 batch_size: int = 16) -> tuple[float, int]:
    """(Σ NLL / Σ tokens, tokens) of the reference captions + end tokens given the images."""
    prompt = shared_prompt(samples)
    total, tokens = 0.0, 0
    for i in range(0, len(samples), batch_size):
        nll, n = caption_nll(model, samples[i:i + batch_size], tokenizer, prompt)
        total += nll
        tokens += n
    return total / max(tokens, 1), tokens


@torch.no_grad()
def caption_block(model: GenLIPModel, samples: Sequence[EvalSample], tokenizer: TextTokenizer,
                  prompt: Sequence[int], max_new_tokens: int = 48
                  ) -> tuple[float, int, list[str]]:
    """One batch: (Σ NLL, tokens, greedy captions): the sufficient statistics of the caption
    metrics, so batches can run on different ranks (``evaluation/data_parallel.py``)."""
    nll, tokens = caption_nll(model, samples, tokenizer, prompt)
    captions = generate_captions(model, [(s.patches, s.grid) for s in samples], tokenizer,
                                 prompt_ids=prompt, max_new_tokens=max_new_tokens,
                                 batch_size=len(samples))
    return nll, tokens, captions


def caption_scores(nll: float, tokens: int, captions: Sequence[str],
                   references: Sequence[str]) -> dict[str, float]:
    """The caption metrics of a whole set from its sums and its captions (in set order):
    CIDEr-D is corpus-level (IDF over every reference), so it needs every caption at once."""
    if not captions or len(captions) != len(references):
        raise ValueError(f"caption scores need one caption per reference ({len(captions)} "
                         f"captions, {len(references)} references) and at least one.")
    loss = nll / max(tokens, 1)
    refs = [[r.strip()] for r in references]
    cider, _ = cider_d(list(captions), refs)
    exact = sum(c == r[0] for c, r in zip(captions, refs)) / len(refs)
    return {"caption/loss": loss, "caption/perplexity": math.exp(min(loss, 50.0)),
            "caption/exact_match": exact, "caption/cider": cider}


@torch.no_grad()
def caption_metrics(model: GenLIPModel, samples: Sequence[EvalSample],
                    tokenizer: TextTokenizer, *, max_new_tokens: int = 48,
                    batch_size: int = 16) -> tuple[dict[str, float], list[str]]:
    """Caption metrics (module docstring) and the generated captions, in sample order."""
    if not samples:
        raise ValueError("caption evaluation needs at least one held-out sample.")
    prompt = shared_prompt(samples)
    nll, tokens, captions = 0.0, 0, []
    for i in range(0, len(samples), batch_size):
        block = caption_block(model, samples[i:i + batch_size], tokenizer, prompt,
                              max_new_tokens)
        nll, tokens, captions = nll + block[0], tokens + block[1], captions + block[2]
    return caption_scores(nll, tokens, captions, [s.caption for s in samples]), captions
