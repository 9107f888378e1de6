"""Raw webdataset sample → :class:`ProcessedSample` (tokens, labels, image patches) or a skip.

Checks run cheapest first (members, json, header probe, size policy, tokenisation, length) so
a bad sample is rejected before its pixels are decoded. Every rejection is a
:class:`Skipped` with a counter reason (see :data:`SKIP_REASONS`); nothing raises.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch

from genlip_megatron.data.config import DataConfig
from genlip_megatron.data.image import build_decoder, patchify, probe_image, target_size
from genlip_megatron.data.shards import RawSample
from genlip_megatron.data.template import Conversation, SampleError, TextEncoder, \
    conversation_from_json, parse_json_bytes
from genlip_megatron.data.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
KNOWN_KEYS = frozenset(IMAGE_KEYS + ("json",))
# Counter names (``skipped/<reason>``); the trainer logs them as ``data/skipped/<reason>``.
SKIP_REASONS = (
    "shard_error",        # an unreadable / truncated tar (counted per shard)
    "missing_image",      # no jpg/jpeg/png/webp member
    "missing_json",       # no json member
    "bad_json",           # not UTF-8 JSON, or not an object
    "missing_text",       # json has neither caption nor conversations
    "empty_caption",      # blank caption / no non-blank assistant turn
    "bad_conversation",   # malformed conversations list
    "undecodable_image",  # corrupt or truncated image bytes
    "image_too_small",    # 1×1 image
    "aspect_ratio",       # long/short side > data.image.max_aspect_ratio
    "too_long",           # image + text tokens > data.text.max_sample_len (or max_seq_len)
)


@dataclass
class ProcessedSample:
    """One sample ready for packing (or, with ``encoded`` set, waiting for its decode)."""

    index: int               # logical index in the rank's stream
    key: str
    url: str
    source: int
    text_ids: np.ndarray     # int32 [T]
    text_labels: np.ndarray  # int32 [T], unshifted, -100 on prompt/user tokens
    grid: tuple[int, int]    # (rows, cols) of patches
    target: tuple[int, int]  # resized (height, width) in pixels
    patches: Optional[Union[np.ndarray, torch.Tensor]] = None  # uint8 [N, C*p*p]
    encoded: Optional[bytes] = None  # image bytes when decoding happens in the main process
    unknown_keys: bool = False

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def length(self) -> int:
        """Tokens in a packed row: image patches + text."""
        return self.num_patches + len(self.text_ids)


@dataclass
class Skipped:
    """A sample that was rejected, and why."""

    index: int
    key: str
    url: str
    source: int
    reason: str
    detail: str = ""
    unknown_keys: bool = False


@dataclass
class SampleResult:
    """What the main process receives for each logical index, in order."""

    index: int
    stream: int                # global stream id
    cursor_after: list[int]    # that stream's cursor after this sample
    shard_errors: list[str] = field(default_factory=list)
    item: Union[ProcessedSample, Skipped, None] = None  # None: replayed, not processed


class SampleProcessor:
    """Turns batches of raw samples into processed samples.

    Args:
        cfg: the ``data`` section (image, text, formats, lengths).
        tokenizer: the tokenizer of ``cfg.text``.
        decode: decode images here (False: keep the bytes for a decode in the main process).
        formats: per-source json format; defaults to ``cfg.sources``.
    """

    def __init__(self, cfg: DataConfig, tokenizer: TextTokenizer, *, decode: bool = True,
                 formats: Optional[Sequence[str]] = None, device: str = "cpu") -> None:
        self.cfg = cfg
        self.text = TextEncoder(cfg.text, tokenizer)
        self.formats = list(formats) if formats is not None else [s.format for s in cfg.sources]
        self.max_len = cfg.text.max_sample_len or cfg.max_seq_len
        self.decoder = build_decoder(cfg.image, device) if decode else None

    def process(self, raws: Sequence[tuple[int, RawSample]]
                ) -> list[Union[ProcessedSample, Skipped]]:
        """Process ``(index, raw)`` pairs; output order = input order."""
        out: list[Union[ProcessedSample, Skipped, None]] = []
        convs: list[tuple[int, Conversation]] = []
        staged: dict[int, tuple] = {}
        for j, (n, raw) in enumerate(raws):
            try:
                staged[j] = self._inspect(raw)
                convs.append((j, staged[j][1]))
                out.append(None)
            except SampleError as exc:
                out.append(self._skip(n, raw, exc))
        encodings = self.text.encode_batch([c for _, c in convs])
        for (j, _), enc in zip(convs, encodings):
            n, raw = raws[j]
            data, _, size, grid = staged[j]
            sample = ProcessedSample(n, raw.key, raw.url, raw.source, enc.ids, enc.labels, grid,
                                     size, encoded=data, unknown_keys=_has_unknown(raw))
            if sample.length > self.max_len:
                out[j] = self._skip(n, raw, SampleError("too_long", f"{sample.length} tokens"))
            else:
                out[j] = sample
        if self.decoder is not None:
            todo = [j for j, s in enumerate(out) if isinstance(s, ProcessedSample)]
            for j, s in zip(todo, self.decode([out[j] for j in todo])):
                out[j] = s
        return out  # type: ignore[return-value]

    def decode(self, samples: list[ProcessedSample]) -> list[Union[ProcessedSample, Skipped]]:
        """Decode and patchify ``samples`` (in place: patches set, bytes dropped); a sample
        whose image fails comes back as Skipped."""
        if not samples:
            return []
        images = self.decoder.decode([s.encoded for s in samples], [s.target for s in samples])
        p = self.cfg.image.patch_size
        out: list[Union[ProcessedSample, Skipped]] = []
        for s, img in zip(samples, images):
            s.encoded = None
            if isinstance(img, SampleError):
                skip = Skipped(s.index, s.key, s.url, s.source, img.reason, img.detail,
                               s.unknown_keys)
                _log_skip(skip)
                out.append(skip)
                continue
            patches = patchify(img, p)
            s.patches = patches.numpy() if patches.device.type == "cpu" else patches
            out.append(s)
        return out

    def _inspect(self, raw: RawSample):
        """Members, json, conversation, header and size; raises SampleError."""
        image_key = next((k for k in IMAGE_KEYS if k in raw.members), None)
        if image_key is None:
            raise SampleError("missing_image", f"members {sorted(raw.members)}")
        meta = parse_json_bytes(raw.members.get("json"))
        conv = conversation_from_json(meta, self.formats[raw.source], self.cfg.text.prompt)
        data = raw.members[image_key]
        info = probe_image(data)
        size = target_size(self.cfg.image, info.height, info.width)
        p = self.cfg.image.patch_size
        return data, conv, size, (size[0] // p, size[1] // p)

    def _skip(self, n: int, raw: RawSample, exc: SampleError) -> Skipped:
        skip = Skipped(n, raw.key, raw.url, raw.source, exc.reason, exc.detail, _has_unknown(raw))
        _log_skip(skip)
        return skip


def _has_unknown(raw: RawSample) -> bool:
    return any(k not in KNOWN_KEYS for k in raw.members)


def _log_skip(skip: Skipped) -> None:
    logger.info("skipped sample %s of shard %s: %s %s", skip.key, skip.url, skip.reason,
                skip.detail)
