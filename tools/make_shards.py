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

Labelled shards (probes, docs/evaluation.md): a class label per sample (``cls``, the class id
as decimal text) and/or a segmentation mask (``seg.png``, one channel of class ids):
    python tools/make_shards.py --images /data/train_tree --class-folders --out /data/cls
    python tools/make_shards.py --images /data/val_tree --class-folders \
        --classes /data/cls/classes.json --out /data/cls_val
    python tools/make_shards.py --images /data/imgs --masks /data/masks --out /data/seg
--class-folders: one sub-folder per class (images anywhere below it); class ids follow
--classes (a json list or a text file, one name per line) or the sorted folder names, written
to OUT/classes.json (pass it as --classes for the held-out split so the ids agree); the caption
is --caption-template with the class name. --masks DIR: the mask of IMAGES/a/b.jpg is
DIR/a/b.png (same relative path and stem), the same size as the image; combines with every
mode (alone, every image below --images is a sample captioned --caption-template with "").
Mismatches (image without mask, mask of another size or not single-channel, mask without an
image, folder not in --classes) are skipped and counted; the tool ends with one line
``make_shards: wrote N samples in K shards to OUT; skipped <reason>=<count> ...``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genlip_megatron.data.shard_writer import write_shards  # noqa: E402

logger = logging.getLogger("make_shards")
_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="folder the image paths are relative to")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--captions", help="stage-1 captions: .jsonl or .csv")
    src.add_argument("--conversations", help="stage-2 conversations: .jsonl")
    src.add_argument("--class-folders", action="store_true",
                     help="--images holds one folder per class: label each image (cls)")
    p.add_argument("--classes", help="class names in id order: json list or one per line "
                   "(default: the sorted class folders)")
    p.add_argument("--masks", help="folder of single-channel PNG masks matched by relative "
                   "path and stem (seg.png)")
    p.add_argument("--caption-template", default="a photo of a {}.",
                   help="caption of --class-folders / --masks-only samples ({} = class name)")
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


def _table_items(args: argparse.Namespace, skipped: Counter
                 ) -> Iterator[tuple[Path, dict, Optional[int]]]:
    """(image path, json, no label) for every usable caption/conversation row."""
    root = Path(args.images)
    for row in _rows(Path(args.captions or args.conversations)):
        rel = row.get(args.image_field)
        meta = _meta(row, args)
        path = root / rel if rel else None
        ext = _EXTS.get(path.suffix.lower()) if path else None
        if meta is None or path is None or ext is None or not path.is_file():
            logger.warning("skipping row %r: missing image file, unknown extension or text", row)
            skipped["bad_row"] += 1
            continue
        yield path, meta, None


def _images_below(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in _EXTS and p.is_file())


def read_classes(path: str) -> list[str]:
    """Class names from a json list or a text file with one name per line."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        names = json.loads(text)
    except json.JSONDecodeError:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(names, list) or not names or len(set(map(str, names))) != len(names):
        raise ValueError(f"--classes {path}: want a non-empty list of distinct class names.")
    return [str(n) for n in names]


def _folder_items(args: argparse.Namespace, classes: list[str], skipped: Counter
                  ) -> Iterator[tuple[Path, dict, Optional[int]]]:
    """(image path, caption json, class id) for every image below a known class folder."""
    ids = {name: i for i, name in enumerate(classes)}
    for folder in sorted(p for p in Path(args.images).iterdir() if p.is_dir()):
        images = _images_below(folder)
        if folder.name not in ids:
            logger.warning("skipping folder %s (%d images): not in --classes", folder,
                           len(images))
            skipped["unknown_class"] += len(images)
            continue
        caption = args.caption_template.format(folder.name)
        for path in images:
            yield path, {"caption": caption}, ids[folder.name]


def _mask_member(image: Path, args: argparse.Namespace, skipped: Counter,
                 used: set) -> Optional[bytes]:
    """``seg.png`` bytes of ``image`` (None: counted skip)."""
    from PIL import Image

    rel = image.relative_to(args.images).with_suffix(".png")
    mask = Path(args.masks) / rel
    if not mask.is_file():
        skipped["no_mask"] += 1
        return None
    used.add(rel)
    try:
        with Image.open(mask) as m, Image.open(image) as im:
            if m.mode not in ("L", "P"):
                skipped["mask_not_single_channel"] += 1
                return None
            if m.size != im.size:
                logger.warning("skipping %s: mask %s is %dx%d, the image %dx%d", image, mask,
                               *m.size, *im.size)
                skipped["mask_size"] += 1
                return None
    except OSError as exc:
        logger.warning("skipping %s: %s", image, exc)
        skipped["unreadable"] += 1
        return None
    return mask.read_bytes()


def samples(args: argparse.Namespace, skipped: Optional[Counter] = None) -> Iterator[dict]:
    """Webdataset samples for every usable input row or image (skips counted in ``skipped``)."""
    skipped = Counter() if skipped is None else skipped
    if args.captions or args.conversations:
        items = _table_items(args, skipped)
    elif args.class_folders:
        items = _folder_items(args, args.class_names, skipped)
    else:
        items = ((p, {"caption": args.caption_template.format("")}, None)
                 for p in _images_below(Path(args.images)))
    used: set = set()
    index = 0
    for path, meta, label in items:
        sample = {"__key__": f"{index:09d}", _EXTS[path.suffix.lower()]: path.read_bytes(),
                  "json": meta}
        if label is not None:
            sample["cls"] = str(label)
        if args.masks:
            mask = _mask_member(path, args, skipped, used)
            if mask is None:
                continue
            sample["seg.png"] = mask
        yield sample
        index += 1
    if args.masks:   # masks nobody asked for: a naming mismatch the user should see
        skipped["mask_without_image"] += sum(
            1 for m in Path(args.masks).rglob("*.png") if m.relative_to(args.masks) not in used)


def _check_args(args: argparse.Namespace) -> None:
    """Input modes and folders; sets ``args.class_names`` (raises ValueError)."""
    if not (args.captions or args.conversations or args.class_folders or args.masks):
        raise ValueError("nothing to read: pass --captions, --conversations, --class-folders "
                         "or --masks.")
    for flag in ("images", "masks"):
        where = getattr(args, flag)
        if where and not Path(where).is_dir():
            raise ValueError(f"--{flag} {where} is not a folder.")
    args.class_names = None
    if args.class_folders:
        args.class_names = read_classes(args.classes) if args.classes else sorted(
            p.name for p in Path(args.images).iterdir() if p.is_dir())
        if not args.class_names:
            raise ValueError(f"--class-folders: {args.images} has no sub-folders (one per "
                             "class).")


def main(argv=None) -> list[str]:
    """Write the shards; returns their paths. Bad arguments: ``error: ...``, exit status 2."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        _check_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    skipped: Counter = Counter()
    paths = write_shards(samples(args, skipped), args.out,
                         samples_per_shard=args.samples_per_shard, prefix=args.prefix,
                         dali_index=args.dali_index)
    if args.class_names is not None:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "classes.json").write_text(json.dumps(args.class_names, indent=1))
    print("\n".join(paths))
    written = sum(1 for _ in _keys(paths))
    print(f"make_shards: wrote {written} samples in {len(paths)} shards to {args.out}; skipped"
          + ("".join(f" {k}={v}" for k, v in sorted(skipped.items())) or " none"), flush=True)
    return paths


def _keys(paths: list[str]) -> Iterator[str]:
    import tarfile

    for path in paths:
        with tarfile.open(path) as tf:
            yield from {m.name.split(".", 1)[0] for m in tf.getmembers()}


if __name__ == "__main__":
    main()
