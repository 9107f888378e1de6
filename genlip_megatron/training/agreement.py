"""Ranks agree on a start-up step that can fail on some ranks and not others.

A rank-dependent failure after the process group started (one rank's shard read error, a
file only some nodes see) used to print a traceback on the failing ranks while the others
waited in their next collective until the rendezvous timeout. :func:`agree_on_startup` runs
the step on every rank, shares the outcome with one ``all_gather_object``, and makes every rank
fail with the first failing rank's message: a user error becomes :class:`ConfigError` (one
``error:`` line from rank 0, status 2), anything else a ``RuntimeError`` on the healthy ranks
while the failing rank keeps its own traceback. :func:`agree_on_shards` decides the shard list
once for every rank (a shard that fails the check on any rank is left out by all).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, TypeVar

import torch.distributed as dist

from genlip_megatron.config import ConfigError
from genlip_megatron.data.shards import ShardSurvey, check_shard, find_problems, list_shards, \
    log_problems
from genlip_megatron.training.faults import maybe_inject

logger = logging.getLogger(__name__)

T = TypeVar("T")

USER_ERRORS = (ConfigError, ValueError, OSError, ImportError)
"""Failures caused by the inputs (paths, shards, missing packages), reported as ConfigError."""


def agree_on_startup(what: str, step: Callable[[], T]) -> T:
    """``step()`` on every rank; raises on EVERY rank when it failed on any (collective)."""
    result, failure, own = None, None, None
    try:
        result = step()
    except Exception as exc:   # noqa: BLE001 - shared with the other ranks, then re-raised
        own = exc
        rank = dist.get_rank() if dist.is_initialized() else 0
        failure = (isinstance(exc, USER_ERRORS),
                   f"{what} failed on rank {rank}: {' '.join(str(exc).split())}")
    failures = [failure]
    if dist.is_initialized() and dist.get_world_size() > 1:
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, failure)
    first = next((f for f in failures if f is not None), None)
    if first is None:
        return result
    user_error, message = first
    if user_error:
        raise ConfigError(message) from own
    if own is not None:
        raise own
    raise RuntimeError(message)


def agree_on_shards(sources: list, where: str = "data.sources") -> ShardSurvey:
    """The shard list and shard problems every rank uses (collective; call on every rank).

    Each rank used to check the shards alone, so one rank's transient read error (a network
    file system hiccup) left a shard out on that rank only and gave the ranks different shard
    partitions: samples read twice or never, silently. Rank 0 lists the sources (one listing
    of a shared file system or bucket, broadcast), every rank checks every shard, and a shard
    with a problem on ANY rank is left out by all (one ``all_gather_object`` of the problems,
    which are few); rank 0 logs it once, naming the ranks that found it.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    listed = agree_on_startup("listing the data shards",
                              lambda: list_shards(sources, where) if rank == 0 else None)
    if world > 1:
        box = [listed]
        dist.broadcast_object_list(box, src=0)
        listed = box[0]
    mine = agree_on_startup("checking the data shards",
                            lambda: find_problems(listed, where, check=_check_shard))
    found = [mine]
    if world > 1:
        found = [None] * world
        dist.all_gather_object(found, mine)
    problems: dict[str, str] = {}
    seen_by: dict[str, list[int]] = {}
    for r, theirs in enumerate(found):
        for path, problem in theirs.items():
            problems.setdefault(path, problem)
            seen_by.setdefault(path, []).append(r)
    if rank == 0:
        _log_agreed_problems(listed, problems, seen_by, world, where)
    return ShardSurvey(listed, problems)


def _check_shard(path: str) -> Optional[str]:
    """:func:`check_shard` with the ``shards:check`` fault-injection point (training/faults.py:
    ``shards:check=EIO*1:rank1`` is one transient read error on rank 1)."""
    try:
        maybe_inject("shards:check")
    except OSError:
        return "unreachable"
    return check_shard(path)


def _log_agreed_problems(listed: list[list[str]], problems: dict[str, str],
                         seen_by: dict[str, list[int]], world: int, where: str) -> None:
    for s, paths in enumerate(listed):
        bad: dict[str, list[str]] = {}
        for path in paths:
            if path in problems:
                bad.setdefault(problems[path], []).append(path)
        log_problems(bad, f"{where}[{s}]")
        partial_view = [p for p in paths if p in seen_by and len(seen_by[p]) < world]
        if partial_view:
            logger.warning("%s[%d]: %d of these shard(s) failed the check on some ranks only "
                           "(e.g. %s on rank(s) %s); every rank leaves them out, so the ranks "
                           "share one shard partition", where, s, len(partial_view),
                           partial_view[0], seen_by[partial_view[0]])
