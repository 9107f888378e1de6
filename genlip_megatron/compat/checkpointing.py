"""Cheap result queue for synchronous torch_dist checkpoint saves.

megatron-core's ``FileSystemWriterAsync`` (used by the torch_dist strategy for every save, sync or
async) collects the writer results through a ``multiprocessing.get_context("spawn").Manager()
.Queue()`` created on the first save of each process. Starting that manager spawns a process that
re-imports ``__main__``: about 5 s per process on 2 CPU cores, and a hang when ``__main__`` starts a
process group at import time (docs/design.md, CPU workarounds).

A synchronous save writes from the saving process itself, so an in-process ``queue.Queue`` carries
the same results. Only valid while saves are synchronous: our trainer saves asynchronously only
on CUDA, where this patch is never applied.
"""

from __future__ import annotations

import queue

from genlip_megatron.compat._patching import PatchSet, import_or_none

_FS_ASYNC = "megatron.core.dist_checkpointing.strategies.filesystem_async"


def fast_sync_checkpoint_writes(patches: PatchSet) -> None:
    """Pre-set megatron's module-level write-results queue to an in-process ``queue.Queue``.

    Covers ``dist_checkpointing/strategies/filesystem_async.py`` ``_get_write_results_queue``
    (0.16.1) / ``get_write_results_queue`` (0.19.2); both create the Manager queue only while the
    module global ``_results_queue`` is None.

    TODO(upstream): remove when megatron-core skips the Manager queue for synchronous saves.
    """
    module = import_or_none(_FS_ASYNC)
    if module is not None and getattr(module, "_results_queue", None) is None:
        patches.setattr(module, "_results_queue", queue.Queue())
