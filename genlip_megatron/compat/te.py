"""Guarded access to NVIDIA Transformer Engine.

An installed-but-broken TE (wrong CUDA, missing libcudnn) raises RuntimeError or OSError at
import, not ImportError, so every probe here catches any Exception.

Real TE needs a CUDA GPU. The CI stand-in (``tests/te_standin/standin_site/transformer_engine``,
put on
``sys.path`` only by the tests that ask for it) declares ``__cpu_standin__ = True`` and is
accepted without CUDA, so the TE-facing code paths run in CPU CI.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

logger = logging.getLogger(__name__)


def _is_cpu_standin() -> bool:
    """True when the importable ``transformer_engine`` is the CPU CI stand-in."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    import transformer_engine

    return bool(getattr(transformer_engine, "__cpu_standin__", False))


@functools.lru_cache(maxsize=1)
def transformer_engine_available() -> bool:
    """True when ``import transformer_engine.pytorch`` succeeds and CUDA is usable (or the
    importable TE is the CPU CI stand-in)."""
    try:
        import torch

        if not torch.cuda.is_available() and not _is_cpu_standin():
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


def te_provides_wgrad_accumulation_fusion() -> bool:
    """TE linears accumulate weight gradients into ``main_grad`` themselves
    (``fuse_wgrad_accumulation``, every TE release megatron-core 0.16 supports), without Apex."""
    return transformer_engine_available()
