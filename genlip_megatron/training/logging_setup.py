"""Rank-aware logging format, set once by the entry point, and one-write status lines."""

from __future__ import annotations

import faulthandler
import io
import logging
import os
import sys
import tempfile
import warnings
from typing import Optional, TextIO


def write_line(line: str, stream: Optional[TextIO] = None) -> None:
    """One status line (default: stdout) in a single ``write(2)``.

    Every rank shares the launcher's pipe; ``print`` writes the text and its newline
    separately, so two ranks' lines merged into one and a reader that splits lines lost one.
    A pipe write under ``PIPE_BUF`` bytes is never interleaved. Written to the file descriptor
    directly (nothing else buffered goes with it: the watchdog calls this right before
    ``os._exit``); a stream without one (a test's capture) gets one ``write``.
    """
    stream = sys.stdout if stream is None else stream
    data = line + "\n"
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        stream.write(data)
        stream.flush()
        return
    stream.flush()
    os.write(fd, data.encode("utf-8", "replace"))


PIPE_ATOMIC_BYTES = 4096
"""POSIX ``PIPE_BUF`` on Linux: a pipe write up to this size is never interleaved."""


def dump_stacks(stream: TextIO) -> None:
    """Every thread's Python stack to ``stream`` in writes of whole lines, each atomic.

    ``faulthandler`` writes a frame in several small pieces; two ranks dumping at once into
    the launcher's pipe broke each other's lines (``in maybe_inject`` split by the other
    rank's bytes). Dumped to a temporary file first, then written line-aligned in chunks of
    at most ``PIPE_ATOMIC_BYTES``: the ranks' chunks may alternate, their lines stay whole.
    """
    stream.flush()
    with tempfile.TemporaryFile() as tmp:
        faulthandler.dump_traceback(file=tmp, all_threads=True)
        tmp.seek(0)
        lines = tmp.read().splitlines(keepends=True)
    chunk = b""
    for line in lines:
        if chunk and len(chunk) + len(line) > PIPE_ATOMIC_BYTES:
            os.write(stream.fileno(), chunk)
            chunk = b""
        chunk += line
    if chunk:
        os.write(stream.fileno(), chunk)


def setup_logging(rank: int, world_size: int, level: str | None = None) -> None:
    """Log INFO from the ranks in ``LOG_RANK`` (default: the last rank, which holds the loss).

    Other ranks log WARNING and above, so errors of any rank still show.
    """
    wanted = os.environ.get("LOG_RANK", str(world_size - 1))
    verbose = wanted == "all" or str(rank) in wanted.split(",")
    lvl = level or ("INFO" if verbose else "WARNING")
    fmt = f"[%(asctime)s rank{rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=lvl, format=fmt, datefmt="%H:%M:%S", stream=sys.stdout,
                        force=True)
    # megatron-core is chatty at INFO on every rank about fallbacks we choose on purpose.
    for noisy in ("megatron.core", "torch.distributed"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    silence_expected_warnings()


def silence_expected_warnings() -> None:
    """Filter warnings we expect and act on already; call before megatron is first imported.

    megatron-core warns at import time, once per importing module (four modules), that TE/Apex
    are missing (on CPU the local path is what we chose); a filter installed after those imports
    (as :func:`setup_logging` runs) is too late, hence this separate early call.
    """
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) "
                            "not installed.*")
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    # megatron-core ≥ 0.19 warns on import about an experimental model family we do not use;
    # torch DCP warns when a single process reads or writes a checkpoint (our converter and
    # pre-load checks do so on purpose).
    warnings.filterwarnings("ignore", message="MimoModelConfig is experimental")
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or "
                            "uninitialized")
