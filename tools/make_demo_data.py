#!/usr/bin/env python
"""Generate the synthetic captioning set of the CPU demo: train + eval shards + tokenizer.

    python tools/make_demo_data.py --out data/demo               # 4000 train, 400 eval
    python tools/make_demo_data.py --out data/demo --train 8000 --p-two 0.0 --p-word 0.0

Writes ``OUT/train/shard-*.tar``, ``OUT/eval/shard-*.tar`` (held out: a different seed),
``OUT/tokenizer.json`` (a tiny byte-level BPE trained on every caption phrase and the prompt,
with the Qwen special tokens) and ``OUT/meta.json``. Images are coloured shapes on a 3×3 grid
(genlip_megatron/data/synthetic.py) with exact template captions; sizes and aspect ratios vary
(the demo config resizes them with the fixed policy, e.g. data.image.fixed_size: 64). Every
sample also carries its probe labels: ``cls`` (the cell of the first shape) and ``seg.png`` (per
pixel: the shape or text drawn there, else the 3×3 region; docs/evaluation.md, "The demo's
labelled tasks (probes)").
Deterministic from --seed; a few thousand samples take seconds.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genlip_megatron.config.data import DEFAULT_PROMPT  # noqa: E402
from genlip_megatron.data.demo import generate_demo_data  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/demo", help="output directory")
    p.add_argument("--train", type=int, default=4000, help="training samples")
    p.add_argument("--eval", type=int, default=400, help="held-out samples")
    p.add_argument("--samples-per-shard", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["caption", "conversations"], default="caption",
                   help="stage-1 caption json or stage-2 conversations json")
    p.add_argument("--p-two", type=float, default=0.3, help="probability of a second shape")
    p.add_argument("--p-word", type=float, default=0.1, help="probability of a drawn word")
    p.add_argument("--min-side", type=int, default=64, help="shortest long side in pixels")
    p.add_argument("--max-side", type=int, default=192, help="longest long side in pixels")
    p.add_argument("--vocab-size", type=int, default=512, help="tiny BPE vocabulary size")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt the tokenizer must cover")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return generate_demo_data(
        Path(args.out), num_train=args.train, num_eval=args.eval, seed=args.seed,
        vocab_size=args.vocab_size, prompt=args.prompt, fmt=args.format, p_two=args.p_two,
        p_word=args.p_word, min_side=args.min_side, max_side=args.max_side,
        samples_per_shard=args.samples_per_shard)


if __name__ == "__main__":
    main()
