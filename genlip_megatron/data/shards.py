"""Deterministic, resumable streams of raw webdataset samples for one data-parallel rank.

The order of samples a rank sees is a pure function of (seed, dp_rank, dp_size, data config);
it does not depend on the number of loader workers:

1. **Shards.** Each source's shards (sorted paths) are permuted per epoch from
   (seed, source, epoch); rank r takes every dp_size-th shard starting at r, and splits its
   share round-robin into ``K = min(streams_per_source, shards per rank)`` *streams*.
2. **Streams.** A stream reads its shards in order (:func:`iter_tar_samples`, webdataset's
   grouping of members into samples, recovering at member level from duplicate keys) and
   permutes consecutive blocks of ``shuffle_buffer`` samples with an RNG keyed on
   (seed, source, rank, stream, epoch, block). Its position is a small :class:`StreamCursor`
   (epoch, block, where the block starts, samples emitted from it), so a restore re-reads at
   most one block. Epochs repeat forever with a new shard permutation.
3. **Mixing.** Sample n of the rank comes from a source drawn by weight from an RNG keyed on
   (seed, rank, n // 1024); the c-th sample of source s comes from its stream c mod K.

A loader worker owns whole streams, so it reads only its own shards. Shards are checked once at
start-up (:func:`check_shards`): missing paths, directories, zero-byte files, empty tars and
files that are not tars are reported by name and left out *before* they are distributed, so
every rank and stream gets readable shards (or the loader refuses to start, naming them).
Under several ranks the trainer decides that list once for all of them (a :class:`ShardSurvey`:
rank 0's listing and every rank's problems), so the ranks partition the same list.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np

from genlip_megatron.config.data import SourceConfig
from genlip_megatron.data.storage import expand_pattern, is_remote, open_stream, read_head, \
    take_retries

logger = logging.getLogger(__name__)

_SHARD_TAG, _BLOCK_TAG, _MIX_TAG = 1, 2, 3
_MIX_CHUNK = 1024


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def expand_shards(paths: str | list[str], where: str = "data.sources") -> list[str]:
    """Expand globs and ``{000..099}`` brace ranges into a sorted, de-duplicated path list.

    Raises:
        FileNotFoundError: when nothing matches (names the config key).
    """
    from braceexpand import braceexpand

    patterns = [paths] if isinstance(paths, str) else list(paths)
    out: set[str] = set()
    for pattern in patterns:
        for p in braceexpand(pattern):
            # A literal path is kept even if missing: it is reported as an unreadable shard.
            out.update(expand_pattern(p))
    if not out:
        raise FileNotFoundError(f"{where}.paths {paths!r} matches no files; check the path or "
                                "build shards with tools/make_shards.py.")
    return sorted(out)


# Shard problems found at start-up (counter ``shards/<problem>``).
SHARD_PROBLEMS = ("missing", "directory", "empty", "not_a_tar", "unreachable")
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")


def check_shard(path: str) -> Optional[str]:
    """Why ``path`` cannot contribute samples (one of :data:`SHARD_PROBLEMS`), or None.

    Reads at most one 512-byte tar header: a tar of zero members is "empty" (not an error),
    a first header with a bad checksum is "not_a_tar". Compressed tars are accepted unread.
    """
    if is_remote(path):
        try:
            head = read_head(path, 512)
        except FileNotFoundError:
            return "missing"
        except OSError:
            return "unreachable"
        return _check_head(head)
    if not os.path.lexists(path):
        return "missing"
    if os.path.isdir(path):
        return "directory"
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return "missing"  # e.g. a dangling link or no permission: nothing can be read
    return _check_head(head)


def _check_head(head: bytes) -> Optional[str]:
    """Problem of a shard whose first (up to) 512 bytes are ``head``, or None."""
    if not head:
        return "empty"
    if head.startswith(_COMPRESSED_MAGIC):
        return None
    if len(head) < 512:
        return "not_a_tar"
    if head == bytes(512):
        return "empty"  # the end-of-archive block comes first
    try:
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return "not_a_tar"
    return None


def check_shards(shards: list[str], where: str,
                 check: Optional[Callable[[str], Optional[str]]] = None,
                 log: bool = True) -> tuple[list[str], dict[str, list[str]]]:
    """Split ``shards`` into the readable ones and ``{problem: [paths]}``; logs each problem.

    ``check`` replaces :func:`check_shard` (the trainer's fault-injection drills); ``log=False``
    leaves the logging to the caller (ranks that agree on the problems log them once).
    """
    check = check or check_shard
    good: list[str] = []
    bad: dict[str, list[str]] = {}
    remote = [p for p in shards if is_remote(p)]
    with ThreadPoolExecutor(16) as pool:  # one small ranged GET per object, in parallel
        found = dict(zip(remote, pool.map(check, remote)))
    for path in shards:
        problem = found[path] if path in found else check(path)
        if problem is None:
            good.append(path)
        else:
            bad.setdefault(problem, []).append(path)
    if log:
        log_problems(bad, where)
    return good, bad


def log_problems(bad: dict[str, list[str]], where: str) -> None:
    """One line per problem: which shards are left out and why."""
    for problem, paths in bad.items():
        level = logging.INFO if problem == "empty" else logging.WARNING
        logger.log(level, "%s: leaving out %d shard(s) that are %s: %s%s", where, len(paths),
                   problem.replace("_", " "), paths[:5], " ..." if len(paths) > 5 else "")


@dataclass
class ShardSurvey:
    """Every source's listed shards and the problems found in them, decided once for all
    ranks (the trainer lists on rank 0 and takes the union of every rank's problems), so a
    transient read error on one rank cannot give ranks different shard partitions."""

    paths: list[list[str]]          # per source: expanded, sorted
    problems: dict[str, str]        # path -> one of SHARD_PROBLEMS (found on any rank)


def list_shards(sources: list[SourceConfig], where: str = "data.sources") -> list[list[str]]:
    """Expanded shard paths of every source (raises FileNotFoundError naming the key)."""
    return [expand_shards(src.paths, f"{where}[{s}]") for s, src in enumerate(sources)]


def find_problems(paths: list[list[str]], where: str = "data.sources",
                  check: Optional[Callable[[str], Optional[str]]] = None) -> dict[str, str]:
    """``{path: problem}`` of this process's check of every listed shard (not logged)."""
    out: dict[str, str] = {}
    for s, listed in enumerate(paths):
        _, bad = check_shards(listed, f"{where}[{s}]", check=check, log=False)
        out.update({path: problem for problem, found in bad.items() for path in found})
    return out


def _split_member(name: str) -> tuple[Optional[str], Optional[str]]:
    """webdataset's base_plus_ext: ``dir/key.ext.more`` → (``dir/key``, ``ext.more``)."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (m.group(1), m.group(2)) if m else (None, None)


def iter_tar_samples(url: str, errors: list[str]) -> Iterator[dict]:
    """Samples of one tar, grouped like webdataset's ``tarfile_samples`` (consecutive members
    with the same key; lower-case extensions; ``__*__`` and non-file members ignored).

    Unlike webdataset it recovers at member level: a member whose extension is already in the
    current sample closes that sample and opens a new one with the same key, and any sample
    whose key was already seen in this tar is yielded with ``__duplicate__`` set (the caller
    counts and skips it). A read error ends the shard (a broken tar cannot be resynchronised)
    and is appended to ``errors``; the sample being assembled is yielded with the members read
    completely (as webdataset does), so it is processed or counted as a skip.
    """
    seen: set[str] = set()
    current: Optional[dict] = None

    def finish(sample: dict) -> dict:
        if sample["__key__"] in seen:
            sample["__duplicate__"] = True
        seen.add(sample["__key__"])
        return sample

    try:
        with open_stream(url) as f, tarfile.open(fileobj=f, mode="r|*") as stream:
            for info in stream:
                name = info.name
                if not info.isreg() or re.match(r"__[^/]*__($|/)", name) or \
                        ("/" not in name and name.startswith("__") and name.endswith("__")):
                    continue
                data = stream.extractfile(info).read()
                stream.members = []  # streaming: do not keep every TarInfo
                key, ext = _split_member(name)
                if key is None:
                    continue
                ext = ext.lower()
                if current is None or key != current["__key__"] or ext in current:
                    if current is not None:
                        yield finish(current)
                    current = {"__key__": key, "__url__": url}
                current[ext] = data
    except Exception as exc:  # tarfile raises several types on broken archives
        errors.append(f"{type(exc).__name__}: {str(exc)[:160]}")
    if current is not None:
        yield finish(current)


def rank_streams(shards: list[str], *, seed: int, source: int, epoch: int, dp_rank: int,
                 dp_size: int, streams: int, shuffle: bool) -> list[list[str]]:
    """Shards of each stream of one rank in one epoch (``len`` = number of streams)."""
    order = _rng(seed, _SHARD_TAG, source, epoch).permutation(len(shards)) if shuffle \
        else np.arange(len(shards))
    mine = [shards[i] for i in order[dp_rank::dp_size]]
    k = min(streams, len(mine))
    return [mine[i::k] for i in range(k)]


def num_streams(num_shards: int, dp_rank: int, dp_size: int, streams: int) -> int:
    """Streams a rank has for a source with ``num_shards`` shards (constant over epochs)."""
    return min(streams, len(range(dp_rank, num_shards, dp_size)))


@dataclass
class StreamCursor:
    """Position in a stream: the current block and how much of it has been emitted."""

    epoch: int = 0
    block: int = 0   # block index within the epoch
    shard: int = 0   # index (in this epoch's stream shard list) where the block starts
    offset: int = 0  # samples into that shard where the block starts
    pos: int = 0     # samples of the block already emitted

    def to_list(self) -> list[int]:
        return [self.epoch, self.block, self.shard, self.offset, self.pos]

    @classmethod
    def from_list(cls, v: list[int]) -> "StreamCursor":
        return cls(*[int(x) for x in v])


@dataclass
class RawSample:
    """One webdataset sample as bytes, with where it came from."""

    members: dict[str, bytes]  # extension → bytes (webdataset keys, lower-case)
    key: str
    url: str
    source: int
    cursor_after: list[int]    # StreamCursor.to_list() after this sample was emitted
    shard_errors: list[str] = field(default_factory=list)  # unreadable shards met before it
    duplicate: bool = False    # its key already appeared earlier in the same shard
    retries: int = 0           # object-store reads retried in this process since the last report


class ShardStream:
    """An infinite, block-shuffled, resumable stream over one rank's share of a source.

    Args:
        shards: all shard paths of the source (sorted).
        source: source index; stream: stream index within the rank; seed, dp_rank, dp_size:
            the determinism key; streams: number of streams of this source on this rank.
        shuffle_buffer: block size of the sample shuffle (1 disables it).
        shuffle_shards: permute shards per epoch.
    """

    def __init__(self, shards: list[str], *, source: int, stream: int, seed: int, dp_rank: int,
                 dp_size: int, streams: int, shuffle_buffer: int, shuffle_shards: bool) -> None:
        self.shards, self.source, self.stream = shards, source, stream
        self.seed, self.dp_rank, self.dp_size, self.streams = seed, dp_rank, dp_size, streams
        self.block_size, self.shuffle_shards = shuffle_buffer, shuffle_shards
        self.cursor = StreamCursor()
        self._block: list[dict] = []
        self._order: Optional[np.ndarray] = None  # permutation of the loaded block
        self._reader: Optional[Iterator[dict]] = None
        self._reader_at = (-1, -1, 0)  # (epoch, shard, offset) the open reader will yield next
        self._pending_errors: list[str] = []  # unreadable shards met while loading a block
        self._block_errors: list[str] = []
        self._next_block_at = (0, 0)

    def restore(self, cursor: StreamCursor) -> None:
        """Continue from ``cursor`` (the block is re-read on the next sample)."""
        self.cursor = StreamCursor(**vars(cursor))
        self._order = None
        self._reader = None
        self._reader_at = (-1, -1, 0)
        self._pending_errors = []

    def _epoch_shards(self, epoch: int) -> list[str]:
        return rank_streams(self.shards, seed=self.seed, source=self.source, epoch=epoch,
                            dp_rank=self.dp_rank, dp_size=self.dp_size, streams=self.streams,
                            shuffle=self.shuffle_shards)[self.stream]

    def _open(self, epoch: int, shard: int, offset: int) -> None:
        """Position the tar reader at sample ``offset`` of shard ``shard``."""
        url = self._epoch_shards(epoch)[shard]
        errors: list[str] = []

        def samples():
            yield from iter_tar_samples(url, errors)
            if errors:
                logger.warning("skipping the rest of unreadable shard %s (%s)", url, errors[0])
                self._pending_errors.append(url)

        self._reader = samples()
        for _ in range(offset):
            if next(self._reader, None) is None:
                break
        self._reader_at = (epoch, shard, offset)

    def _load_block(self) -> None:
        """Read the block at ``self.cursor`` into memory and draw its permutation."""
        c = self.cursor
        while True:
            shards = self._epoch_shards(c.epoch)
            if self._reader_at != (c.epoch, c.shard, c.offset):
                self._reader = None
            block: list[dict] = []
            shard, offset = c.shard, c.offset
            while len(block) < self.block_size and shard < len(shards):
                if self._reader is None:
                    self._open(c.epoch, shard, offset)
                sample = next(self._reader, None)
                if sample is None:
                    shard, offset, self._reader = shard + 1, 0, None
                    continue
                offset += 1
                block.append(sample)
            self._reader_at = (c.epoch, shard, offset)
            if block:
                self._block = block
                rng = _rng(self.seed, _BLOCK_TAG, self.source, self.dp_rank, self.stream,
                           c.epoch, c.block)
                self._order = rng.permutation(len(block)) if self.block_size > 1 \
                    else np.arange(len(block))
                self._next_block_at = (shard, offset)
                self._block_errors, self._pending_errors = self._pending_errors, []
                return
            if c.block == 0:
                # Shards are checked at start-up, so this is a stream whose every shard broke
                # (or was emptied) since; nothing can be read from it.
                raise RuntimeError(f"stream {self.stream} of source {self.source} on rank "
                                   f"{self.dp_rank} read no sample in a whole epoch from its "
                                   f"shards {shards}: they were unreadable or empty when read "
                                   "(see the warnings above). Fix or remove them from "
                                   "data.sources.")
            self.cursor = c = StreamCursor(epoch=c.epoch + 1)

    def __next__(self) -> RawSample:
        while True:
            if self._order is None:
                self._load_block()
            c = self.cursor
            if c.pos < len(self._order):
                break
            shard, offset = self._next_block_at
            self.cursor = StreamCursor(c.epoch, c.block + 1, shard, offset, 0)
            self._order = None
        sample = self._block[self._order[c.pos]]
        # Shard errors met while reading a block travel with its first sample only, so a
        # restore that re-reads the block mid-way does not count them twice.
        errors = self._block_errors if c.pos == 0 else []
        c.pos += 1
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        return RawSample(members, sample.get("__key__", "?"), sample.get("__url__", "?"),
                         self.source, c.to_list(), list(errors),
                         duplicate=sample.get("__duplicate__", False), retries=take_retries())


class SourceSchedule:
    """Which source (and stream) feeds each logical sample index of a rank.

    Args:
        weights: per-source weights; streams: per-source stream counts; seed, dp_rank: key.
    """

    def __init__(self, weights: list[float], streams: list[int], seed: int, dp_rank: int) -> None:
        w = np.asarray(weights, np.float64)
        self.p = w / w.sum()
        self.streams = streams
        self.seed, self.dp_rank = seed, dp_rank
        self.offsets = np.concatenate([[0], np.cumsum(streams)])  # global stream ids
        self._chunk = (-1, None)

    @property
    def total_streams(self) -> int:
        return int(self.offsets[-1])

    def source_of(self, n: int) -> int:
        """Source of logical sample ``n``."""
        if len(self.p) == 1:
            return 0
        chunk = n // _MIX_CHUNK
        if self._chunk[0] != chunk:
            rng = _rng(self.seed, _MIX_TAG, self.dp_rank, chunk)
            self._chunk = (chunk, rng.choice(len(self.p), size=_MIX_CHUNK, p=self.p))
        return int(self._chunk[1][n % _MIX_CHUNK])

    def walk(self, n: int, counts: list[int]) -> Iterator[tuple[int, int, int]]:
        """Yield ``(n, source, global_stream)`` from index ``n`` on; ``counts`` (samples drawn
        per source so far) is updated in place, so it always describes the next index."""
        while True:
            s = self.source_of(n)
            g = int(self.offsets[s]) + counts[s] % self.streams[s]
            counts[s] += 1
            yield n, s, g
            n += 1


def source_shards(sources: list[SourceConfig], dp_size: int, where: str = "data.sources",
                  survey: Optional[ShardSurvey] = None
                  ) -> tuple[list[list[str]], dict[str, list[str]]]:
    """Readable shards of every source and the problems left out (see :func:`check_shards`).

    ``survey``: the shards and problems the ranks agreed on, logged once by whoever agreed on
    them (default: list, check and log here).

    Raises:
        ValueError: a source has fewer readable shards than data-parallel ranks (names them).
    """
    log = survey is None
    if survey is None:
        listed = list_shards(sources, where)
        survey = ShardSurvey(listed, find_problems(listed, where))
    out: list[list[str]] = []
    problems: dict[str, list[str]] = {}
    for s, listed in enumerate(survey.paths):
        key = f"{where}[{s}]"
        good = [p for p in listed if p not in survey.problems]
        bad: dict[str, list[str]] = {}
        for path in listed:
            if path in survey.problems:
                bad.setdefault(survey.problems[path], []).append(path)
        if log:
            log_problems(bad, key)
        for problem, paths in bad.items():
            problems.setdefault(problem, []).extend(paths)
        if len(good) < dp_size:
            listed_bad = "; ".join(f"{p.replace('_', ' ')}: {paths[:5]}"
                                   for p, paths in bad.items())
            raise ValueError(f"{key}.paths has {len(good)} readable shard(s) but there are "
                             f"{dp_size} data-parallel ranks; every rank needs at least one "
                             f"(left out: {listed_bad or 'none'}). Write more, smaller shards "
                             "(tools/make_shards.py --samples-per-shard) or fix the paths.")
        out.append(good)
    return out, problems


def build_streams(sources: list[SourceConfig], *, seed: int, dp_rank: int, dp_size: int,
                  streams_per_source: int, shuffle_buffer: int, shuffle_shards: bool,
                  where: str = "data.sources", shards: Optional[list[list[str]]] = None
                  ) -> tuple[list[ShardStream], SourceSchedule]:
    """All streams of one rank (indexed by global stream id) and the mixing schedule.

    ``shards``: per-source shard lists already checked by :func:`source_shards` (default: check
    them here).
    """
    if shards is None:
        shards, _ = source_shards(sources, dp_size, where)
    streams: list[ShardStream] = []
    per_source: list[int] = []
    for s, paths in enumerate(shards):
        k = num_streams(len(paths), dp_rank, dp_size, streams_per_source)
        per_source.append(k)
        streams += [ShardStream(paths, source=s, stream=i, seed=seed, dp_rank=dp_rank,
                                dp_size=dp_size, streams=k, shuffle_buffer=shuffle_buffer,
                                shuffle_shards=shuffle_shards) for i in range(k)]
    schedule = SourceSchedule([s.weight for s in sources], per_source, seed, dp_rank)
    return streams, schedule
