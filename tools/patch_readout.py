#!/usr/bin/env python
"""Read out patch semantics: top-k LM-head tokens of chosen patch features, drawn on the image.

    python tools/patch_readout.py exports/genlip-g16 cat.jpg --patches "3,4;7,7;10,2" \
        --out readout.png
    python tools/patch_readout.py runs/demo/checkpoints img.png --patches all --top-k 3 \
        --tokenizer data/demo/tokenizer.json --size 64 --json readout.json

Writes a PNG with the chosen patches boxed and labelled with their top words, and prints
"row,col<TAB>word:prob ..." per patch. --patches: "r,c;r,c", "center" or "all".
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate_captions import add_image_args  # noqa: E402

logger = logging.getLogger("patch_readout")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="HF export dir, Megatron iter_N dir or save dir")
    p.add_argument("image", help="image file")
    add_image_args(p)
    p.add_argument("--patches", default="center", help='"r,c;r,c", "center" or "all"')
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--out", default="readout.png", help="output PNG")
    p.add_argument("--json", help="also write the readout as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from genlip_megatron.convert import ConversionError
    from genlip_megatron.probes import load_genlip_for_inference, load_image, patch_readout, \
        render_readout
    from genlip_megatron.probes.readout import parse_patches

    try:
        model, tok = load_genlip_for_inference(
            args.checkpoint, tokenizer=args.tokenizer, device=args.device,
            dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
        img = load_image(args.image, policy=args.policy, size=args.size,
                         patch_size=model.config.patch_size)
        patches = parse_patches(args.patches, img.grid)
        readout = patch_readout(model, img.pixel_values, img.grid, tok, patches, args.top_k)
    except (ConversionError, FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    out = render_readout(img.image, readout, args.out, patch_size=model.config.patch_size)
    for r in readout:
        words = " ".join(f"{w!r}:{p:.3f}" for w, p in zip(r.words, r.probs))
        print(f"{r.row},{r.col}\t{words}")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in readout], indent=1))
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
