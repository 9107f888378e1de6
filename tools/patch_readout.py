#!/usr/bin/env python
"""Read out patch semantics: top-k LM-head words of patch features, drawn on the image.

    python tools/patch_readout.py exports/genlip-g16 cat.jpg --patches "3,4;7,7;10,2" \
        --out readout.png
    python tools/patch_readout.py runs/demo/checkpoints img.png --patches all --top-k 3 \
        --json readout.json
    python tools/patch_readout.py runs/demo/checkpoints img.png --word circle --out circle.png

Words mode (default): a PNG of the image with its patch grid; up to 24 chosen patches are
numbered and a side panel lists each one's top-k words with probabilities; with more patches
(--patches all) every patch is tinted by its top-1 word and the panel is a legend. Prints
"row,col<TAB>word:prob ..." per patch. --patches: "r,c;r,c", "center" or "all".
Heatmap mode (--word W): the probability of the token W at every patch, as a colour overlay
with a scale; prints the grid of probabilities.
Images are resized with the checkpoint's training policy and size (--policy/--size override).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate_captions import add_image_args, image_config  # noqa: E402

logger = logging.getLogger("patch_readout")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="HF export dir, Megatron iter_N dir or save dir")
    p.add_argument("image", help="image file")
    add_image_args(p)
    p.add_argument("--patches", default="center", help='"r,c;r,c", "center" or "all"')
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--word", help="heatmap mode: probability of this word (one token) per patch")
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
    from genlip_megatron.probes.readout import parse_patches, render_heatmap, word_heatmap, \
        word_token_id

    try:
        if args.top_k < 1:
            raise ValueError(f"--top-k ({args.top_k}) must be >= 1.")
        model, tok = load_genlip_for_inference(
            args.checkpoint, tokenizer=args.tokenizer, device=args.device,
            dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
        if model.config.vision_only:
            raise ValueError(f"{args.checkpoint} is a vision-only export (no LM head to read "
                             "out); use the full export.")
        img = load_image(args.image, config=image_config(args, model, logger))
        if args.word is not None:
            if tok is None:
                raise ValueError("--word needs a tokenizer; pass --tokenizer.")
            tid = word_token_id(tok, args.word)
            probs = word_heatmap(model, img.pixel_values, img.grid, tid)
        else:
            patches = parse_patches(args.patches, img.grid)
            readout = patch_readout(model, img.pixel_values, img.grid, tok, patches, args.top_k)
    except (ConversionError, FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    if args.word is not None:
        out = render_heatmap(img.image, probs, args.word, args.out)
        for row in probs.tolist():
            print(" ".join(f"{p:.3f}" for p in row))
        if args.json:
            Path(args.json).write_text(json.dumps({"word": args.word, "token_id": tid,
                                                   "probs": probs.tolist()}, indent=1))
    else:
        out = render_readout(img.image, readout, args.out, grid=img.grid,
                             title=f"{Path(args.image).name}: top-{args.top_k} words")
        for r in readout:
            words = " ".join(f"{w!r}:{p:.3f}" for w, p in zip(r.words, r.probs))
            print(f"{r.row},{r.col}\t{words}")
        if args.json:
            Path(args.json).write_text(json.dumps([r.__dict__ for r in readout], indent=1))
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
