"""Device/library facts the stand-in pretends to have (overridable for tests)."""

from __future__ import annotations

import os


def get_cudnn_version() -> tuple[int, int, int]:
    """cuDNN runtime version, from ``TE_STANDIN_CUDNN_VERSION`` (default 9.10.0)."""
    parts = os.environ.get("TE_STANDIN_CUDNN_VERSION", "9.10.0").split(".")
    return tuple(int(p) for p in (parts + ["0", "0"])[:3])  # type: ignore[return-value]


def get_device_compute_capability() -> tuple[int, int]:
    """SM architecture, from ``TE_STANDIN_SM_ARCH`` (default 90 = Hopper)."""
    arch = int(os.environ.get("TE_STANDIN_SM_ARCH", "90"))
    return arch // 10, arch % 10


def is_bf16_available() -> bool:
    return True
