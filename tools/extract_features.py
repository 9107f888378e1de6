#!/usr/bin/env python
"""Extract vision-encoder features (final LayerNorm output) of images with a GenLIP checkpoint.

    python tools/extract_features.py exports/genlip-g16-vit imgs/*.jpg --out feats.safetensors
    python tools/extract_features.py runs/demo/checkpoints imgs/*.png --pool \
        --out pooled.safetensors

Images are resized with the checkpoint's training policy and size (--policy/--size override).

Writes ``features/<i>`` ([gh*gw, H], or [H] with --pool) and ``grid/<i>`` tensors; the image
paths are in the file's metadata ("names", one per line, same order). Works with vision-only
exports.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate_captions import add_image_args, image_config  # noqa: E402

logger = logging.getLogger("extract_features")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="HF export dir (full or vision-only) or Megatron checkpoint")
    p.add_argument("images", nargs="+", help="image files")
    add_image_args(p)
    p.add_argument("--pool", action="store_true", help="mean-pool patches into one vector")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="features.safetensors")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from genlip_megatron.convert import ConversionError
    from genlip_megatron.probes import encode_images, load_genlip_for_inference, load_image, \
        save_features

    try:
        model, _ = load_genlip_for_inference(
            args.checkpoint, tokenizer=args.tokenizer, device=args.device,
            dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
        cfg = image_config(args, model, logger)
        images = [load_image(f, config=cfg) for f in args.images]
        feats = encode_images(model, [im.as_input() for im in images], args.batch_size,
                              pool=args.pool)
    except (ConversionError, FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    out = save_features(args.out, feats, [im.grid for im in images], args.images)
    logger.info("wrote %d feature tensors (%s) to %s", len(feats), tuple(feats[0].shape), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
