"""The CPU demo's synthetic data set: train + held-out shards and a tiny BPE tokenizer.

Used by ``tools/make_demo_data.py`` and by the trainer when the demo config's data are missing.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from genlip_megatron.config.data import DEFAULT_PROMPT
from genlip_megatron.data.shard_writer import write_shards
from genlip_megatron.data.synthetic import LABELS_VERSION, PROBE_CLASSES, SEG_CLASSES, \
    caption_corpus, demo_samples
from genlip_megatron.data.tokenizer import train_tiny_bpe

logger = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 1_000_003  # held-out images come from a different seed


def generate_demo_data(out: str | Path, *, num_train: int = 4000, num_eval: int = 400,
                       seed: int = 0, vocab_size: int = 512, prompt: str = DEFAULT_PROMPT,
                       fmt: str = "caption", p_two: float = 0.3, p_word: float = 0.1,
                       min_side: int = 64, max_side: int = 192,
                       samples_per_shard: int = 250) -> dict:
    """Write ``out/train/*.tar``, ``out/eval/*.tar``, ``out/tokenizer.json``, ``out/meta.json``.

    Every sample carries its labels (``cls``: the probe class, ``seg.png``: the per-pixel
    mask; ``data/synthetic.py``), listed with the class names and ``labels_version``
    (:data:`LABELS_VERSION`) in ``meta.json``.

    ``meta.json`` is written last, so its presence means the set is complete.
    """
    out = Path(out)
    t0 = time.time()
    common = dict(fmt=fmt, p_two=p_two, p_word=p_word, min_side=min_side, max_side=max_side,
                  labelled=True)
    train = write_shards(demo_samples(num_train, seed, key_prefix="t", **common),
                         out / "train", samples_per_shard=samples_per_shard)
    held = write_shards(demo_samples(num_eval, seed + EVAL_SEED_OFFSET, key_prefix="e", **common),
                        out / "eval", samples_per_shard=samples_per_shard)
    tok = train_tiny_bpe(caption_corpus() + [prompt], vocab_size, out / "tokenizer.json")
    meta = {"train_samples": num_train, "eval_samples": num_eval, "train_shards": len(train),
            "eval_shards": len(held), "vocab_size": tok.vocab_size, "seed": seed, "format": fmt,
            "p_two": p_two, "p_word": p_word, "min_side": min_side, "max_side": max_side,
            "classes": list(PROBE_CLASSES), "seg_classes": list(SEG_CLASSES),
            "labels_version": LABELS_VERSION}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    logger.info("demo data in %s (%.1f s): %d train / %d eval samples, tokenizer %d ids",
                out, time.time() - t0, num_train, num_eval, tok.vocab_size)
    return meta
