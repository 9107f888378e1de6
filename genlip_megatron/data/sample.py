"""Raw webdataset sample → :class:`ProcessedSample` (tokens, labels, image patches) or a skip.

Checks run cheapest first (members, json, header probe, size policy, tokenisation, length) so
a bad sample is rejected before its pixels are decoded. Every rejection is a
:class:`Skipped` with a counter reason (see :data:`SKIP_REASONS`); nothing raises: an
unexpected exception on one sample becomes a ``sample_error`` skip, and a batched step that
fails (tokenisation, decoding) is redone sample by sample so only the culprit is skipped.
Skip lines are rate-limited (:class:`SkipLog`); the counters carry the totals.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch

from genlip_megatron.config.data import DataConfig
from genlip_megatron.data.energon import mapped_fields
from genlip_megatron.data.image import FallbackRefused, build_decoder, patchify, probe_image, \
    target_size
from genlip_megatron.data.sandbox import Isolated, decode_isolated
from genlip_megatron.data.shards import RawSample
from genlip_megatron.data.template import Conversation, SampleError, TextEncoder, \
    conversation_from_json, parse_json_bytes
from genlip_megatron.data.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
KNOWN_KEYS = frozenset(IMAGE_KEYS + ("json",))
# Counter names (``skipped/<reason>``); the trainer logs them as ``data/skipped/<reason>``.
SKIP_REASONS = (
    "duplicate_key",      # a key already seen earlier in the same tar
    "missing_image",      # no jpg/jpeg/png/webp member
    "missing_json",       # no json member
    "bad_json",           # not UTF-8 JSON, not an object, or a field of the wrong type
    "missing_text",       # json has neither caption nor conversations
    "empty_caption",      # blank caption / no non-blank assistant turn
    "bad_conversation",   # malformed conversations list
    "bad_text",           # text the tokenizer cannot take (e.g. a lone UTF-16 surrogate)
    "undecodable_image",  # corrupt or truncated image bytes
    "image_too_small",    # 1×1 image
    "image_too_large",    # more pixels than PIL's decompression-bomb limit
    "aspect_ratio",       # long/short side > data.image.max_aspect_ratio
    "too_long",           # image + text tokens > data.text.max_sample_len (or max_seq_len)
    "decoder_crash",      # the native decoder crashed on it (found by bisection, not retried)
    "sample_error",       # any other exception while processing it (logged with its type)
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
    fallback: bool = False   # decoded by Pillow although the decoder is DALI

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
    retries: int = 0           # object-store reads retried (shards.RawSample.retries)


class SampleProcessor:
    """Turns batches of raw samples into processed samples.

    Args:
        cfg: the ``data`` section (image, text, formats, lengths).
        tokenizer: the tokenizer of ``cfg.text``.
        decode: decode images here (False: keep the bytes for a decode in the main process).
        formats: per-source json format; defaults to ``cfg.sources``.
        field_maps: per-source Energon field_map (None: our layout); defaults to
            ``cfg.sources``.
    """

    def __init__(self, cfg: DataConfig, tokenizer: TextTokenizer, *, decode: bool = True,
                 formats: Optional[Sequence[str]] = None, device: str = "cpu",
                 field_maps: Optional[Sequence[Optional[dict]]] = None) -> None:
        self.cfg = cfg
        self.text = TextEncoder(cfg.text, tokenizer)
        self.formats = list(formats) if formats is not None else [s.format for s in cfg.sources]
        self.field_maps = list(field_maps) if field_maps is not None else \
            [s.field_map for s in cfg.sources]
        self.max_len = cfg.text.max_sample_len or cfg.max_seq_len
        self.decoder = build_decoder(cfg.image, device) if decode else None
        self.crashed: set[tuple[str, str]] = set()  # (url, key) that crashed the decoder

    def process(self, raws: Sequence[tuple[int, RawSample]], suspects: frozenset = frozenset()
                ) -> list[Union[ProcessedSample, Skipped]]:
        """Process ``(index, raw)`` pairs; output order = input order. ``suspects``: indices
        in flight when a decoder crashed; they are decoded in isolation (see decode)."""
        out: list[Union[ProcessedSample, Skipped, None]] = []
        staged: dict[int, tuple] = {}
        for j, (n, raw) in enumerate(raws):
            out.append(None)
            try:
                if raw.duplicate:
                    raise SampleError("duplicate_key", f"key {raw.key} repeats in the shard")
                staged[j] = self._inspect(raw)
            except Exception as exc:  # one bad sample must never stop the run
                out[j] = self._skip(n, raw, _as_sample_error(exc))
        order = list(staged)
        for j, enc in zip(order, self._encode([staged[j][1] for j in order])):
            n, raw = raws[j]
            if isinstance(enc, SampleError):
                out[j] = self._skip(n, raw, enc)
                continue
            data, _, size, grid = staged[j]
            sample = ProcessedSample(n, raw.key, raw.url, raw.source, enc.ids, enc.labels, grid,
                                     size, encoded=data, unknown_keys=_has_unknown(raw))
            if sample.length > self.max_len:
                out[j] = self._skip(n, raw, SampleError("too_long", f"{sample.length} tokens"))
            else:
                out[j] = sample
        if self.decoder is not None:
            todo = [j for j, s in enumerate(out) if isinstance(s, ProcessedSample)]
            for j, s in zip(todo, self.decode([out[j] for j in todo], suspects)):
                out[j] = s
        return out  # type: ignore[return-value]

    def _encode(self, convs: list[Conversation]) -> list:
        """Batched tokenisation; if the batch call fails, sample by sample (SampleError for
        the ones that fail)."""
        try:
            return self.text.encode_batch(convs)
        except Exception:
            pass
        out = []
        for conv in convs:
            try:
                out.append(self.text.encode_batch([conv])[0])
            except Exception as exc:
                out.append(SampleError("bad_text", f"{type(exc).__name__}: {exc}"[:120]))
        return out

    def decode(self, samples: list[ProcessedSample], suspects: frozenset = frozenset()
               ) -> list[Union[ProcessedSample, Skipped]]:
        """Decode and patchify ``samples`` (in place: patches set, bytes dropped); a sample
        whose image fails comes back as Skipped. Samples in ``suspects`` (in flight when the
        native decoder crashed the process) are decoded in child processes first, bisecting
        to the one that crashes it (skipped as ``decoder_crash``)."""
        if not samples:
            return []
        images: list = [None] * len(samples)
        for i, s in enumerate(samples):  # never retried: it would kill the process again
            if (s.url, s.key) in self.crashed:
                images[i] = SampleError("decoder_crash", "crashed the decoder before")
        risky = [i for i, s in enumerate(samples) if s.index in suspects and images[i] is None]
        if risky:
            for i, img in zip(risky, decode_isolated(self.cfg.image, self.decoder.device,
                                                     [samples[i].encoded for i in risky],
                                                     [samples[i].target for i in risky])):
                images[i] = img
                if getattr(img.image, "reason", None) == "decoder_crash":
                    self.crashed.add((samples[i].url, samples[i].key))
        rest = [i for i in range(len(samples)) if images[i] is None]
        fell_back: set[int] = {i for i in risky if getattr(images[i], "fallback", False)}
        for i, img, fb in zip(rest, *self._decode_batch([samples[i] for i in rest])):
            images[i] = img
            if fb:
                fell_back.add(i)
        p = self.cfg.image.patch_size
        out: list[Union[ProcessedSample, Skipped]] = []
        for i, (s, img) in enumerate(zip(samples, images)):
            s.encoded = None
            if isinstance(img, Isolated):
                img = img.image
            if isinstance(img, SampleError):
                out.append(self._skip_processed(s, img))
                continue
            try:
                patches = patchify(img, p)
            except Exception as exc:
                out.append(self._skip_processed(s, _as_sample_error(exc)))
                continue
            s.patches = patches.numpy() if patches.device.type == "cpu" else patches
            s.fallback = i in fell_back
            out.append(s)
        return out

    def _decode_batch(self, samples: list[ProcessedSample]) -> tuple[list, list[bool]]:
        """decoder.decode, redone image by image if the batch call raises."""
        if not samples:
            return [], []
        try:
            images = self.decoder.decode([s.encoded for s in samples],
                                         [s.target for s in samples])
            return images, _fallback_flags(self.decoder, len(samples))
        except FallbackRefused:
            raise
        except Exception:
            pass
        images, flags = [], []
        for s in samples:
            try:
                images.append(self.decoder.decode([s.encoded], [s.target])[0])
                flags.append(_fallback_flags(self.decoder, 1)[0])
            except FallbackRefused:
                raise
            except Exception as exc:
                images.append(_as_sample_error(exc))
                flags.append(False)
        return images, flags

    def _inspect(self, raw: RawSample):
        """Members, json, conversation, header and size; raises SampleError."""
        fmt = self.formats[raw.source]
        field_map = self.field_maps[raw.source] if raw.source < len(self.field_maps) else None
        if field_map is not None:  # Energon field_map (data/energon.py)
            data, meta = mapped_fields(raw.members, field_map, fmt)
        else:
            image_key = next((k for k in IMAGE_KEYS if k in raw.members), None)
            if image_key is None:
                raise SampleError("missing_image", f"members {sorted(raw.members)}")
            data, meta = raw.members[image_key], parse_json_bytes(raw.members.get("json"))
        conv = conversation_from_json(meta, "conversations" if fmt == "vqa" else fmt,
                                      self.cfg.text.prompt)
        for _, text in conv.turns:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # e.g. a lone surrogate from "\ud800" in JSON
                raise SampleError("bad_text", f"not encodable as UTF-8: {exc}"[:120]) from None
        info = probe_image(data)
        size = target_size(self.cfg.image, info.height, info.width)
        p = self.cfg.image.patch_size
        return data, conv, size, (size[0] // p, size[1] // p)

    def _skip(self, n: int, raw: RawSample, exc: SampleError) -> Skipped:
        skip = Skipped(n, raw.key, raw.url, raw.source, exc.reason, exc.detail, _has_unknown(raw))
        SKIP_LOG.log(skip)
        return skip

    def _skip_processed(self, s: ProcessedSample, exc: SampleError) -> Skipped:
        skip = Skipped(s.index, s.key, s.url, s.source, exc.reason, exc.detail, s.unknown_keys)
        SKIP_LOG.log(skip)
        return skip


def _as_sample_error(exc: BaseException) -> SampleError:
    if isinstance(exc, SampleError):
        return exc
    if isinstance(exc, FallbackRefused):
        raise exc
    return SampleError("sample_error", f"{type(exc).__name__}: {exc}"[:160])


def _fallback_flags(decoder, n: int) -> list[bool]:
    """Which of the last decode's images came from the Pillow fallback."""
    fell = getattr(decoder, "last_fallbacks", ())
    return [i in fell for i in range(n)]


def _has_unknown(raw: RawSample) -> bool:
    return any(k not in KNOWN_KEYS for k in raw.members)


class SkipLog:
    """Rate-limited skip lines: the first ``first`` skips of each reason, then at most one line
    per reason every ``every_s`` seconds with the number left unlogged (counters have totals).
    """

    def __init__(self, first: int = 5, every_s: float = 60.0) -> None:
        self.first, self.every_s = first, every_s
        self.seen: Counter = Counter()
        self.quiet: Counter = Counter()
        self.last: dict[str, float] = {}

    def log(self, skip: Skipped) -> None:
        reason = skip.reason
        self.seen[reason] += 1
        now = time.monotonic()
        if self.seen[reason] > self.first and now - self.last.get(reason, 0.0) < self.every_s:
            self.quiet[reason] += 1
            logger.debug("skipped sample %s of shard %s: %s %s", skip.key, skip.url, reason,
                         skip.detail)
            return
        self.last[reason] = now
        more = f" ({self.quiet[reason]} more {reason} skips not logged)" \
            if self.quiet[reason] else ""
        self.quiet[reason] = 0
        logger.info("skipped sample %s of shard %s: %s %s%s", skip.key, skip.url, reason,
                    skip.detail, more)


SKIP_LOG = SkipLog()
