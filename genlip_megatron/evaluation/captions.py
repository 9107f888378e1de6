"""End-of-run evaluation: greedy captions on held-out images, and the unigram baseline.

Captioning runs on the logging rank from the final checkpoint through the probes' HF-format module
(``probes.load_genlip_for_inference``), so it works for any TP/PP layout of the run and uses
the same inference code as the CLIs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from genlip_megatron.config.data import DataConfig
from genlip_megatron.config.training import EvalConfig
from genlip_megatron.data.inference import iter_eval_samples
from genlip_megatron.data.tokenizer import load_tokenizer
from genlip_megatron.probes import caption_exact_match, load_genlip_for_inference

logger = logging.getLogger(__name__)


def unigram_loss(label_counts: Optional[torch.Tensor]) -> float:
    """Cross-entropy (nats) of the best context-free predictor of the trained label tokens.

    Args:
        label_counts: int ``[V']`` histogram of label ids (None when no label was seen).
    """
    if label_counts is None or int(label_counts.sum()) == 0:
        return float("nan")
    p = label_counts[label_counts > 0].double() / label_counts.sum()
    return float(-(p * p.log()).sum())


def caption_accuracy(checkpoint: str | Path, data: DataConfig, cfg: EvalConfig
                     ) -> tuple[float, int]:
    """Exact-match rate of greedy captions on ``data.eval_sources`` (≤ cfg.max_samples)."""
    model, _ = load_genlip_for_inference(str(checkpoint))
    tokenizer = load_tokenizer(data.text.tokenizer_path)
    samples = list(iter_eval_samples(data, tokenizer, limit=cfg.max_samples))
    acc, captions = caption_exact_match(model, samples, tokenizer,
                                        max_new_tokens=cfg.max_new_tokens,
                                        batch_size=cfg.batch_size)
    for sample, caption in list(zip(samples, captions))[:5]:
        logger.info("eval %s: %r (reference %r)", sample.key, caption, sample.caption)
    return acc, len(samples)
