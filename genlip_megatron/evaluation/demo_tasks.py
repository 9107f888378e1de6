"""Labelled tasks of the synthetic demo set, read off its exact captions.

The demo generator (``data/synthetic.py``) writes a caption that states every shape, colour and
position, so single-shape held-out images (``"a red circle at the top left."``, no second shape,
no word) carry their colour × shape class (6 × 4 = 24 classes, chance 1/24).

Zero-shot: each class is scored with the caption prefix ``"a red circle"`` (article, colour,
shape): a random-init model cannot prefer the right words, a trained one must read colour and
shape off the image to do so.
"""

from __future__ import annotations

import re
from typing import Sequence

from genlip_megatron.data.inference import EvalSample
from genlip_megatron.data.synthetic import COLORS, POSITIONS, SHAPES
from genlip_megatron.data.tokenizer import TextTokenizer
from genlip_megatron.evaluation.zeroshot import ZeroShotTask, build_task

__all__ = ["DEMO_CLASSES", "demo_class", "demo_zero_shot_task"]

DEMO_CLASSES = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for c in COLORS for s in SHAPES]
"""Class names, colour-major: the caption prefix that names the class."""

_SINGLE = re.compile(r"^(an? \w+ \w+) at the (?:%s)\.$" % "|".join(POSITIONS))


def demo_class(caption: str) -> int:
    """Class index of a single-shape demo caption, -1 for any other caption."""
    m = _SINGLE.match(caption.strip())
    if m is None or m.group(1) not in DEMO_CLASSES:
        return -1
    return DEMO_CLASSES.index(m.group(1))


def demo_zero_shot_task(samples: Sequence[EvalSample], tokenizer: TextTokenizer
                        ) -> tuple[list[EvalSample], list[int], ZeroShotTask]:
    """(single-shape samples, their class ids, the 24-class task with template ``"{}"``)."""
    picked = [(s, demo_class(s.caption)) for s in samples]
    picked = [(s, c) for s, c in picked if c >= 0]
    task = build_task(tokenizer, DEMO_CLASSES, ("{}",))
    return [s for s, _ in picked], [c for _, c in picked], task
