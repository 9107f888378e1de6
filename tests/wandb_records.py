"""Read a W&B offline run file (``run-<id>.wandb``) without network or wandb's service.

The file is a LevelDB-style log (wandb's ``datastore`` format): a 7-byte header (``:W&B``,
magic 0xBEE1, version 1), then 32 KiB blocks of records ``crc32(4) length(2) type(1) data``
(type 1 full, 2 first, 3 middle, 4 last fragment); each record is a protobuf ``Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK, _HEADER = 32768, 7


def records(path: Path) -> list:
    """The protobuf records of one offline run file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:7]
    out, pos, parts = [], _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(parts)
            out.append(rec)
    return out


def history(path: Path) -> tuple[str, dict[int, dict]]:
    """(run id, step → {key: value}) of one offline run file."""
    run_id, steps = "", {}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run_id = rec.run.run_id
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in rec.history.item}
            steps[int(items.pop("_step"))] = items
    return run_id, steps
