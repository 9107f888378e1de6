#!/usr/bin/env python
"""Evaluate a GenLIP checkpoint (Megatron, any TP/PP layout, or its HF export) on a run's
held-out data with the same evaluators the training loop runs.

    python tools/evaluate.py runs/demo/checkpoints --config examples/configs/demo_cpu.yaml
    python tools/evaluate.py exports/demo --config examples/configs/demo_cpu.yaml

The run YAML gives the held-out shards (``data.eval_sources``), the image policy and the
evaluation settings (``evaluation.max_samples``, ``max_new_tokens``, ``batch_size``,
``probe_train_samples``, ``sink_samples``, ``gallery_images``; the demo config also enables the
demo's zero-shot task). The tokenizer is the checkpoint's (or ``data.text.tokenizer_path``, or
--tokenizer). Metrics (docs/evaluation.md): caption/loss, caption/perplexity,
caption/exact_match, caption/cider, zeroshot/accuracy, probe/accuracy, seg/miou,
sink/mass_mean and sink/mass_layer_NN.

    python tools/evaluate.py runs/demo/checkpoints --config examples/configs/demo_cpu.yaml \
        --gallery runs/demo/gallery        # also writes the probe gallery page there

Prints the generated captions of the first images, then one line
    EVAL caption/cider=... caption/exact_match=... ... checkpoint=<path>
with the keys the training loop logs. Exit status 2 with ``error: ...`` on bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("evaluate")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="HF export dir, Megatron iter_N dir or save dir")
    p.add_argument("--config", required=True,
                   help="run YAML whose data.eval_sources / evaluation.* to use")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. evaluation.max_samples=50")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--show", type=int, default=5, help="print this many captions")
    p.add_argument("--gallery", metavar="DIR",
                   help="write the probe gallery page (evaluation.gallery_images images, 8 "
                   "when the config has none) to DIR/<checkpoint name>.html")
    return p.parse_args(argv)


def run(args) -> str:
    """Build the suite, evaluate the checkpoint; returns the EVAL line."""
    from genlip_megatron.config import load_config
    from genlip_megatron.data.tokenizer import load_tokenizer
    from genlip_megatron.evaluation.gallery import write_gallery
    from genlip_megatron.evaluation.suite import build_suite, eval_line
    from genlip_megatron.probes.loading import load_genlip_for_inference

    cfg = load_config(args.config, args.set)
    model, tok = load_genlip_for_inference(args.checkpoint, tokenizer=args.tokenizer)
    if tok is None:
        if not cfg.data.text.tokenizer_path:
            raise ValueError("no tokenizer found; pass --tokenizer path/to/tokenizer.json.")
        tok = load_tokenizer(cfg.data.text.tokenizer_path)
    e = cfg.evaluation
    suite = build_suite(cfg.data, tok, max_samples=e.max_samples,
                        max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                        demo_tasks=cfg.demo is not None,
                        probe_train_samples=e.probe_train_samples,
                        sink_samples=e.sink_samples,
                        gallery_images=e.gallery_images or (8 if args.gallery else 0))
    metrics = suite(model)
    if args.gallery:
        name = Path(args.checkpoint).resolve().name
        page = write_gallery(suite.gallery.html, Path(args.gallery) / f"{name}.html")
        print(f"gallery: {page}")
    cap = suite.evaluators[0]
    for s, c in list(zip(cap.samples, cap.last_captions))[:args.show]:
        print(f"{s.key}\t{c}\t(reference: {s.caption})")
    return eval_line(metrics, extra=[f"checkpoint={args.checkpoint}"])


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from genlip_megatron.config.loader import ConfigError
    from genlip_megatron.convert import ConversionError

    try:
        line = run(args)
    except (ConfigError, ConversionError, FileNotFoundError, ValueError) as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr, flush=True)
        return 2
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
