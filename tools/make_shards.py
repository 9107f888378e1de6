#!/usr/bin/env python
"""Build webdataset tar shards from an image folder and captions, or from stage-2 conversations.

Stage 1 (caption json), captions as jsonl or csv with an image path column:
    python tools/make_shards.py --images /data/imgs --captions caps.jsonl --out /data/shards
    python tools/make_shards.py --images /data/imgs --captions caps.csv --out /data/shards \
        --image-field file --caption-field text --samples-per-shard 5000 --dali-index
Stage 2 (conversations json), one jsonl line per sample with an image path:
    python tools/make_shards.py --images /data/imgs --conversations conv.jsonl --out /data/s2

jsonl lines look like {"image": "a/b.jpg", "caption": "..."} or {"image": "a/b.jpg",
"conversations": [{"from": "human", "value": "<image>..."}, {"from": "gpt", "value": "..."}]}
(``conversation`` is accepted too). Image bytes are stored unchanged under their extension
(jpg/jpeg/png/webp); keys are the running sample index. Rows whose image is missing are
reported and skipped. --dali-index also writes DALI's .idx files (for fn.readers.webdataset;
genlip_megatron's reader does not need them).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genlip_megatron.data.shard_writer import write_shards  # noqa: E402

logger = logging.getLogger("make_shards")
_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="folder the image paths are relative to")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--captions", help="stage-1 captions: .jsonl or .csv")
    src.add_argument("--conversations", help="stage-2 conversations: .jsonl")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--image-field", default="image", help="column/key holding the image path")
    p.add_argument("--caption-field", default="caption", help="column/key holding the caption")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--prefix", default="shard", help="shard file name prefix")
    p.add_argument("--dali-index", action="store_true", help="also write DALI .idx files")
    return p.parse_args(argv)


def _rows(path: Path) -> Iterator[dict]:
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f)
        return
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    logger.warning("%s:%d: bad json line skipped (%s)", path, line_no, exc)


def _meta(row: dict, args: argparse.Namespace) -> dict | None:
    if args.captions:
        caption = row.get(args.caption_field)
        return None if caption is None else {"caption": caption}
    turns = row.get("conversations", row.get("conversation"))
    return None if turns is None else {"conversations": turns}


def samples(args: argparse.Namespace) -> Iterator[dict]:
    """Webdataset samples for every usable input row."""
    root = Path(args.images)
    table = Path(args.captions or args.conversations)
    index = 0
    for row in _rows(table):
        rel = row.get(args.image_field)
        meta = _meta(row, args)
        path = root / rel if rel else None
        ext = _EXTS.get(path.suffix.lower()) if path else None
        if meta is None or path is None or ext is None or not path.is_file():
            logger.warning("skipping row %r: missing image file, unknown extension or text", row)
            continue
        yield {"__key__": f"{index:09d}", ext: path.read_bytes(), "json": meta}
        index += 1


def main(argv=None) -> list[str]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = write_shards(samples(args), args.out, samples_per_shard=args.samples_per_shard,
                         prefix=args.prefix, dali_index=args.dali_index)
    print("\n".join(paths))
    return paths


if __name__ == "__main__":
    main()
