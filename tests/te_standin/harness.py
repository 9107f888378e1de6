"""Runs test scenarios in ONE spawned worker process where the TE stand-in is importable.

megatron-core decides ``HAVE_TE`` at import time in a dozen modules, so the stand-in cannot be
switched on inside a pytest process that has already imported megatron (every other test
module does). The worker is a fresh ``spawn`` process: :func:`activate` puts
``standin_site/`` first on its ``sys.path`` before anything imports megatron, applies the CPU
compat layer and opens a gloo world of size 1. The pytest process itself never sees the
stand-in (tests/unit/model/test_model_attention.py checks it), so nothing leaks into other
tests. One worker serves the whole session (megatron's import costs ~10 s on 2 cores); every
scenario sets up and tears down megatron's parallel state itself.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any, Iterator

SITE = Path(__file__).resolve().parent / "standin_site"


def activate(site: str, rendezvous: str) -> None:
    """Worker initializer: stand-in on sys.path, CPU compat, gloo world of size 1."""
    sys.path.insert(0, site)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from genlip_megatron.compat import apply_cpu_compat

    apply_cpu_compat()
    import megatron.core.extensions.transformer_engine as te_ext

    if not te_ext.HAVE_TE:
        raise RuntimeError("the TE stand-in was not picked up by megatron-core")
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)


def dispatch(name: str, kwargs: dict) -> Any:
    """Worker side: run ``scenarios.<name>(**kwargs)``."""
    import scenarios

    return getattr(scenarios, name)(**kwargs)


class StandinWorker:
    """Parent side: submit scenarios by name and wait for their (picklable) results."""

    def __init__(self, tmp_dir: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=ctx, initializer=activate,
            initargs=(str(SITE), str(tmp_dir / "gloo_rdzv")))

    def run(self, name: str, timeout: float = 600, **kwargs: Any) -> Any:
        """``scenarios.<name>(**kwargs)`` in the worker; a hung scenario kills the worker."""
        future = self._pool.submit(dispatch, name, kwargs)
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            self._kill()
            raise

    def _kill(self) -> None:
        for process in list(getattr(self._pool, "_processes", {}).values()):
            process.kill()  # only the worker this object started
        self._pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    """Worker side: set environment variables (stand-in knobs) for one scenario."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
