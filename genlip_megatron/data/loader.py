"""The training loader: an infinite, exactly resumable iterator of PackedBatch micro-batches.

Per data-parallel rank (nothing here talks to other ranks):

    streams (shards.py) ──► workers: SampleProcessor (decode, tokenize) ──► main: Packer ──► rows
          ▲ each worker owns whole streams and emits its samples in logical order;
            the main process merges them back into the one logical order (shards.SourceSchedule)

Determinism: the logical sample order depends on (seed, dp_rank, dp_size, data config) only, not
on ``data.reader.num_workers``; packing depends only on that order; so the rows are identical for
any worker count. Resume: :meth:`PackedLoader.state_dict` stores a resume point (logical index,
per-source counts, per-stream cursors) no later than the oldest sample still in the packing
buffer, the index of the next unconsumed sample and the indices of the buffered samples. A
restore re-reads from the resume point, processes only the buffered samples again (the others
are skipped without decoding), and so continues with exactly the rows the uninterrupted run
would have produced. No pixels are stored.

Hostile data and dying workers (nothing stops, hangs or silently thins a run):
- every per-sample problem is a counted skip (``skipped/<reason>``), so ``samples/read ==
  samples/used + Σ skipped/*``; shard problems are counted apart (``shards/<problem>``);
- a source that yields ``data.reader.max_consecutive_skips`` skips in a row, or a whole epoch
  of every stream without a usable sample, stops the run with the reason instead of looping;
- the trainer waits on each worker's queue *and* its process sentinel, and holds no write end
  of the queue, so a worker killed mid-message (SIGKILL, a native segfault) is noticed within
  a second; it is restarted from the cursor of the last sample it delivered, with the samples
  it had in flight marked as suspects (decoded in isolation, see sandbox.py), up to
  ``data.reader.max_worker_restarts`` deaths in a row;
- workers (and the forkserver) exit when the trainer dies, ignore the trainer's stop signals
  and end on SIGTERM (procguard.py).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Iterator, Optional

import numpy as np
import torch

from genlip_megatron.data.batch import PackedBatch
from genlip_megatron.config.data import DataConfig
from genlip_megatron.data.energon import resolve_data_config
from genlip_megatron.data.image import dali_available, resolve_device
from genlip_megatron.data.packer import Packer, collate_rows
from genlip_megatron.data.procguard import exit_with, ignore_stop_signals
from genlip_megatron.data.sample import SKIP_REASONS, ProcessedSample, SampleProcessor, \
    SampleResult, Skipped
from genlip_megatron.data.shards import SHARD_PROBLEMS, ShardSurvey, StreamCursor, \
    build_streams, source_shards
from genlip_megatron.data.storage import configure, policy_of
from genlip_megatron.data.tokenizer import TextTokenizer, load_tokenizer

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_INFLIGHT_MAX = 1024  # logical indices a worker can report as in flight
_SHARD_SET_KEYS = frozenset({"num_shards", "streams", "shard_digest"})
"""Fingerprint keys that change when only the shard set changed (data.reshard_on_resume)."""
_RESEED_TAG = 4   # after shards._SHARD_TAG, _BLOCK_TAG, _MIX_TAG


class DataStateMismatch(ValueError):
    """A checkpoint's data-loader state does not fit this run's data (message: the fix)."""


def shard_digest(paths: list[str]) -> str:
    """Identity of a source's shard set: its sorted file names (not directories, so the same
    shards moved to another mount still match)."""
    names = "\n".join(sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in paths))
    return hashlib.sha1(names.encode()).hexdigest()[:16]


@dataclass
class ResumePoint:
    """Where producers start, and which of the re-read samples must be processed again."""

    index: int                  # first logical index to read
    counts: list[int]           # samples drawn per source before ``index``
    cursors: list[list[int]]    # StreamCursor per global stream, as of ``index``
    replay_until: int = 0       # indices below this were consumed before the save ...
    keep: frozenset = frozenset()  # ... except these, which sat in the packing buffer
    suspects: frozenset = frozenset()  # in flight at a worker crash: decode in isolation
    crashed: frozenset = frozenset()   # (url, key) known to crash the decoder: never retried


class Producer:
    """Reads the streams one worker owns and processes their samples in logical order.

    Args:
        cfg: the ``data`` section; tokenizer: its tokenizer; seed, dp_rank, dp_size: stream key.
        worker, num_workers: this producer owns global streams ``g`` with g % num_workers ==
            worker.
        start: resume point. decode: decode images here (else the main process does).
    """

    def __init__(self, cfg: DataConfig, tokenizer: TextTokenizer, *, seed: int, dp_rank: int,
                 dp_size: int, worker: int, num_workers: int, start: ResumePoint,
                 decode: bool, shards: Optional[list[list[str]]] = None,
                 inflight=None) -> None:
        configure(policy_of(cfg.reader))
        self.streams, self.schedule = build_streams(
            cfg.sources, seed=seed, dp_rank=dp_rank, dp_size=dp_size,
            streams_per_source=cfg.reader.streams_per_source,
            shuffle_buffer=cfg.reader.shuffle_buffer, shuffle_shards=cfg.reader.shuffle_shards,
            shards=shards)
        for g, stream in enumerate(self.streams):
            if g % num_workers == worker:
                stream.restore(StreamCursor.from_list(start.cursors[g]))
        self.processor = SampleProcessor(cfg, tokenizer, decode=decode)
        self.processor.crashed |= start.crashed
        self.worker, self.num_workers, self.start = worker, num_workers, start
        self.batch_size = cfg.image.decode_batch_size
        self.inflight = inflight  # shared array: [count, index...] being processed now

    def __iter__(self) -> Iterator[list[SampleResult]]:
        results: list[SampleResult] = []
        todo: list[tuple[int, object]] = []  # (position in results, raw) to process
        start = self.start
        for n, _, g in self.schedule.walk(start.index, list(start.counts)):
            if g % self.num_workers != self.worker:
                continue
            raw = next(self.streams[g])
            results.append(SampleResult(n, g, raw.cursor_after, raw.shard_errors,
                                        retries=raw.retries))
            if n >= start.replay_until or n in start.keep:
                todo.append((len(results) - 1, (n, raw)))
            if len(todo) >= self.batch_size or len(results) >= 4 * self.batch_size:
                yield self._finish(results, todo)
                results, todo = [], []

    def _finish(self, results: list[SampleResult], todo: list) -> list[SampleResult]:
        self._mark([n for _, (n, _) in todo])
        items = self.processor.process([raw for _, raw in todo], self.start.suspects)
        self._mark([])
        for (i, _), item in zip(todo, items):
            results[i].item = item
        return results

    def _mark(self, indices: list[int]) -> None:
        """Publish the logical indices being processed (read by the trainer if we crash)."""
        if self.inflight is None:
            return
        indices = indices[:_INFLIGHT_MAX]
        self.inflight[0] = 0
        self.inflight[1:1 + len(indices)] = indices
        self.inflight[0] = len(indices)


def _worker_main(worker: int, num_workers: int, cfg: DataConfig, tokenizer: TextTokenizer,
                 seed: int, dp_rank: int, dp_size: int, start: ResumePoint, decode: bool,
                 out: "mp.Queue", log_level: int, shards: list[list[str]], inflight,
                 trainer_pid: int) -> None:
    """Entry point of a loader worker process."""
    ignore_stop_signals()   # the trainer stops on them, not its workers (procguard.py)
    exit_with(trainer_pid)
    logging.basicConfig(level=log_level,
                        format=f"[data worker {worker} rank {dp_rank}] %(levelname)s %(message)s")
    torch.set_num_threads(1)
    try:
        producer = Producer(cfg, tokenizer, seed=seed, dp_rank=dp_rank, dp_size=dp_size,
                            worker=worker, num_workers=num_workers, start=start, decode=decode,
                            shards=shards, inflight=inflight)
        for batch in producer:
            out.put(("ok", batch))
    except BaseException:  # report everything, including KeyboardInterrupt, to the trainer
        out.put(("error", traceback.format_exc()))


@dataclass
class _Worker:
    """A running worker process, its queue, and its in-flight array."""

    proc: object
    queue: object
    inflight: object
    deaths: int = 0  # deaths since it last delivered a sample
    suspects: frozenset = frozenset()


class PackedLoader:
    """Infinite iterator of :class:`PackedBatch` (``micro_batch_size`` rows × ``max_seq_len``).

    Args:
        cfg: the ``data`` section (validated here).
        dp_rank, dp_size: this rank's data-parallel coordinates.
        micro_batch_size: rows per batch.
        seed: data-order seed (the run seed).
        tokenizer: an already loaded tokenizer (default: ``cfg.text.tokenizer_path``).
        survey: the shards and shard problems all ranks agreed on (``training.agreement``);
            default: this process lists and checks the shards alone.
    """

    def __init__(self, cfg: DataConfig, *, dp_rank: int, dp_size: int, micro_batch_size: int,
                 seed: int, tokenizer: Optional[TextTokenizer] = None,
                 survey: Optional[ShardSurvey] = None) -> None:
        cfg = resolve_data_config(cfg.validate())
        configure(policy_of(cfg.reader))
        if not cfg.sources:
            raise ValueError("data.sources is empty; list at least one source of tar shards.")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank ({dp_rank}) must be in [0, dp_size={dp_size}).")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) must be ≥ 1.")
        if cfg.image.decoder == "dali" and not dali_available():
            raise ImportError("data.image.decoder is 'dali' but NVIDIA DALI is not installed; "
                              "`pip install nvidia-dali-cuda120`, or set data.image.decoder: "
                              "pillow.")
        if tokenizer is None:
            if cfg.text.tokenizer_path is None:
                raise ValueError("data.text.tokenizer_path is not set; point it at a "
                                 "tokenizer.json (tools/fetch_qwen3_tokenizer.py).")
            tokenizer = load_tokenizer(cfg.text.tokenizer_path)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.micro_batch_size = micro_batch_size
        self._shards, problems = source_shards(cfg.sources, dp_size, survey=survey)
        self._reseeded_at: Optional[int] = None   # step of the last reshard (None: never)
        self._stream_seed = seed   # the streams' seed: ``seed``, or derived at a reshard
        streams = self._build_streams()
        self._num_shards = [0] * len(cfg.sources)
        for stream in streams:
            self._num_shards[stream.source] = len(stream.shards)
        self._stream_source = [s.source for s in streams]
        self._num_workers = min(cfg.reader.num_workers, len(streams))
        if cfg.reader.num_workers > len(streams):
            logger.warning("data.reader.num_workers (%d) > shard streams on rank %d (%d); "
                           "only %d workers start", cfg.reader.num_workers, dp_rank,
                           len(streams), len(streams))
        device = resolve_device(cfg.image)
        self._decode_in_main = cfg.image.decode_in_main or device == "gpu"
        self._main_processor = SampleProcessor(cfg, tokenizer, decode=True, device=device) \
            if self._decode_in_main else None
        self.packer = Packer(cfg.packing, cfg.max_seq_len)
        self._counters = self._zero_counters()
        # each shard left out at start-up is counted once, by the rank it would have gone to
        for problem, paths in problems.items():
            self._counters[f"shards/{problem}"] += len(paths[dp_rank::dp_size])
        self._startup_counters = {k: v for k, v in self._counters.items() if v}
        self._procs: list[_Worker] = []
        self._crashed: set[tuple[str, str]] = set()  # (url, key) that crashed a decoder
        self._reset(ResumePoint(0, [0] * len(cfg.sources),
                                [StreamCursor().to_list() for _ in streams]))

    # ------------------------------------------------------------------ public API
    def __iter__(self) -> "PackedLoader":
        return self

    def __next__(self) -> PackedBatch:
        self._finish_replay()
        self._loaded_state = None
        rows = []
        for _ in range(self.micro_batch_size):
            while not self.packer.ready():
                self._consume(self._pull())
            rows.append(self.packer.pop_row())
        batch = collate_rows(rows, self.cfg.max_seq_len)
        c = self._counters
        c["rows"] += len(rows)
        c["samples/packed"] += sum(len(row) for row in rows)
        c["tokens/real"] += sum(s.length for row in rows for s in row)
        c["tokens/total"] += len(rows) * self.cfg.max_seq_len
        return batch

    def counters(self) -> dict[str, int]:
        """Per-rank counts: ``samples/read`` (= ``samples/used`` + Σ ``skipped/<reason>``),
        ``samples/packed`` (used samples placed in rows; the rest wait in the packing buffer),
        ``shards/<problem>`` (missing, directory, empty, not_a_tar at start-up; unreadable when
        a read fails), ``decode_fallbacks`` (DALI → Pillow), ``worker_restarts``, ``rows``,
        ``tokens/real``, ``tokens/total``, ``info/unknown_keys``, ``epoch/<source>``."""
        out = dict(self._counters)
        for s, src in enumerate(self.cfg.sources):
            epochs = [c[0] for g, c in enumerate(self._cursors) if self._stream_source[g] == s]
            out[f"epoch/{src.name or f'source{s}'}"] = min(epochs)
        return out

    def state_dict(self) -> dict:
        """Compact, torch.save-able state of this rank's loader (no pixels, no token ids)."""
        if self._loaded_state is not None:  # restored but not iterated yet
            return dict(self._loaded_state)
        first = self.packer.buffer[0].index if self.packer.buffer else self._next_index
        snap = next(s for s in reversed(self._snapshots) if s[0] <= first)
        return {
            "version": STATE_VERSION,
            "key": self._fingerprint(),
            "resume": {"index": snap[0], "counts": list(snap[1]),
                       "cursors": [list(c) for c in snap[2]]},
            "next_index": self._next_index,
            "buffer": [s.index for s in self.packer.buffer],
            "counters": dict(self._counters),
            "reseeded_at": self._reseeded_at,
        }

    def load_state_dict(self, state: dict, strict: bool = True,
                        reshard_step: Optional[int] = None) -> None:
        """Continue exactly where ``state`` was taken (same rank, seed and data layout).

        With ``strict=False`` a state from a different layout (e.g. another dp_size) only
        restores the counters and starts every stream at the epoch after the saved one.
        ``reshard_step`` (``data.reshard_on_resume``): a state whose only difference is the
        shard set (a shard dropped, added or replaced) restores the counters and restarts the
        streams over today's shards at epoch 0 with a seed derived from (seed, reshard_step),
        so the resumed run is reproducible; without it that state is refused
        (:class:`DataStateMismatch`, naming the switch).
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')} is not "
                             f"{STATE_VERSION}; it was written by another genlip_megatron.")
        saved_key = state["key"]
        # keys a state written by an older version lacks are not compared
        diff = {k: (v, saved_key.get(k)) for k, v in self._fingerprint().items()
                if k in saved_key and saved_key[k] != v}
        counters = {**self._zero_counters(), **state["counters"]}
        if "skipped/shard_error" in counters:  # states written before shards/* existed
            counters["shards/unreadable"] += counters.pop("skipped/shard_error")
        # the stream counts follow the shard counts; a changed streams_per_source alone is not
        # a changed shard set
        shards_only = set(diff) <= _SHARD_SET_KEYS and bool(
            set(diff) & {"num_shards", "shard_digest"})
        if shards_only and reshard_step is not None:
            self._reshard(saved_key, reshard_step, counters)
            return
        if diff and strict:
            raise DataStateMismatch(self._mismatch_message(diff, shards_only))
        if diff:
            epoch = 1 + max(c[0] for c in state["resume"]["cursors"])
            logger.warning("data loader state from another layout %s: starting epoch %d", diff,
                           epoch)
            self._reset(ResumePoint(0, [0] * len(self.cfg.sources),
                                    [StreamCursor(epoch=epoch).to_list()
                                     for _ in self._cursors]), counters)
            return
        self._use_stream_seed(state.get("reseeded_at"))
        r = state["resume"]
        self._reset(ResumePoint(r["index"], list(r["counts"]), [list(c) for c in r["cursors"]],
                                state["next_index"], frozenset(state["buffer"])), counters)
        self._loaded_state = dict(state)
        self._expected_buffer = list(state["buffer"])

    def _mismatch_message(self, diff: dict, shards_only: bool) -> str:
        if shards_only:
            return (f"the data shards changed since the checkpoint was written ("
                    f"{self._shard_change(diff)}), so its data stream positions do not fit "
                    "them; set data.reshard_on_resume=true to resume the model, optimizer and "
                    "step and restart the data streams over the new shards (re-seeded from the "
                    "seed and the step), or restore the old shard set.")
        shown = {k: v for k, v in diff.items() if k != "shard_digest"}
        return (f"data loader state does not match this run (now, saved): {shown or diff}; "
                "the sample stream cannot be reproduced. Use the same seed, dp_size and data "
                "config, or load_state_dict(state, strict=False) to keep only the counters and "
                "start a fresh epoch.")

    def _shard_change(self, diff: dict) -> str:
        """``source 0: 4 → 3 shards (1 removed)`` for every source whose shard set changed."""
        now = self._fingerprint()
        saved_n = diff.get("num_shards", (None, now["num_shards"]))[1]
        saved_d = diff.get("shard_digest", (None, now["shard_digest"]))[1]
        parts = []
        for s, (n_now, n_saved) in enumerate(zip(now["num_shards"], saved_n)):
            if n_now == n_saved and now["shard_digest"][s] == saved_d[s]:
                continue
            net = n_now - n_saved
            what = f"{net} added" if net > 0 else f"{-net} removed" if net < 0 else \
                "same count, different shards"
            parts.append(f"data.sources[{s}]: {n_saved} → {n_now} shards, {what}")
        return "; ".join(parts) or "shard streams differ"

    def _reshard(self, saved_key: dict, step: int, counters: dict) -> None:
        """Restart every stream at epoch 0 over today's shards, re-seeded from the step."""
        change = self._shard_change({k: (None, saved_key.get(k)) for k in _SHARD_SET_KEYS
                                     if k in saved_key})
        self._use_stream_seed(step)
        logger.warning("data.reshard_on_resume: the shard set changed since the checkpoint "
                       "(%s); the data streams restart at epoch 0 over the new shards, "
                       "re-seeded from the seed and step %d (counters kept)", change, step)
        self._reset(ResumePoint(0, [0] * len(self.cfg.sources),
                                [StreamCursor().to_list() for _ in self._cursors]), counters)

    def _use_stream_seed(self, reseeded_at: Optional[int]) -> None:
        """The streams' seed: the run seed, or after a reshard at step k one derived from
        (seed, k); rebuilds the mixing schedule with it."""
        self._reseeded_at = None if reseeded_at is None else int(reseeded_at)
        seed = self.seed if reseeded_at is None else int(np.random.SeedSequence(
            [self.seed, _RESEED_TAG, int(reseeded_at)]).generate_state(1)[0])
        if seed != self._stream_seed:
            self._stream_seed = seed
            self._build_streams()

    def _build_streams(self) -> list:
        """This rank's streams and the mixing schedule for ``self._stream_seed``."""
        r = self.cfg.reader
        streams, self._schedule = build_streams(
            self.cfg.sources, seed=self._stream_seed, dp_rank=self.dp_rank,
            dp_size=self.dp_size, streams_per_source=r.streams_per_source,
            shuffle_buffer=r.shuffle_buffer, shuffle_shards=r.shuffle_shards,
            shards=self._shards)
        return streams

    def close(self) -> None:
        """Stop the worker processes."""
        for w in self._procs:
            _stop(w)
        self._procs = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ internals
    def _zero_counters(self) -> dict[str, int]:
        names = ["samples/read", "samples/used", "samples/packed", "rows", "tokens/real",
                 "tokens/total", "info/unknown_keys", "decode_fallbacks", "worker_restarts",
                 "shards/unreadable", "shards/retries"] + \
            [f"shards/{p}" for p in SHARD_PROBLEMS] + \
            [f"skipped/{r}" for r in SKIP_REASONS]
        return {k: 0 for k in names}

    def _fingerprint(self) -> dict:
        r = self.cfg.reader
        return {"dp_rank": self.dp_rank, "dp_size": self.dp_size, "seed": self.seed,
                "num_shards": list(self._num_shards),
                "shard_digest": [shard_digest(paths) for paths in self._shards],
                "streams": list(self._schedule.streams),
                "weights": [s.weight for s in self.cfg.sources],
                "shuffle_buffer": r.shuffle_buffer, "shuffle_shards": r.shuffle_shards,
                "max_seq_len": self.cfg.max_seq_len}

    def _reset(self, start: ResumePoint, counters: Optional[dict] = None) -> None:
        self.close()
        self.packer.clear()
        if counters is not None:
            self._counters = counters
        self._start = start
        self._next_index = start.index
        self._counts = list(start.counts)       # consumed samples per source
        self._cursors = [list(c) for c in start.cursors]
        self._snapshots = deque([(start.index, list(self._counts),
                                  [list(c) for c in self._cursors])])
        self._lookahead: deque[SampleResult] = deque()
        self._since_use = [_Streak() for _ in self.cfg.sources]
        self._ordered: Optional[Iterator[SampleResult]] = None
        self._loaded_state: Optional[dict] = None
        self._expected_buffer: Optional[list[int]] = None

    def _finish_replay(self) -> None:
        """After a restore, re-read up to the saved position and refill the packing buffer."""
        if self._next_index >= self._start.replay_until:
            return
        count = self._start.replay_until - self._next_index
        while self._next_index < self._start.replay_until:
            self._consume(self._pull())
        got = [s.index for s in self.packer.buffer]
        if self._expected_buffer is not None and got != self._expected_buffer:
            raise RuntimeError(f"data loader restore rebuilt the packing buffer as {got[:8]}... "
                               f"but the checkpoint has {self._expected_buffer[:8]}...; the "
                               "shards changed since the checkpoint was written?")
        logger.info("data loader rank %d: replayed %d samples to restore %d buffered samples",
                    self.dp_rank, count, len(got))

    def _pull(self) -> SampleResult:
        if not self._lookahead:
            if self._ordered is None:
                self._ordered = self._ordered_results()
            batch = [next(self._ordered)]
            if self._decode_in_main:
                while len(batch) < self.cfg.image.decode_batch_size:
                    batch.append(next(self._ordered))
                self._decode_batch(batch)
            self._lookahead.extend(batch)
        return self._lookahead.popleft()

    def _decode_batch(self, batch: list[SampleResult]) -> None:
        todo = [r for r in batch if isinstance(r.item, ProcessedSample)]
        for r, item in zip(todo, self._main_processor.decode([r.item for r in todo])):
            r.item = item

    def _ordered_results(self) -> Iterator[SampleResult]:
        """Every sample from the resume point on, in logical order."""
        start = self._start
        decode = not self._decode_in_main
        if self._num_workers == 0:
            producer = Producer(self.cfg, self.tokenizer, seed=self._stream_seed,
                                dp_rank=self.dp_rank,
                                dp_size=self.dp_size, worker=0, num_workers=1, start=start,
                                decode=decode, shards=self._shards)
            for batch in producer:
                yield from batch
            return
        for w in range(self._num_workers):
            self._procs.append(self._spawn(w, start, decode))
        pending = [deque() for _ in self._procs]
        delivered = [list(c) for c in start.cursors]  # stream cursors after what we yielded
        counts = list(start.counts)
        for n, s, g in self._schedule.walk(start.index, counts):
            w = g % self._num_workers
            while not pending[w]:
                batch = self._get(w)
                if batch is None:  # it died: restart it at sample n
                    before = list(counts)
                    before[s] -= 1
                    self._restart(w, ResumePoint(n, before, [list(c) for c in delivered],
                                                 start.replay_until, start.keep), decode)
                    continue
                pending[w].extend(batch)
            result = pending[w].popleft()
            if result.index != n:
                raise RuntimeError(f"data worker {w} sent sample {result.index}, expected {n}")
            delivered[result.stream] = result.cursor_after
            self._procs[w].deaths = 0
            yield result

    def _spawn(self, w: int, start: ResumePoint, decode: bool) -> _Worker:
        ctx = mp.get_context(self.cfg.reader.start_method)
        if self.cfg.reader.start_method == "forkserver":
            # Only effective before the server starts; later loaders fork a warm process.
            preload = [__name__] + (["nvidia.dali.fn"] if self.cfg.image.decoder == "dali"
                                    else [])
            ctx.set_forkserver_preload(preload)
        depth = max(2, self.cfg.reader.prefetch // self.cfg.image.decode_batch_size)
        q = ctx.Queue(maxsize=depth)
        inflight = ctx.Array("q", 1 + _INFLIGHT_MAX, lock=False)
        proc = ctx.Process(
            target=_worker_main, daemon=True, name=f"genlip-data-{self.dp_rank}-{w}",
            args=(w, self._num_workers, self.cfg, self.tokenizer, self._stream_seed,
                  self.dp_rank, self.dp_size, start, decode, q,
                  logging.getLogger().getEffectiveLevel(), self._shards, inflight, os.getpid()))
        proc.start()
        # Hold no write end: a worker dying mid-message then reads as end-of-file here
        # instead of a read that waits forever for the rest of the message.
        q._writer.close()
        return _Worker(proc, q, inflight, suspects=start.suspects)

    def _get(self, w: int) -> Optional[list[SampleResult]]:
        """The next batch of worker ``w``, or None if it died (noticed within a second)."""
        worker = self._procs[w]
        proc, q = worker.proc, worker.queue
        while True:
            ready = wait([q._reader, proc.sentinel], timeout=1.0)
            if q._reader in ready:
                try:
                    kind, payload = q.get(timeout=1.0)
                except queue_mod.Empty:
                    continue
                except (EOFError, OSError):  # the worker died while writing a message
                    return None
                if kind == "error":
                    raise RuntimeError(f"data loader worker {w} of rank {self.dp_rank} failed:"
                                       f"\n{payload}")
                return payload
            if proc.sentinel in ready or not proc.is_alive():
                return None

    def _restart(self, w: int, start: ResumePoint, decode: bool) -> None:
        """Replace dead worker ``w`` by one that starts at ``start`` (see module docstring)."""
        old = self._procs[w]
        old.proc.join(timeout=5)
        code = old.proc.exitcode
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 \
            else f"exit code {code}"
        count = int(old.inflight[0])
        inflight = frozenset(int(i) for i in old.inflight[1:1 + count])
        _stop(old)
        deaths = old.deaths + 1
        limit = self.cfg.reader.max_worker_restarts
        if deaths > limit:
            raise RuntimeError(
                f"data loader worker {w} of rank {self.dp_rank} died {deaths} times in a row "
                f"without delivering a sample (last: {how}; samples in flight: "
                f"{sorted(inflight)[:8]}); giving up (data.reader.max_worker_restarts = "
                f"{limit}). Check the worker log above and the shards of data.sources.")
        logger.warning("data loader worker %d of rank %d died (%s) with %d samples in flight; "
                       "restarting it at sample %d (restart %d of at most %d in a row)", w,
                       self.dp_rank, how, len(inflight), start.index, deaths, limit)
        self._counters["worker_restarts"] += 1
        start.suspects = old.suspects | inflight
        start.crashed = frozenset(self._crashed)
        self._procs[w] = self._spawn(w, start, decode)
        self._procs[w].deaths = deaths

    def _consume(self, res: SampleResult) -> None:
        """Account for the next sample in logical order and buffer it if it is usable."""
        n = res.index
        if n != self._next_index:
            raise RuntimeError(f"data loader consumed sample {n}, expected {self._next_index}")
        self._cursors[res.stream] = res.cursor_after
        source = self._stream_source[res.stream]
        self._counts[source] += 1
        item = res.item
        if n >= self._start.replay_until:  # counters of replayed samples are in the checkpoint
            self._count(res)
        if isinstance(item, ProcessedSample):
            self.packer.push(item)
            self._since_use[source] = _Streak()
        elif isinstance(item, Skipped):
            if item.reason == "decoder_crash":
                self._crashed.add((item.url, item.key))
            self._check_progress(source, item, res.stream, res.cursor_after[0])
        self._next_index = n + 1
        if self._next_index % self.cfg.reader.snapshot_interval == 0:
            self._snapshots.append((self._next_index, list(self._counts),
                                    [list(c) for c in self._cursors]))
            first = self.packer.buffer[0].index if self.packer.buffer else self._next_index
            while len(self._snapshots) > 1 and self._snapshots[1][0] <= first:
                self._snapshots.popleft()

    def _check_progress(self, source: int, skip: Skipped, stream: int, epoch: int) -> None:
        """Stop instead of looping forever on a source that yields nothing usable: after
        ``max_consecutive_skips`` skips in a row, or once every stream of the source has read
        two epoch boundaries' worth (a whole epoch) without a usable sample."""
        streak = self._since_use[source]
        streak.skips += 1
        streak.reasons[skip.reason] += 1
        first, _ = streak.epochs.get(stream, (epoch, epoch))
        streak.epochs[stream] = (first, epoch)
        limit = self.cfg.reader.max_consecutive_skips
        streams = self._stream_source.count(source)
        whole_epoch = len(streak.epochs) == streams and \
            all(last - first >= 2 for first, last in streak.epochs.values())
        if streak.skips < limit and not whole_epoch:
            return
        src = self.cfg.sources[source]
        why = ", ".join(f"{r}: {k}" for r, k in streak.reasons.most_common(4))
        hint = " (data.max_seq_len / data.text.max_sample_len is below these samples)" \
            if streak.reasons.most_common(1)[0][0] == "too_long" else ""
        trigger = "a whole epoch" if whole_epoch else "data.reader.max_consecutive_skips"
        raise RuntimeError(
            f"data source {src.name or f'source{source}'} ({src.paths}) on rank "
            f"{self.dp_rank} gave {streak.skips} skipped samples in a row and no usable one "
            f"({trigger}); reasons: {why}{hint}; last: {skip.key} of {skip.url}: "
            f"{skip.detail}. Fix the data or the config; training would otherwise wait "
            "forever.")

    def _count(self, res: SampleResult) -> None:
        c = self._counters
        c["samples/read"] += 1
        c["shards/unreadable"] += len(res.shard_errors)
        c["shards/retries"] += res.retries
        item = res.item
        if getattr(item, "unknown_keys", False):
            c["info/unknown_keys"] += 1
        if isinstance(item, Skipped):
            c[f"skipped/{item.reason}"] += 1
        elif isinstance(item, ProcessedSample):
            c["samples/used"] += 1
            c["decode_fallbacks"] += int(item.fallback)


@dataclass
class _Streak:
    """Skips of one source since its last usable sample."""

    skips: int = 0
    epochs: dict = field(default_factory=dict)  # stream → (epoch at first skip, latest epoch)
    reasons: Counter = field(default_factory=Counter)


def _stop(w: _Worker) -> None:
    if w.proc.is_alive():
        w.proc.terminate()
    w.proc.join(timeout=5)
    if w.proc.is_alive():
        w.proc.kill()
        w.proc.join(timeout=5)
    w.queue.cancel_join_thread()
    w.queue.close()


def build_train_loader(cfg: DataConfig, *, dp_rank: int, dp_size: int, micro_batch_size: int,
                       seed: int, tokenizer: Optional[TextTokenizer] = None,
                       survey: Optional[ShardSurvey] = None) -> PackedLoader:
    """The training loader of one data-parallel rank (see :class:`PackedLoader`); ``survey``:
    the shard list and problems every rank agreed on (default: this process checks alone)."""
    return PackedLoader(cfg, dp_rank=dp_rank, dp_size=dp_size,
                        micro_batch_size=micro_batch_size, seed=seed, tokenizer=tokenizer,
                        survey=survey)


def packing_efficiency(counters: dict[str, int]) -> float:
    """Non-padding fraction of all row slots so far (``tokens/real / tokens/total``)."""
    return counters["tokens/real"] / max(1, counters["tokens/total"])


__all__ = ["PackedLoader", "build_train_loader", "packing_efficiency", "ResumePoint",
           "Producer", "DataStateMismatch", "shard_digest"]
