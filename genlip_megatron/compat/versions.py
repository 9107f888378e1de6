"""Installed megatron-core / torch versions, and the releases each compat group applies to.

Every workaround in ``compat/`` targets a bug of particular upstream releases. :class:`Scope`
states them as PEP 440 specifiers; :func:`genlip_megatron.compat.apply_cpu_compat` skips a group
whose scope excludes the installed versions (its bug is fixed upstream, or the code it patches
does not exist there) and says so in :func:`genlip_megatron.compat.compat_report`.

Versions come from package metadata, not from importing megatron: the ``triton_stub`` group must
decide before ``megatron.core`` is first imported.
"""

from __future__ import annotations

import functools
import importlib.metadata
from dataclasses import dataclass
from typing import Optional

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

__all__ = ["Scope", "megatron_version", "torch_version", "torch_at_least", "TESTED"]

TESTED = {
    "main": {"python": "3.11", "torch": "2.13.0", "megatron-core": "0.16.1"},
    "newest-stack": {"python": "3.13", "torch": "2.10.0", "megatron-core": "0.19.2"},
}
"""The two CI lanes (docs/versions.md; .ci/newest_stack.sh)."""


def _release(text: str) -> Version:
    """``2.10.0+cu128`` → ``2.10.0``: local build tags and dev/rc suffixes do not change scope."""
    return Version(Version(text).base_version)


@functools.lru_cache(maxsize=None)
def megatron_version() -> Optional[Version]:
    """Installed megatron-core release (None when it is not installed)."""
    try:
        return _release(importlib.metadata.version("megatron-core"))
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_version() -> Version:
    """Installed torch release (without the ``+cpu``/``+cu128`` local tag)."""
    return _release(torch.__version__)


def torch_at_least(version: str) -> bool:
    """True when the installed torch release is ``version`` or newer."""
    return torch_version() >= Version(version)


@dataclass(frozen=True)
class Scope:
    """The upstream releases a compat group applies to.

    A bug that upstream fixes gets an upper bound (``megatron=">=0.16.1,<0.20"``) so the group is
    skipped from the fixed release on; no upper bound means "still present in the newest release
    we checked" (``checked``).
    """

    megatron: str
    """PEP 440 specifier of the affected megatron-core releases, e.g. ``">=0.16.1"``."""
    checked: str
    """megatron-core (and torch) releases whose sources were read to confirm the bug."""
    torch: str = ""
    """PEP 440 specifier of the affected torch releases; empty: every torch."""

    def skip_reason(self, megatron: Optional[Version] = None,
                    torch_release: Optional[Version] = None) -> Optional[str]:
        """Why the group does not apply to these versions (default: the installed ones), or None.

        Args:
            megatron: megatron-core release; None means the installed one.
            torch_release: torch release; None means the installed one.
        """
        megatron = megatron if megatron is not None else megatron_version()
        torch_release = torch_release if torch_release is not None else torch_version()
        if megatron is None:
            return "megatron-core is not installed"
        if megatron not in SpecifierSet(self.megatron):
            return f"megatron-core {megatron} is outside {self.megatron}"
        if self.torch and torch_release not in SpecifierSet(self.torch):
            return f"torch {torch_release} is outside {self.torch}"
        return None
