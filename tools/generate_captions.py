#!/usr/bin/env python
"""Caption images with a GenLIP checkpoint ("let ViT speak"), Megatron or HF.

    python tools/generate_captions.py exports/genlip-g16 img1.jpg img2.png
    python tools/generate_captions.py runs/demo/checkpoints img1.png img2.png
    python tools/generate_captions.py exports/genlip-g16 cat.jpg --sample --temperature 0.7 \
        --top-p 0.9 --seed 0 --max-new-tokens 128 --json captions.jsonl

Caption accuracy on a run's held-out shards (data.eval_sources of its YAML), e.g. the demo's,
for a Megatron checkpoint and its HF export alike:
    python tools/generate_captions.py runs/demo/checkpoints --eval-config \
        examples/configs/demo_cpu.yaml --limit 200
    python tools/generate_captions.py exports/demo --eval-config examples/configs/demo_cpu.yaml

Images are resized as in training: the policy and size recorded in the checkpoint (the run's
data.image for Megatron checkpoints, preprocessor_config.json for exports; e.g. 96 px for the
CPU demo); --policy/--size override. The tokenizer is the checkpoint's (found from here or above
the checkpoint), or --tokenizer. Greedy by default; stops at <|im_end|> or after
--max-new-tokens (≤ 256). Prints one "path<TAB>caption" line per image (and optionally writes
jsonl); with --eval-config the last line is "EVAL caption_exact_match=<fraction> n=<images>".
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("generate_captions")


def add_image_args(p: argparse.ArgumentParser) -> None:
    """Image preprocessing options shared by the probe CLIs (default: the checkpoint's)."""
    p.add_argument("--policy", default=None, choices=["fixed", "native"],
                   help="override the checkpoint's resize policy: fixed square (stage 1) or "
                        "native smart-resize (stage 2)")
    p.add_argument("--size", type=int, default=None,
                   help="override the fixed side in pixels (default: the training size recorded "
                        "in the checkpoint; implies --policy fixed)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")


def image_config(args, model, log: logging.Logger = logger):
    """The checkpoint's training image preprocessing, with --policy/--size overrides."""
    from genlip_megatron.probes import checkpoint_image_config

    cfg = checkpoint_image_config(args.checkpoint)
    if args.size is not None:
        cfg.policy, cfg.fixed_size = "fixed", args.size
    if args.policy is not None:
        cfg.policy = args.policy
    cfg.patch_size = model.config.patch_size
    log.info("images: %s (%s)", f"fixed {cfg.fixed_size}x{cfg.fixed_size}"
                if cfg.policy == "fixed" else
                f"native smart-resize, {cfg.min_pixels}..{cfg.max_pixels} px",
                "overridden" if args.size or args.policy else "from the checkpoint")
    return cfg


def parse_args(argv=None) -> argparse.Namespace:
    from genlip_megatron.config.data import DEFAULT_PROMPT

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="HF export dir, Megatron iter_N dir or save dir")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--eval-config", help="run YAML: caption its data.eval_sources and report "
                                         "the exact-match accuracy against their captions")
    p.add_argument("--limit", type=int, default=None, help="--eval-config: at most N images")
    add_image_args(p)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", help="also write {image, caption} lines to this jsonl file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from genlip_megatron.convert import ConversionError
    from genlip_megatron.probes import generate_captions, load_genlip_for_inference, load_image

    try:
        model, tok = load_genlip_for_inference(
            args.checkpoint, tokenizer=args.tokenizer, device=args.device,
            dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
        if tok is None:
            raise ValueError("no tokenizer found; pass --tokenizer path/to/tokenizer.json.")
        if args.eval_config:
            return _evaluate(args, model, tok)
        if not args.images:
            raise ValueError("give image files, or --eval-config to caption held-out shards.")
        cfg = image_config(args, model)
        images = [load_image(f, config=cfg) for f in args.images]
        caps = generate_captions(model, [im.as_input() for im in images], tok, args.prompt,
                                 **_decoding(args))
    except (ConversionError, FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    for f, c in zip(args.images, caps):
        print(f"{f}\t{c}")
    if args.json:
        with open(args.json, "w") as fh:
            for f, c in zip(args.images, caps):
                fh.write(json.dumps({"image": f, "caption": c}) + "\n")
    return 0


def _decoding(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, greedy=not args.sample,
                temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                batch_size=args.batch_size)


def _evaluate(args, model, tok) -> int:
    """Exact-match caption accuracy on ``data.eval_sources`` of a run config."""
    from genlip_megatron.config import load_config
    from genlip_megatron.data.inference import iter_eval_samples
    from genlip_megatron.probes import caption_exact_match

    cfg = load_config(args.eval_config)
    samples = list(iter_eval_samples(cfg.data, tok, limit=args.limit))
    if not samples:
        raise ValueError(f"{args.eval_config}: data.eval_sources yielded no samples.")
    acc, caps = caption_exact_match(model, samples, tok, **_decoding(args))
    hits = [c == s.caption.strip() for c, s in zip(caps, samples)]
    for s, c, ok in zip(samples, caps, hits):
        print(f"{s.key}\t{'OK ' if ok else 'BAD'}\t{c}\t(ref: {s.caption})")
    if args.json:
        with open(args.json, "w") as fh:
            for s, c in zip(samples, caps):
                fh.write(json.dumps({"key": s.key, "caption": c, "reference": s.caption}) + "\n")
    print(f"EVAL caption_exact_match={acc:.4f} n={len(hits)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
