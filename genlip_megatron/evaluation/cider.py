"""CIDEr-D caption score (Vedantam et al., 2015, the "-D" variant used by the COCO server).

Implemented here (about 60 lines) instead of pulling pycocoevalcap, whose tokenizer and METEOR /
SPICE scorers need Java. The definition, per candidate c with references S:

    CIDEr-D_n(c, S) = 10 / |S| · Σ_s  min(g_n(c), g_n(s)) · g_n(s) / (‖g_n(c)‖ ‖g_n(s)‖)
                                     · exp(−(l_c − l_s)² / (2 σ²))

where g_n are TF-IDF vectors of n-grams (term frequency × log(N / document frequency), the
document frequencies counted over the reference sets of the whole evaluated corpus), the
``min`` clips candidate counts at the reference's (no reward for repeating n-grams), σ = 6
penalises length differences, and the score is the mean over n = 1..4. Text is lower-cased and
split on whitespace after removing punctuation (the COCO PTB tokenizer's effect on plain
English captions). Corpus score = mean over images.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

__all__ = ["cider_d", "tokenize"]

_PUNCT = re.compile(r"[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lower-cased words without punctuation."""
    return _PUNCT.sub(" ", text.lower()).split()


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _vector(counts: Counter, df: Counter, log_n: float) -> tuple[dict, float]:
    """TF-IDF weights of the n-grams and their norm."""
    vec = {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in counts.items()}
    return vec, math.sqrt(sum(v * v for v in vec.values()))


def _similarity(cand: tuple[dict, float], ref: tuple[dict, float], delta: int,
                sigma: float) -> float:
    (vc, nc), (vr, nr) = cand, ref
    dot = sum(min(w, vr[g]) * vr[g] for g, w in vc.items() if g in vr)
    if nc == 0 or nr == 0:
        return 0.0
    return dot / (nc * nr) * math.exp(-(delta ** 2) / (2 * sigma ** 2))


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], *, n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
    """Corpus CIDEr-D and the per-image scores.

    Args:
        candidates: one generated caption per image.
        references: the reference captions of each image (one or more).
        n: largest n-gram order.
        sigma: length-penalty width.

    Raises:
        ValueError: lengths differ, or an image has no reference.
    """
    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"cider_d needs one reference list per candidate ({len(candidates)} "
                         f"candidates, {len(references)} reference lists), at least one.")
    if any(not refs for refs in references):
        raise ValueError("cider_d: every image needs at least one reference caption.")
    ref_words = [[tokenize(r) for r in refs] for refs in references]
    cand_words = [tokenize(c) for c in candidates]
    log_n = math.log(float(len(references)))
    per_image = [0.0] * len(candidates)
    for k in range(1, n + 1):
        df = Counter()
        for refs in ref_words:  # document = an image's reference set
            df.update({g for r in refs for g in _ngrams(r, k)})
        for i, (cw, refs) in enumerate(zip(cand_words, ref_words)):
            cv = _vector(_ngrams(cw, k), df, log_n)
            sims = [_similarity(cv, _vector(_ngrams(r, k), df, log_n), len(cw) - len(r), sigma)
                    for r in refs]
            per_image[i] += 10.0 * sum(sims) / len(refs) / n
    return sum(per_image) / len(per_image), per_image
