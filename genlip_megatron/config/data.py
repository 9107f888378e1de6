"""Data-side config sections (owned by genlip_megatron.data).

``DataConfig`` is composed under ``data:`` in the run YAML. Each sub-section is read by one
component: ``image`` by :mod:`~genlip_megatron.data.image`, ``text`` by
:mod:`~genlip_megatron.data.template`, ``packing`` by :mod:`~genlip_megatron.data.packer`,
``reader`` by :mod:`~genlip_megatron.data.shards` and :mod:`~genlip_megatron.data.loader`.
Data-only rules live in :meth:`DataConfig.validate`; rules that involve other sections (for
example ``data.image.patch_size == model.patch_size``) belong to ``RunConfig.validate``.

Example (stage 2, two sources mixed 3:1)::

    data:
      max_seq_len: 16384
      sources:
        - {paths: "/data/infinity_mm/{00000..00999}.tar", weight: 3.0, format: conversations}
        - {paths: ["/data/blip3o/*.tar"], weight: 1.0, format: conversations}
      eval_sources:
        - {paths: "/data/heldout/*.tar", format: caption}
      image: {policy: native, decoder: dali, device: auto}
      text: {tokenizer_path: .cache/qwen3/tokenizer.json}
      reader: {num_workers: 4, shuffle_buffer: 1000}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from genlip_megatron.config.loader import ConfigError

DEFAULT_PROMPT = "Describe the image in detail."


@dataclass(kw_only=True)
class SourceConfig:
    """One source: a set of webdataset tar shards, or an Energon dataset (docs/data.md)."""

    paths: Union[str, list[str], None] = None
    """Shard paths: a glob ("/d/*.tar"), a brace range ("/d/{00000..00099}.tar"), or a list of
    either; local files or ``s3://bucket/key`` objects. Matched shards are sorted by path before
    the seeded per-epoch shuffle. Not used by format energon (which takes ``path``)."""
    path: Optional[str] = None
    """format energon: a folder prepared by ``energon prepare`` (it has ``.nv-meta/``) or an
    Energon metadataset YAML (a blend of such folders); local or ``s3://``."""
    split: str = "train"
    """format energon: the split of ``.nv-meta/split.yaml`` (or of the metadataset) to read."""
    weight: float = 1.0
    """Relative sampling weight when several sources are mixed (normalised over all sources;
    a metadataset's blend weights are multiplied by it)."""
    format: Literal["caption", "conversations", "vqa", "energon"] = "caption"
    """Sample layout: stage 1 ``{"caption": ...}`` json; stage 2 ``{"conversations": [...]}``
    json (``conversation`` is accepted too; a sample without either falls back to ``caption``);
    vqa: one question/answer turn taken from ``field_map`` (context, answers); energon: read
    ``path`` as an Energon dataset and take the layout from its ``dataset.yaml``."""
    field_map: Optional[dict[str, str]] = None
    """Which tar members hold the sample fields, in Energon's field_map syntax: ``"jpg,png"``
    takes the first member present, ``"json[caption]"`` a key of a json member. Fields: image,
    caption (caption) or context and answers (vqa). null: image in jpg/jpeg/png/webp, text in
    json. Filled from dataset.yaml for format energon."""
    name: Optional[str] = None
    """Short name used in logs; defaults to ``source<i>``."""


@dataclass(kw_only=True)
class ImageConfig:
    """Decoding, resizing and patching of images (docs/reference-architecture.md, Image processor)."""

    policy: Literal["fixed", "native"] = "fixed"
    """fixed: resize to fixed_size × fixed_size, no crop (stage 1); native: keep the aspect ratio
    with the reference smart-resize rule between min_pixels and max_pixels (stage 2)."""
    fixed_size: int = 224
    """Output side in pixels for policy fixed (a multiple of patch_size; 224 → 14×14 patches)."""
    min_pixels: int = 4096
    """policy native: images with fewer pixels are upscaled (4096 = 16 patches of 16×16)."""
    max_pixels: int = 262144
    """policy native: images with more pixels are downscaled (262144 = 1024 patches)."""
    max_aspect_ratio: float = 200.0
    """Samples whose long/short side ratio exceeds this are skipped (reason aspect_ratio)."""
    patch_size: int = 16
    """Square patch side; must equal model.patch_size."""
    decoder: Literal["dali", "pillow"] = "dali"
    """dali: NVIDIA DALI decoder (nvJPEG on GPU, libjpeg-turbo on CPU); pillow: PIL decode and
    resize exactly as the reference (for machines where DALI has no wheel)."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """Where DALI decodes: gpu uses decoders.image(device='mixed') in the trainer process; cpu
    uses device='cpu' with device_id=None in the loader workers; auto picks gpu when CUDA is
    available."""
    resize_backend: Literal["auto", "dali", "torch"] = "auto"
    """Resize after a DALI decode: dali (fn.resize, antialiased linear); torch (uint8 antialiased
    bilinear, ~3× faster than DALI's CPU resize and within 1 grey level of the reference's PIL
    resize); auto = dali on GPU, torch on CPU. Ignored by the pillow decoder (PIL BILINEAR)."""
    dali_threads: int = 1
    """DALI CPU threads per decoding process (each loader worker has its own pipeline)."""
    decode_batch_size: int = 32
    """Images decoded per DALI pipeline run."""
    decode_in_main: bool = False
    """Decode in the trainer process instead of the workers (always true for device gpu)."""
    allow_fallback: bool = True
    """decoder dali: decode an image with Pillow when DALI cannot (a format DALI lacks, such as
    a GIF named .png, or a DALI error on that one image). Each is counted as
    ``data/decode_fallbacks`` and the first DALI error is logged; false stops the run instead
    (images that Pillow cannot decode either are skipped as undecodable_image either way)."""


@dataclass(kw_only=True)
class TextConfig:
    """Tokenizer and chat template (reference Qwen2VLPretrainTemplate, no special tokens)."""

    tokenizer_path: Optional[str] = None
    """Local tokenizer.json (Qwen3 in real runs: `python tools/fetch_qwen3_tokenizer.py`; the
    demo trains its own). Required by the train and eval loaders."""
    prompt: str = DEFAULT_PROMPT
    """User prompt after the image for caption-format samples (masked out of the loss)."""
    max_sample_len: Optional[int] = None
    """Samples with more tokens (image + text) are skipped as too_long; None = max_seq_len."""


@dataclass(kw_only=True)
class PackingConfig:
    """Packing of whole samples into rows of max_seq_len tokens."""

    buffer_size: int = 256
    """Samples held for packing; a row is cut when this many are buffered (or buffer_rows worth
    of tokens). The reference packs first-fit from a 200-sample buffer."""
    buffer_rows: int = 8
    """Cut a row early once the buffer holds this many rows' worth of tokens (bounds memory)."""
    exact_fill_rows: float = 4.0
    """When the space left in a row is under this many longest-buffered-samples, fill it with
    an exact subset-sum search instead of first-fit (this is what reaches ~100 % fill)."""


@dataclass(kw_only=True)
class ReaderConfig:
    """Shard reading, shuffling, worker processes."""

    num_workers: int = 2
    """Loader worker processes (0: everything in the trainer process). The sample stream is
    identical for any value ≤ streams_per_source; larger values leave workers idle."""
    streams_per_source: int = 4
    """Shard streams per source and rank; each is read sequentially by one worker and the
    streams are interleaved round-robin. Part of the data order (changing it changes it)."""
    shuffle_shards: bool = True
    """Shuffle the shard order every epoch from (seed, source, epoch)."""
    shuffle_buffer: int = 1000
    """Samples per stream permuted together (a block shuffle: same locality as a shuffle buffer
    of this size, but resumable from a cursor). Memory ≈ streams × this × raw sample size.
    1 disables sample shuffling."""
    prefetch: int = 64
    """Processed samples each worker may queue ahead of the trainer."""
    start_method: Literal["forkserver", "spawn", "fork"] = "forkserver"
    """multiprocessing start method for workers. forkserver (default) forks them from a clean
    server process that has the data modules preloaded: safe with CUDA and DALI threads in the
    trainer, and ~0.2 s per worker instead of ~1.7 s with spawn."""
    snapshot_interval: int = 64
    """Keep a resume point every this many samples (restores replay at most this many extra)."""
    max_consecutive_skips: int = 10000
    """Stop with an error when a source yields this many skipped samples in a row, or reads a
    whole epoch of every stream without one usable sample (e.g. max_seq_len below every
    sample), instead of looping forever."""
    max_worker_restarts: int = 3
    """A worker that dies (killed, or a native decoder crash) is restarted from its position;
    after this many deaths in a row without delivering a sample the run stops."""
    remote_retries: int = 5
    """s3:// shards: retries of a failed GET (connection error, timeout, HTTP 5xx/429) before
    the rest of the shard is skipped and counted as ``shards/unreadable``."""
    remote_backoff_s: float = 0.5
    """s3:// shards: wait before the first retry, doubled after each (capped at 30 s); the
    default rides out ~15 s of outage."""
    remote_read_ahead_mib: int = 32
    """s3:// shards: bytes fetched ahead of the reader per open shard (in 8 MiB ranged GETs)."""


@dataclass(kw_only=True)
class DataConfig:
    """Where samples come from and how rows are packed."""

    sources: list[SourceConfig] = field(default_factory=list)
    """Training sources (mixed by weight)."""
    eval_sources: list[SourceConfig] = field(default_factory=list)
    """Held-out sources read in order, without packing, by the caption evaluation."""
    max_seq_len: int = 16384
    """Tokens per packed row; every row is padded to exactly this length (a multiple of
    pad_multiple)."""
    pad_multiple: int = 16
    """Packed lengths are multiples of this (FP8 GEMMs need 16); single-sample batches from
    encode_prompt are padded up to a multiple of it."""
    image: ImageConfig = field(default_factory=ImageConfig)
    """Image decoding and resizing."""
    text: TextConfig = field(default_factory=TextConfig)
    """Tokenizer and template."""
    packing: PackingConfig = field(default_factory=PackingConfig)
    """Row packing."""
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    """Shard reading and worker processes."""
    reshard_on_resume: bool = False
    """Resume a checkpoint whose shard set differs from today's (a shard dropped, added or
    replaced): model, optimizer, step and consumed samples come from the checkpoint, and the
    data streams restart over the new shard set at epoch 0, re-seeded from training.seed and
    the resumed step (deterministic; logged with the shards added/removed). Off: such a resume
    is refused in one line, because the saved stream positions do not fit the new shards."""

    def validate(self) -> "DataConfig":
        """Check data-only rules; raises ConfigError naming the dotted key. Returns self."""
        _check(self.max_seq_len > 0 and self.pad_multiple > 0,
               f"data.max_seq_len ({self.max_seq_len}) and data.pad_multiple "
               f"({self.pad_multiple}) must be positive.")
        _check(self.max_seq_len % self.pad_multiple == 0,
               f"data.max_seq_len ({self.max_seq_len}) is not a multiple of data.pad_multiple "
               f"({self.pad_multiple}); use e.g. {_round_up(self.max_seq_len, self.pad_multiple)}.")
        _validate_image(self.image)
        _validate_text(self.text, self.max_seq_len)
        _validate_packing(self.packing)
        _validate_reader(self.reader)
        for key, sources in (("sources", self.sources), ("eval_sources", self.eval_sources)):
            for i, src in enumerate(sources):
                _validate_source(src, f"data.{key}[{i}]")
        return self


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _validate_source(src: SourceConfig, key: str) -> None:
    _check(src.weight > 0, f"{key}.weight ({src.weight}) must be > 0.")
    if src.format == "energon":
        _check(bool(src.path) and src.paths is None,
               f"{key}: format energon reads an Energon dataset folder or metadataset YAML from "
               f"{key}.path (got path={src.path!r}, paths={src.paths!r}); set path, drop paths.")
        _check(src.field_map is None, f"{key}.field_map is read from the Energon dataset.yaml "
               "for format energon; remove it.")
        return
    _check(src.path is None, f"{key}.path is only read by format energon; use {key}.paths "
           "for tar shards.")
    _check(bool(src.paths), f"{key}.paths is empty; give a glob, a brace range or a list of "
           "tar shards.")
    if src.format == "vqa":
        _check(src.field_map is not None and {"image", "context", "answers"} <= set(
            src.field_map), f"{key}: format vqa needs field_map with image, context and "
            "answers (e.g. {image: jpg, context: 'json[question]', answers: 'json[answer]'}).")


def _validate_image(c: ImageConfig) -> None:
    p = c.patch_size
    _check(p > 0, f"data.image.patch_size ({p}) must be positive.")
    _check(c.fixed_size >= p and c.fixed_size % p == 0,
           f"data.image.fixed_size ({c.fixed_size}) must be a positive multiple of "
           f"data.image.patch_size ({p}); use {max(p, c.fixed_size // p * p)}.")
    _check(p * p <= c.min_pixels <= c.max_pixels,
           f"data.image.min_pixels ({c.min_pixels}) must be ≥ patch_size² ({p * p}) and ≤ "
           f"data.image.max_pixels ({c.max_pixels}).")
    _check(c.max_aspect_ratio >= 1.0,
           f"data.image.max_aspect_ratio ({c.max_aspect_ratio}) must be ≥ 1.")
    _check(c.dali_threads >= 1 and c.decode_batch_size >= 1,
           f"data.image.dali_threads ({c.dali_threads}) and data.image.decode_batch_size "
           f"({c.decode_batch_size}) must be ≥ 1.")


def _validate_text(c: TextConfig, max_seq_len: int) -> None:
    if c.max_sample_len is not None:
        _check(0 < c.max_sample_len <= max_seq_len,
               f"data.text.max_sample_len ({c.max_sample_len}) must be in [1, data.max_seq_len "
               f"({max_seq_len})]; use null for max_seq_len.")


def _validate_packing(c: PackingConfig) -> None:
    _check(c.buffer_size >= 1, f"data.packing.buffer_size ({c.buffer_size}) must be ≥ 1.")
    _check(c.buffer_rows >= 1, f"data.packing.buffer_rows ({c.buffer_rows}) must be ≥ 1.")
    _check(c.exact_fill_rows >= 0,
           f"data.packing.exact_fill_rows ({c.exact_fill_rows}) must be ≥ 0 (0 disables).")


def _validate_reader(c: ReaderConfig) -> None:
    _check(c.num_workers >= 0, f"data.reader.num_workers ({c.num_workers}) must be ≥ 0.")
    _check(c.streams_per_source >= 1,
           f"data.reader.streams_per_source ({c.streams_per_source}) must be ≥ 1.")
    _check(c.shuffle_buffer >= 1,
           f"data.reader.shuffle_buffer ({c.shuffle_buffer}) must be ≥ 1 (1 = no shuffle).")
    _check(c.max_consecutive_skips >= 1,
           f"data.reader.max_consecutive_skips ({c.max_consecutive_skips}) must be ≥ 1.")
    _check(c.max_worker_restarts >= 0,
           f"data.reader.max_worker_restarts ({c.max_worker_restarts}) must be ≥ 0.")
    _check(c.remote_retries >= 0 and c.remote_backoff_s >= 0 and c.remote_read_ahead_mib >= 1,
           f"data.reader.remote_retries ({c.remote_retries}) and remote_backoff_s "
           f"({c.remote_backoff_s}) must be ≥ 0, remote_read_ahead_mib "
           f"({c.remote_read_ahead_mib}) ≥ 1.")
    _check(c.prefetch >= 1 and c.snapshot_interval >= 1,
           f"data.reader.prefetch ({c.prefetch}) and data.reader.snapshot_interval "
           f"({c.snapshot_interval}) must be ≥ 1.")
