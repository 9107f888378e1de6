"""Held-out micro-batches for the validation loss: the same packed rows at every evaluation.

The validation loss must be comparable across evaluations and across parallel layouts, so the
held-out set is cut ONCE into a fixed, global sequence of micro-batches that does not depend on
the data-parallel size:

- ``data.eval_sources`` are read in file order (every shard, no shuffling, no mixing) and packed
  next-fit into rows of ``data.max_seq_len`` tokens (a sample never moves to a later row once a
  row is open, so the rows depend only on the file order);
- rows form global micro-batches of ``micro_batch_size`` rows; one evaluation iteration takes
  ``dp × microbatches_per_rank`` of them (one global batch, as a training step does), and
  data-parallel rank d keeps its contiguous share, exactly as the DP-invariant training stream
  does (``training/data_stream.py``).

Only this rank's share is decoded and kept on the host (uint8 patches); every rank tokenises the
held-out samples to pack them, which is cheap next to decoding. A sample that fails is dropped
from its row with a log line (every rank drops the same one), so the token count stays honest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from genlip_megatron.data.batch import PackedBatch
from genlip_megatron.config.data import DataConfig
from genlip_megatron.data.inference import eval_raw_batches
from genlip_megatron.data.packer import collate_rows
from genlip_megatron.data.sample import ProcessedSample, SampleProcessor, Skipped
from genlip_megatron.data.tokenizer import TextTokenizer, load_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class HeldOutBatches:
    """This rank's held-out micro-batches, per evaluation iteration.

    Attributes:
        iterations: ``[iters][microbatches_per_rank]`` PackedBatch (rows × ``max_seq_len``).
        rows_total: packed rows used over all ranks.
        skipped: held-out samples dropped before packing (unreadable, too long); the same on
            every rank. Decode failures of this rank's rows are logged as they happen.
    """

    iterations: list[list[PackedBatch]] = field(default_factory=list)
    rows_total: int = 0
    skipped: int = 0


def pack_next_fit(samples: list[ProcessedSample], capacity: int) -> list[list[ProcessedSample]]:
    """Rows of whole samples in the given order; a row closes when the next one does not fit."""
    rows: list[list[ProcessedSample]] = []
    row: list[ProcessedSample] = []
    used = 0
    for s in samples:
        if row and used + s.length > capacity:
            rows.append(row)
            row, used = [], 0
        row.append(s)
        used += s.length
    if row:
        rows.append(row)
    return rows


def _tokenised_samples(cfg: DataConfig, processor: SampleProcessor, limit_tokens: int
                       ) -> tuple[list[ProcessedSample], int]:
    """Undecoded held-out samples in file order until ``limit_tokens`` tokens (and skips)."""
    out: list[ProcessedSample] = []
    tokens = skipped = 0
    for raws in eval_raw_batches(cfg, 0, 1):
        for item in processor.process(raws):
            if isinstance(item, Skipped):
                skipped += 1
                continue
            out.append(item)
            tokens += item.length
        if tokens >= limit_tokens:
            break
    return out, skipped


def build_held_out_batches(cfg: DataConfig, *, micro_batch_size: int, microbatches_per_rank: int,
                           iters: int, dp_rank: int, dp_size: int,
                           tokenizer: Optional[TextTokenizer] = None) -> HeldOutBatches:
    """Cut ``data.eval_sources`` into ``iters`` evaluation iterations (see module docstring).

    Fewer iterations are returned when the held-out set is smaller than ``iters`` global
    batches (logged); none when it cannot fill one global batch.

    Raises:
        ValueError: ``data.eval_sources`` is empty.
    """
    if not cfg.eval_sources:
        raise ValueError("data.eval_sources is empty; list held-out shards for the validation "
                         "loss (evaluation.interval).")
    tokenizer = tokenizer or load_tokenizer(cfg.text.tokenizer_path)
    formats = [s.format for s in cfg.eval_sources]
    processor = SampleProcessor(cfg, tokenizer, decode=False, formats=formats, device="cpu")
    per_iter = dp_size * microbatches_per_rank                 # global micro-batches / iteration
    want_rows = iters * per_iter * micro_batch_size
    samples, skipped = _tokenised_samples(cfg, processor, (want_rows + 1) * cfg.max_seq_len)
    rows = pack_next_fit(samples, cfg.max_seq_len)
    n_iters = min(iters, len(rows) // (per_iter * micro_batch_size))
    if n_iters < iters:
        logger.warning("held-out set fills %d of evaluation.iters=%d global batches (%d rows of "
                       "%d tokens); validating on %d.", n_iters, iters, len(rows),
                       cfg.max_seq_len, n_iters)
    out = HeldOutBatches(rows_total=n_iters * per_iter * micro_batch_size, skipped=skipped)
    # Decode only this rank's rows: each rank holds 1/dp of the held-out pixels.
    decoder = SampleProcessor(cfg, tokenizer, decode=True, formats=formats, device="cpu")
    for it in range(n_iters):
        mine = []
        for m in range(microbatches_per_rank):
            g = (it * per_iter + dp_rank * microbatches_per_rank + m) * micro_batch_size
            mine.append(_decoded_batch(decoder, rows[g:g + micro_batch_size], cfg.max_seq_len))
        out.iterations.append(mine)
    return out


def _decoded_batch(processor: SampleProcessor, rows: list[list[ProcessedSample]],
                   seq_len: int) -> PackedBatch:
    """Decode the rows' images and collate them; a sample that fails leaves its row."""
    flat = [s for row in rows for s in row]
    decoded = processor.decode(flat)
    bad = {(d.url, d.key) for d in decoded if isinstance(d, Skipped)}
    for d in decoded:
        if isinstance(d, Skipped):
            logger.warning("held-out sample %s of %s dropped (%s)", d.key, d.url, d.reason)
    kept = [[s for s in row if (s.url, s.key) not in bad] for row in rows]
    return collate_rows(kept, seq_len)


__all__ = ["HeldOutBatches", "build_held_out_batches", "pack_next_fit"]
