"""Megatron torch_dist checkpoints on one CPU process: read tensors by key, write lazily.

Layout written by ``megatron.core.dist_checkpointing`` (torch_dist backend, checked on 0.16.1 and
0.19.2):
``<dir>/metadata.json`` (backend names), the non-tensor state (``config``, ``layout``,
``training_state``, …: ``common.pt`` in 0.16.1, a ``common_state`` object inside the DCP files in
0.19.2, which still reads ``common.pt``; both read through megatron's public
``load_common_state_dict``) and a ``torch.distributed.checkpoint`` directory (``.metadata`` +
``__<rank>_<i>.distcp``). Tensors are stored as GLOBAL tensors cut into the chunks each rank
saved, so a reader needs no process group of the saving size:

- transformer layers are stacked: ``decoder.layers.<suffix>`` has shape ``[num_layers, ...]``
  (global layer index; megatron's default "homogeneous layers" sharding). Per-layer keys
  ``decoder.layers.<i>.<suffix>`` (``non_homogeneous_layers``) are read as well;
- the global fused tensors equal the TP=1 tensors (``linear_qkv`` per-group rows; GLU
  ``linear_fc1`` = cat[gate, up] because megatron saves gate and up shards separately);
- ``optimizer.*`` tensors and ShardedObjects (RNG, data-loader state, ``_extra_state``) are not
  model weights and are skipped.

:class:`DistCheckpointReader` reads one layer slice of one tensor at a time (the format
reshards). :func:`write_dist_checkpoint` writes the same layout, chunked as a TP=tp run would
save it, pulling each tensor from a producer callback only when its bytes are written, plus the
``_extra_state`` ShardedObjects megatron's loader expects (value None) and ``common.pt``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from megatron.core.dist_checkpointing import load_common_state_dict
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, ChunkStorageMetadata, \
    MetadataIndex, TensorProperties, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlan, \
    TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from genlip_megatron.compat.versions import torch_at_least
from genlip_megatron.convert.registry import ConversionError
from genlip_megatron.training.checkpoint_layout import CheckpointError, resolve_checkpoint

__all__ = ["DistCheckpointReader", "TensorLayout", "write_dist_checkpoint",
           "find_checkpoint_dir", "MEGATRON_METADATA"]

MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}
_STACKED_RE = re.compile(r"^decoder\.layers\.(?!\d+\.)(.+)$")


DCP_NO_DIST_TORCH = "2.7"
"""First torch release whose public ``dcp.save``/``dcp.load`` take ``no_dist`` (2.6 does not)."""


def _one_process_dcp_kwargs() -> dict:
    """Keyword arguments that make a DCP save/load run in this process alone.

    torch >= 2.7: ``no_dist=True`` (also inside a running process group, e.g. a conversion
    called from a torchrun job). torch 2.6 has no such argument; its DCP runs without collectives
    only when no process group exists, so a call inside one would wait for the other ranks:
    refused with a clear error instead. megatron-core 0.19 itself passes ``no_dist`` (so it needs
    torch >= 2.7 whatever it declares).
    """
    if torch_at_least(DCP_NO_DIST_TORCH):
        return {"no_dist": True}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise ConversionError(
            f"reading/writing a Megatron checkpoint in one process inside a running process group "
            f"needs torch >= {DCP_NO_DIST_TORCH} (torch.distributed.checkpoint no_dist); this is "
            f"torch {torch.__version__}: upgrade torch or run the conversion outside torchrun.")
    return {}


@contextlib.contextmanager
def _unwrapped_dcp_errors():
    """Re-raise the original error of a one-process DCP call (DCP wraps it, per rank, in a
    ``CheckpointException``, a BaseException that ``except Exception`` would not catch)."""
    try:
        yield
    except CheckpointException as exc:
        failures = list(exc.failures.values())
        if len(failures) == 1 and isinstance(failures[0], tuple) and \
                isinstance(failures[0][0], Exception):
            raise failures[0][0] from None
        raise


def find_checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint ``path`` means, by the rule every reader shares
    (:func:`~genlip_megatron.training.checkpoint_layout.resolve_checkpoint`): an ``iter_N`` dir
    itself; a save dir's ``latest``, else its newest finished checkpoint (logged).

    Raises:
        ConversionError: no checkpoint there.
    """
    path = Path(path)
    try:
        ckpt = resolve_checkpoint(path)
    except CheckpointError as exc:
        raise ConversionError(str(exc)) from exc
    if ckpt is not None:
        return ckpt
    if (path / "config.json").is_file():
        raise ConversionError(f"{path} looks like an HF export (config.json), not a Megatron "
                              "checkpoint; use `from-hf` to convert it the other way.")
    raise ConversionError(f"{path} is not a Megatron distributed checkpoint (no metadata.json, "
                          "no finished iter_N checkpoint, no 'latest' pointer).")


class _SliceLoadPlanner(LoadPlanner):
    """Loads ``{fqn: (dest, offsets)}``: the region of ``fqn`` at ``offsets`` shaped like dest."""

    def __init__(self, requests: dict[str, tuple[torch.Tensor, tuple[int, ...]]]) -> None:
        self.requests = requests

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for fqn, (dest, offsets) in self.requests.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn],
                                                      [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise AssertionError("only tensors are requested")

    def resolve_tensor(self, read_item) -> torch.Tensor:
        dest = self.requests[read_item.dest_index.fqn][0]
        for dim, (off, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, off, length)
        return dest

    def commit_tensor(self, read_item, tensor) -> None:
        pass


class _CachedReader(FileSystemReader):
    """FileSystemReader that parses ``.metadata`` once (it is re-read on every load call)."""

    _md = None

    def read_metadata(self, *args, **kwargs):
        if self._md is None:
            self._md = super().read_metadata(*args, **kwargs)
        return self._md


class DistCheckpointReader:
    """Model tensors of a Megatron torch_dist checkpoint, by canonical (per-layer) key.

    Args:
        path: an ``iter_N`` directory, or a save dir with ``latest``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = find_checkpoint_dir(path)
        meta = json.loads((self.path / "metadata.json").read_text())
        if meta.get("sharded_backend") != "torch_dist":
            raise ConversionError(f"{self.path} uses the {meta.get('sharded_backend')!r} backend; "
                                  "only torch_dist checkpoints are supported.")
        # megatron's public reader: common.pt (0.16.1 saves, and ours) or the "common_state"
        # object inside the torch_dist files (0.19.2 saves).
        self.common: dict = load_common_state_dict(str(self.path))
        self._reader = _CachedReader(str(self.path))
        md = self._reader.read_metadata()
        self._index: dict[str, tuple[str, Optional[int]]] = {}
        self._md: dict[str, TensorStorageMetadata] = {}
        for fqn, item in md.state_dict_metadata.items():
            if isinstance(item, BytesStorageMetadata) or fqn.startswith("optimizer."):
                continue
            self._md[fqn] = item
            stacked = _STACKED_RE.match(fqn)
            if stacked:
                for i in range(item.size[0]):
                    self._index[f"decoder.layers.{i}.{stacked.group(1)}"] = (fqn, i)
            else:
                self._index[fqn] = (fqn, None)

    def keys(self) -> list[str]:
        """Canonical model keys (global layer numbers)."""
        return list(self._index)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of a canonical key (metadata only)."""
        fqn, layer = self._index[key]
        size = tuple(self._md[fqn].size)
        return size[1:] if layer is not None else size

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of a canonical key."""
        return self._md[self._index[key][0]].properties.dtype

    def nbytes(self) -> int:
        """Bytes of all model tensors."""
        return sum(torch.Size(m.size).numel() * torch.empty((), dtype=m.properties.dtype)
                   .element_size() for m in self._md.values())

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (one layer's slice of a stacked tensor)."""
        if key not in self._index:
            raise KeyError(f"{key} is not a model tensor of {self.path}.")
        fqn, layer = self._index[key]
        md = self._md[fqn]
        shape = tuple(md.size)
        offsets = (0,) * len(shape)
        if layer is not None:
            shape, offsets = (1, *shape[1:]), (layer,) + offsets[1:]
        dest = torch.empty(shape, dtype=md.properties.dtype)
        with warnings.catch_warnings(), _unwrapped_dcp_errors():
            warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process"
            dcp_load({}, storage_reader=self._reader,
                     planner=_SliceLoadPlanner({fqn: (dest, offsets)}),
                     **_one_process_dcp_kwargs())
        return dest[0] if layer is not None else dest


@dataclass
class TensorLayout:
    """Where one canonical tensor goes in the checkpoint and how it is chunked.

    Attributes:
        canonical: canonical key (per-layer, global layer number).
        shape: canonical (TP=1) shape.
        tp_axis / tp_pieces: axis and number of equal pieces it is chunked into (tp × stride).
    """

    canonical: str
    shape: tuple[int, ...]
    tp_axis: Optional[int] = None
    tp_pieces: int = 1

    def storage(self, num_layers: int) -> tuple[str, Optional[int], tuple[int, ...]]:
        """(storage key, layer index or None, global storage shape): layers are stacked."""
        match = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", self.canonical)
        if match:
            return f"decoder.layers.{match.group(2)}", int(match.group(1)), \
                (num_layers, *self.shape)
        return self.canonical, None, self.shape

    def chunks(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(offsets, sizes) of each saved piece in canonical coordinates."""
        if self.tp_axis is None or self.tp_pieces == 1:
            return [((0,) * len(self.shape), self.shape)]
        n = self.shape[self.tp_axis] // self.tp_pieces
        out = []
        for j in range(self.tp_pieces):
            off = [0] * len(self.shape)
            off[self.tp_axis] = j * n
            size = list(self.shape)
            size[self.tp_axis] = n
            out.append((tuple(off), tuple(size)))
        return out


def _object_fqns(pattern: str, num_layers: int) -> list[str]:
    """Storage keys megatron gives a ShardedObject (``ShardedObject.unique_key``).

    Layer objects are stacked like tensors: ``decoder.layers.<suffix>/shard_<i>_<L>``; others
    are ``<key>/shard_0_1``.
    """
    if "*" in pattern:
        key = pattern.replace("*.", "", 1)
        return [f"{key}/shard_{i}_{num_layers}" for i in range(num_layers)]
    return [f"{pattern}/shard_0_1"]


class _LazySavePlanner(DefaultSavePlanner):
    """Save plan from a list of layouts; tensor bytes come from ``produce`` when written."""

    def __init__(self, layouts: list[TensorLayout], num_layers: int, dtype_of: Callable,
                 produce: Callable[[str], torch.Tensor],
                 on_tensor: Optional[Callable[[str], None]] = None,
                 objects: tuple[str, ...] = ()) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.layouts, self.num_layers = layouts, num_layers
        self.objects = [f for p in objects for f in _object_fqns(p, num_layers)]
        self.dtype_of, self.produce, self.on_tensor = dtype_of, produce, on_tensor
        self._where: dict[tuple[str, tuple[int, ...]], tuple[TensorLayout, tuple, tuple]] = {}
        self._cache: tuple[Optional[str], Optional[torch.Tensor]] = (None, None)

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        self.state_dict, self.is_coordinator = {}, True

    def create_local_plan(self) -> SavePlan:
        items = []
        for lay in self.layouts:
            fqn, layer, gshape = lay.storage(self.num_layers)
            props = TensorProperties(dtype=self.dtype_of(lay.canonical))
            for off, size in lay.chunks():
                s_off = (layer, *off) if layer is not None else off
                s_size = (1, *size) if layer is not None else size
                items.append(WriteItem(
                    index=MetadataIndex(fqn, torch.Size(s_off)), type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=torch.Size(s_off),
                                                   sizes=torch.Size(s_size)),
                        properties=props, size=torch.Size(gshape))))
                self._where[(fqn, tuple(s_off))] = (lay, off, size, layer is not None)
        items += [WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO)
                  for fqn in self.objects]
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:  # megatron packs a list of object values
            buf = io.BytesIO()
            torch.save([None], buf)
            buf.seek(0)
            return buf
        lay, off, size, stacked = self._where[(write_item.index.fqn,
                                               tuple(write_item.index.offset))]
        if self._cache[0] != lay.canonical:  # chunks of one tensor are written back to back
            self._cache = (None, None)
            tensor = self.produce(lay.canonical)
            if tuple(tensor.shape) != lay.shape:
                raise AssertionError(f"{lay.canonical}: produced {tuple(tensor.shape)}, "
                                     f"planned {lay.shape}")
            self._cache = (lay.canonical, tensor)
            if self.on_tensor is not None:
                self.on_tensor(lay.canonical)
        piece = self._cache[1]
        for dim, (o, s) in enumerate(zip(off, size)):
            piece = piece.narrow(dim, o, s)
        piece = piece.contiguous()
        return piece.unsqueeze(0) if stacked else piece


def write_dist_checkpoint(path: str | Path, layouts: list[TensorLayout], num_layers: int,
                          dtype_of: Callable[[str], torch.dtype],
                          produce: Callable[[str], torch.Tensor], common: dict,
                          on_tensor: Optional[Callable[[str], None]] = None,
                          objects: tuple[str, ...] = ()) -> None:
    """Write a torch_dist checkpoint directory ``path`` (which must exist and be empty).

    Args:
        layouts: every tensor (canonical key, shape, TP chunking).
        num_layers: size of the stacked layer dimension.
        dtype_of: stored dtype per canonical key.
        produce: canonical key → tensor (called once per tensor, in layout order).
        common: the non-tensor state (``common.pt``).
        on_tensor: progress callback after each produced tensor.
        objects: ShardedObject keys (``*`` = layer) written with the value None.
    """
    path = Path(path)
    planner = _LazySavePlanner(layouts, num_layers, dtype_of, produce, on_tensor, objects)
    with warnings.catch_warnings(), _unwrapped_dcp_errors():
        warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process"
        dcp_save({}, storage_writer=FileSystemWriter(str(path), thread_count=1),
                 planner=planner, **_one_process_dcp_kwargs())
    torch.save(common, path / "common.pt")
    (path / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))
