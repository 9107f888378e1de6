"""End-of-run evaluation: greedy captions on held-out images, and the unigram baseline.

Captioning runs on the logging rank from the final checkpoint through the probes' HF-format module
(``probes.load_genlip_for_inference``), so it works for any TP/PP layout of the run and uses
the same inference code as the CLIs.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path

from genlip_megatron.data.config import DataConfig
from genlip_megatron.training.config import EvalConfig

logger = logging.getLogger(__name__)


def unigram_loss(label_counts: Counter) -> float:
    """Cross-entropy (nats) of the best context-free predictor of the trained label tokens."""
    total = sum(label_counts.values())
    if total == 0:
        return float("nan")
    return -sum(c / total * math.log(c / total) for c in label_counts.values())


def caption_accuracy(checkpoint: str | Path, data: DataConfig, cfg: EvalConfig
                     ) -> tuple[float, int]:
    """Exact-match rate of greedy captions on ``data.eval_sources`` (≤ cfg.max_samples)."""
    from genlip_megatron.data.inference import iter_eval_samples
    from genlip_megatron.data.tokenizer import load_tokenizer
    from genlip_megatron.probes import caption_exact_match, load_genlip_for_inference

    model, _ = load_genlip_for_inference(str(checkpoint))
    tokenizer = load_tokenizer(data.text.tokenizer_path)
    samples = list(iter_eval_samples(data, tokenizer, limit=cfg.max_samples))
    acc, captions = caption_exact_match(model, samples, tokenizer,
                                        max_new_tokens=cfg.max_new_tokens,
                                        batch_size=cfg.batch_size)
    for sample, caption in list(zip(samples, captions))[:5]:
        logger.info("eval %s: %r (reference %r)", sample.key, caption, sample.caption)
    return acc, len(samples)
