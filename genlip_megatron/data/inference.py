"""Model inputs for inference and evaluation: one image + prompt, and a held-out reader.

- :func:`encode_prompt` turns an image and a prompt into a one-sample :class:`PackedBatch`
  (``[IMG×N] prompt``, no caption, no ``<|im_end|>``) that a generation loop extends with
  :func:`extend_batch`, one token at a time.
- :func:`iter_eval_samples` reads ``data.eval_sources`` in order, without shuffling or packing,
  and yields each image's patches, grid and reference caption (for caption accuracy).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from genlip_megatron.data.batch import IGNORE_INDEX, PackedBatch
from genlip_megatron.config.data import DataConfig
from genlip_megatron.data.energon import mapped_fields, resolve_data_config
from genlip_megatron.data.image import patchify, pil_decode, resize_uint8, target_size
from genlip_megatron.data.packer import collate_rows
from genlip_megatron.data.sample import ProcessedSample, SampleProcessor
from genlip_megatron.data.shards import RawSample, check_shards, expand_shards, \
    iter_tar_samples
from genlip_megatron.data.template import SampleError, TextEncoder, conversation_from_json, \
    parse_json_bytes
from genlip_megatron.data.tokenizer import TextTokenizer, load_tokenizer

logger = logging.getLogger(__name__)

ImageInput = Union[bytes, Image.Image, np.ndarray]


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def image_to_patches(image: ImageInput, cfg: DataConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 patches ``[N, C*p*p]`` and grid (rows, cols) of one image, with the training
    size policy and resize (``data.image``; PIL resize for the pillow decoder, else torch's).

    Raises:
        SampleError: undecodable, 1×1 or too elongated image.
    """
    if isinstance(image, (bytes, bytearray)):
        image = pil_decode(bytes(image))
    if isinstance(image, Image.Image):
        pil = image.convert("RGBA").convert("RGB") if image.mode == "P" else image.convert("RGB")
        h, w = pil.height, pil.width
    else:
        arr = np.asarray(image, dtype=np.uint8)
        h, w = arr.shape[:2]
        pil = None
    size = target_size(cfg.image, h, w)
    if pil is not None and cfg.image.decoder == "pillow":
        img = torch.from_numpy(np.array(pil.resize((size[1], size[0]), Image.BILINEAR)
                                        if pil.size != (size[1], size[0]) else pil))
    else:
        arr = np.array(pil) if pil is not None else np.array(arr)  # writable copy
        img = resize_uint8(torch.from_numpy(arr), size)
    p = cfg.image.patch_size
    return patchify(img, p).numpy(), (size[0] // p, size[1] // p)


def prompt_batch(patches: np.ndarray, grid: tuple[int, int], prompt_ids: Sequence[int],
                 pad_multiple: int = 1) -> PackedBatch:
    """One-row batch holding ``[IMG×N] prompt`` (all labels -100), padded to ``pad_multiple``."""
    ids = np.asarray(prompt_ids, np.int32)
    sample = ProcessedSample(0, "prompt", "", 0, ids, np.full(len(ids), IGNORE_INDEX, np.int32),
                             grid, (0, 0), patches=patches)
    return collate_rows([[sample]], _round_up(sample.length, pad_multiple))


def encode_prompt(image: ImageInput, tokenizer: TextTokenizer, cfg: DataConfig,
                  prompt: Optional[str] = None, pad_multiple: int = 1) -> PackedBatch:
    """Model inputs for captioning one image: ``[IMG×N] prompt`` as a one-sample batch.

    Args:
        image: encoded bytes, a PIL image or a uint8 ``[H, W, 3]`` array.
        tokenizer: the training tokenizer.
        cfg: the ``data`` section (size policy, patch size, prompt).
        prompt: overrides ``cfg.text.prompt``.
        pad_multiple: pad the row to a multiple of this (``cfg.pad_multiple`` under FP8).

    Returns:
        PackedBatch with B = 1, one sample; its real length is ``cu_seqlens[-1]``.
    """
    patches, grid = image_to_patches(image, cfg)
    ids = TextEncoder(cfg.text, tokenizer).encode_prompt(prompt)
    return prompt_batch(patches, grid, ids, pad_multiple)


def extend_batch(batch: PackedBatch, new_ids: Sequence[int], pad_multiple: int = 1
                 ) -> PackedBatch:
    """Append text tokens to the single sample of a one-row batch (greedy-decoding step).

    Positions continue the sample's text positions; labels stay -100.
    """
    if batch.tokens.shape[0] != 1 or batch.image_lens.numel() != 1:
        raise ValueError("extend_batch() needs a one-row, one-sample batch (from encode_prompt)")
    real = int(batch.cu_seqlens[-1])
    k = len(new_ids)
    total = real + k
    seq = _round_up(total, pad_multiple)
    tokens = torch.zeros(1, seq, dtype=torch.int64)
    tokens[0, :real] = batch.tokens[0, :real]
    tokens[0, real:total] = torch.as_tensor(list(new_ids), dtype=torch.int64)
    pos = torch.zeros(1, 3, seq, dtype=torch.int64)
    pos[0, :, :real] = batch.position_ids[0, :, :real]
    last = int(batch.position_ids[0, 0, real - 1])
    pos[0, :, real:total] = last + 1 + torch.arange(k)
    image_mask = torch.zeros(1, seq, dtype=torch.bool)
    image_mask[0, :real] = batch.image_mask[0, :real]
    segment = torch.full((1, seq), -1, dtype=torch.int32)
    segment[0, :total] = 0
    text_lens = batch.text_lens + k
    zero = torch.zeros(1, dtype=torch.int32)
    return PackedBatch(
        tokens=tokens, labels=torch.full((1, seq), IGNORE_INDEX, dtype=torch.int64),
        position_ids=pos, image_mask=image_mask, segment_ids=segment,
        pixel_values=batch.pixel_values, image_grid_hw=batch.image_grid_hw,
        sample_offsets=batch.sample_offsets, image_lens=batch.image_lens, text_lens=text_lens,
        cu_seqlens=torch.cat([zero, batch.image_lens + text_lens]),
        cu_seqlens_image=batch.cu_seqlens_image, cu_seqlens_text=torch.cat([zero, text_lens]))


@dataclass
class EvalSample:
    """One held-out image with its reference caption (and its labels, when the shard has
    them: ``cls`` member → ``label``, ``seg.png`` member → ``mask``)."""

    key: str
    url: str
    caption: str             # reference (first assistant turn, stripped)
    prompt_ids: np.ndarray   # int32 token ids of the user prompt
    patches: np.ndarray      # uint8 [N, C*p*p]
    grid: tuple[int, int]
    label: int = -1          # class id (webdataset ``cls``), -1 without one
    mask: Optional[np.ndarray] = None   # uint8 [gh*p, gw*p] class per pixel (``seg.png``)

    @property
    def pixel_values(self) -> torch.Tensor:
        """float32 ``[N, C*p*p]``, normalised as in training."""
        from genlip_megatron.data.image import normalize_patches

        return normalize_patches(torch.from_numpy(self.patches))

    def batch(self, pad_multiple: int = 1) -> PackedBatch:
        """``[IMG×N] prompt`` one-sample batch, ready for greedy decoding."""
        return prompt_batch(self.patches, self.grid, self.prompt_ids, pad_multiple)


def iter_eval_samples(cfg: DataConfig, tokenizer: Optional[TextTokenizer] = None, *,
                      limit: Optional[int] = None, dp_rank: int = 0, dp_size: int = 1
                      ) -> Iterator[EvalSample]:
    """Held-out samples of ``cfg.eval_sources`` in file order (shards split over dp ranks).

    Bad samples are skipped with a log line, as in training.
    """
    if not cfg.eval_sources:
        raise ValueError("data.eval_sources is empty; list the held-out shards to evaluate.")
    if tokenizer is None:
        if cfg.text.tokenizer_path is None:
            raise ValueError("data.text.tokenizer_path is not set.")
        tokenizer = load_tokenizer(cfg.text.tokenizer_path)
    cfg = resolve_data_config(cfg)
    formats = [s.format for s in cfg.eval_sources]
    field_maps = [s.field_map for s in cfg.eval_sources]
    processor = SampleProcessor(cfg, tokenizer, decode=True, formats=formats, device="cpu",
                                field_maps=field_maps)
    count = 0
    for raws in eval_raw_batches(cfg, dp_rank, dp_size):
        for (_, raw), item in zip(raws, processor.process(raws)):
            if not isinstance(item, ProcessedSample):
                continue
            fmap, fmt = field_maps[raw.source], formats[raw.source]
            meta = mapped_fields(raw.members, fmap, fmt)[1] if fmap is not None \
                else parse_json_bytes(raw.members["json"])
            conv = conversation_from_json(meta, "conversations" if fmt == "vqa" else fmt,
                                          cfg.text.prompt)
            caption = next(t for r, t in conv.turns if r == "assistant").strip()
            n_prompt = int(np.argmax(item.text_labels != IGNORE_INDEX))
            label, mask = sample_labels(raw.members, item.grid, cfg.image.patch_size, item.key)
            yield EvalSample(item.key, item.url, caption, item.text_ids[:n_prompt],
                             np.asarray(item.patches), item.grid, label, mask)
            count += 1
            if limit is not None and count >= limit:
                return


LABEL_MEMBER, MASK_MEMBER = "cls", "seg.png"
"""Webdataset members of a labelled sample: the class id as decimal text, the mask as a
single-channel PNG of class ids at the image's size (``tools/make_shards.py`` writes both)."""


def sample_labels(members: dict, grid: tuple[int, int], patch_size: int, key: str
                  ) -> tuple[int, Optional[np.ndarray]]:
    """(class id or -1, mask resized to the model's pixels ``[gh*p, gw*p]`` or None).

    The mask is resized with nearest neighbour (class ids must not blend) to the size the
    image was resized to. A malformed label or mask is logged and treated as absent.
    """
    label, mask = -1, None
    if LABEL_MEMBER in members:
        try:
            label = int(bytes(members[LABEL_MEMBER]).decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError):
            logger.warning("sample %s: cls member is not an integer; no label", key)
        if label < -1:
            logger.warning("sample %s: negative class id %d; no label", key, label)
            label = -1
    if MASK_MEMBER in members:
        try:
            img = Image.open(io.BytesIO(members[MASK_MEMBER]))
            img.load()
            if img.mode not in ("L", "P"):
                raise ValueError(f"mode {img.mode} (want L or P)")
            size = (grid[1] * patch_size, grid[0] * patch_size)
            mask = np.asarray(img.resize(size, Image.NEAREST), dtype=np.uint8)
        except (OSError, ValueError) as exc:
            logger.warning("sample %s: unusable seg.png (%s); no mask", key, exc)
    return label, mask


def eval_raw_batches(cfg: DataConfig, dp_rank: int, dp_size: int
                     ) -> Iterator[list[tuple[int, RawSample]]]:
    """Raw samples of ``cfg.eval_sources`` in file order (this rank's shards), in decode-batch
    sized lists of ``(logical index, raw)``; an unreadable shard ends with a log line."""
    batch: list[tuple[int, RawSample]] = []
    n = 0
    for s, src in enumerate(cfg.eval_sources):
        shards, _ = check_shards(expand_shards(src.paths, f"data.eval_sources[{s}]"),
                                 f"data.eval_sources[{s}]")
        for url in shards[dp_rank::dp_size]:
            errors: list[str] = []
            for sample in iter_tar_samples(url, errors):
                if sample.get("__duplicate__"):
                    continue
                members = {k: v for k, v in sample.items() if not k.startswith("__")}
                batch.append((n, RawSample(members, sample["__key__"], url, s, [])))
                n += 1
                if len(batch) >= cfg.image.decode_batch_size:
                    yield batch
                    batch = []
            if errors:
                logger.warning("skipping the rest of unreadable eval shard %s (%s)", url,
                               errors[0])
    if batch:
        yield batch


__all__ = ["encode_prompt", "extend_batch", "prompt_batch", "image_to_patches", "EvalSample",
           "iter_eval_samples", "eval_raw_batches", "sample_labels", "SampleError",
           "LABEL_MEMBER", "MASK_MEMBER"]
