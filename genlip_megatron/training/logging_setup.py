"""Rank-aware logging format, set once by the entry point."""

from __future__ import annotations

import logging
import os
import sys
import warnings


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
