"""Guarded access to NVIDIA Transformer Engine.

An installed-but-broken TE (wrong CUDA, missing libcudnn) raises RuntimeError or OSError at
import, not ImportError, so every probe here catches any Exception.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def transformer_engine_available() -> bool:
    """True when ``import transformer_engine.pytorch`` succeeds and CUDA is usable."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - broken TE raises RuntimeError/OSError
        logger.debug("transformer_engine unavailable: %s", exc)
        return False
    return True


def require_transformer_engine(feature: str) -> None:
    """Raise a clear RuntimeError naming ``feature`` when TE/CUDA is missing."""
    if not transformer_engine_available():
        raise RuntimeError(f"{feature} needs NVIDIA Transformer Engine on a CUDA GPU; install the "
                           "'gpu' extra (pip install -e .[gpu]) on a GPU machine, or use the "
                           "local/CPU path of this feature.")
