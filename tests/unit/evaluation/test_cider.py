"""CIDEr-D: a hand-computed two-image corpus, perfect matches, clipping and input errors."""

from __future__ import annotations

import math

import pytest

from genlip_megatron.evaluation.cider import cider_d, tokenize


def test_hand_computed_corpus():
    # unigrams: sim 2/sqrt(10); bigrams: 1/sqrt(2); no trigram in the reference: 0
    score, per = cider_d(["a b b", "c d"], [["a b"], ["c d"]])
    want0 = 10 / 4 * math.exp(-1 / 72) * (2 / math.sqrt(10) + 1 / math.sqrt(2))
    assert per[0] == pytest.approx(want0, rel=1e-12)
    assert per[1] == pytest.approx(10 / 4 * 2)          # exact match, n = 1, 2 only
    assert score == pytest.approx((per[0] + per[1]) / 2)


def test_exact_match_scores_ten_and_repetition_is_clipped():
    refs = [["a red circle at the top left."], ["a blue star at the center."],
            ["a green square at the bottom."]]
    score, per = cider_d([r[0] for r in refs], refs)
    assert score == pytest.approx(10.0) and all(p == pytest.approx(10.0) for p in per)
    padded, _ = cider_d(["a red red red circle at the top left.", refs[1][0], refs[2][0]], refs)
    assert padded < score


def test_tokenize_and_errors():
    assert tokenize('The word "Sun" is here.') == ["the", "word", "sun", "is", "here"]
    with pytest.raises(ValueError, match="one reference list per candidate"):
        cider_d(["a"], [])
    with pytest.raises(ValueError, match="at least one reference"):
        cider_d(["a"], [[]])
