#!/usr/bin/env python
"""Convert GenLIP checkpoints between Megatron (torch_dist, any TP/PP) and the released HF format.

Megatron → HF (config.json + one model.safetensors in bf16 + bundled modeling file):
    python tools/convert_checkpoint.py to-hf runs/g16/checkpoints exports/genlip-g16
    python tools/convert_checkpoint.py to-hf runs/g16/checkpoints/iter_0010000 out --dtype fp32 \
        --tokenizer .cache/qwen3/tokenizer.json
    python tools/convert_checkpoint.py to-hf runs/g16/checkpoints exports/g16-vit --vision-only
HF → Megatron (then `training.init_from: ckpt/g16-init` in the run config):
    python tools/convert_checkpoint.py from-hf /models/GenLIP-g16 ckpt/g16-init --tp 4 --pp 2
Print the mapping table:
    python tools/convert_checkpoint.py table --variant g/16

SRC of to-hf is an iter_N directory or a save dir with a `latest` pointer; DST must not exist
(--force overwrites). The export always carries the run's tokenizer (found from the current
folder or any folder above the checkpoint; else pass --tokenizer) and the image preprocessing of
the run (preprocessor_config.json; policy and size also in config.json). It loads with
`AutoModel` (GenLIPModel; GenLIPVisionModel for --vision-only), `AutoModelForCausalLM`
(generate()), `AutoImageProcessor` and `AutoProcessor`, all with trust_remote_code=True.
Errors exit with status 2 and one line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("convert_checkpoint")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="Megatron distributed checkpoint → HF export")
    to_hf.add_argument("src", help="iter_N dir, or a save dir (its `latest`, else its newest "
                       "finished checkpoint)")
    to_hf.add_argument("dst", help="output directory")
    to_hf.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"],
                       help="stored dtype (the released checkpoints are bf16)")
    to_hf.add_argument("--vision-only", action="store_true",
                       help="drop embeddings, in_proj/proj and lm_head (MLLM vision encoder)")
    to_hf.add_argument("--tokenizer", help="tokenizer.json or a dir of tokenizer files to copy "
                                           "(default: the run's data.text.tokenizer_path, "
                                           "found from here or above the checkpoint)")
    to_hf.add_argument("--no-tokenizer", action="store_true",
                       help="allow an export without tokenizer files (weights only)")
    from_hf = sub.add_parser("from-hf", help="HF export → Megatron distributed checkpoint")
    from_hf.add_argument("src", help="HF directory (config.json + model.safetensors)")
    from_hf.add_argument("dst", help="output save dir (receives iter_0000000/ and latest)")
    from_hf.add_argument("--tp", type=int, default=1, help="target tensor-parallel size")
    from_hf.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size")
    from_hf.add_argument("--dtype", default=None, choices=["bf16", "fp32", "fp16"],
                         help="stored dtype (default: keep the source dtype)")
    for s in (to_hf, from_hf):
        s.add_argument("--variant", help="refuse a checkpoint whose shape is not this preset "
                                         "(e.g. g/16)")
        s.add_argument("--force", action="store_true", help="overwrite an existing DST")
        s.add_argument("--no-progress", action="store_true", help="no progress bar")
    table = sub.add_parser("table", help="print the Megatron ⇄ HF mapping table")
    table.add_argument("--variant", default="L/16")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from genlip_megatron.config import decode_variant
    from genlip_megatron.convert import ConversionError, hf_to_megatron, mapping_registry, \
        megatron_to_hf

    try:
        if args.command == "table":
            print(mapping_registry(decode_variant(args.variant)).table())
        elif args.command == "to-hf":
            megatron_to_hf(args.src, args.dst, dtype=args.dtype, vision_only=args.vision_only,
                           tokenizer=args.tokenizer, variant=args.variant, force=args.force,
                           progress=not args.no_progress,
                           require_tokenizer=not args.no_tokenizer)
        else:
            hf_to_megatron(args.src, args.dst, tp=args.tp, pp=args.pp, dtype=args.dtype,
                           variant=args.variant, force=args.force,
                           progress=not args.no_progress)
    except (ConversionError, FileExistsError, FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
