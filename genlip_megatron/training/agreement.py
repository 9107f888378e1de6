"""Ranks agree on a start-up step that can fail on some ranks and not others.

A rank-dependent failure after the process group started (one rank's shard read error, a
file only some nodes see) used to print a traceback on the failing ranks while the others
waited in their next collective until the rendezvous timeout. :func:`agree_on_startup` runs
the step on every rank, shares the outcome with one ``all_gather_object``, and makes every rank
fail with the first failing rank's message: a user error becomes :class:`ConfigError` (one
``error:`` line from rank 0, status 2), anything else a ``RuntimeError`` on the healthy ranks
while the failing rank keeps its own traceback.
"""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

import torch.distributed as dist

from genlip_megatron.config import ConfigError

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
