"""Writing webdataset tar shards (used by tools/make_shards.py, tools/make_demo_data.py, tests).

A sample is a dict ``{"__key__": str, "jpg"|"png"|"webp": bytes, "json": bytes | dict, ...}``;
members are written in key order with ``webdataset.TarWriter``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Optional

logger = logging.getLogger(__name__)


def _encode_members(sample: dict) -> dict:
    out = {}
    for k, v in sample.items():
        if k == "json" and isinstance(v, (dict, list)):
            v = json.dumps(v, ensure_ascii=False).encode("utf-8")
        elif isinstance(v, str) and not k.startswith("__"):
            v = v.encode("utf-8")
        out[k] = v
    return out


def write_shards(samples: Iterable[dict], out_dir: str | Path, *, samples_per_shard: int = 1000,
                 prefix: str = "shard", dali_index: bool = False) -> list[str]:
    """Write ``samples`` into ``out_dir/{prefix}-000000.tar``, ... and return the paths.

    Args:
        samples: webdataset sample dicts (``__key__`` must be unique and contain no dot).
        out_dir: created if missing.
        samples_per_shard: samples per tar file.
        prefix: shard file name prefix.
        dali_index: also write a DALI ``.idx`` next to each tar (for ``fn.readers.webdataset``;
            genlip_megatron's own reader does not need them).
    """
    from webdataset import TarWriter

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    writer: Optional[TarWriter] = None
    count = 0
    for sample in samples:
        if "." in sample["__key__"]:
            raise ValueError(f"sample key {sample['__key__']!r} contains a dot, which webdataset "
                             "reads as an extension separator.")
        if writer is None or count == samples_per_shard:
            if writer is not None:
                writer.close()
            paths.append(str(out_dir / f"{prefix}-{len(paths):06d}.tar"))
            # fixed mtime: the same samples give byte-identical shards
            writer, count = TarWriter(paths[-1], mtime=0.0), 0
        writer.write(_encode_members(sample))
        count += 1
    if writer is not None:
        writer.close()
    if dali_index:
        for path in paths:
            write_dali_index(path)
    logger.info("wrote %d shards to %s", len(paths), out_dir)
    return paths


def write_dali_index(tar_path: str | Path) -> str:
    """Write DALI's webdataset index (``wds2idx``) for one tar; returns the .idx path."""
    try:
        from wds2idx import IndexCreator  # installed with nvidia-dali
    except ImportError as exc:
        raise ImportError("DALI index files need NVIDIA DALI (`pip install "
                          "nvidia-dali-cuda120`), which ships wds2idx.") from exc
    idx = str(Path(tar_path).with_suffix(".idx"))
    with IndexCreator(str(tar_path), idx, verbose=False) as creator:
        creator.create_index()
    return idx
