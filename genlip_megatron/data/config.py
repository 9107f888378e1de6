"""Data-side config sections (owned by genlip_megatron.data)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class DataConfig:
    """Where samples come from and how rows are packed."""

    max_seq_len: int = 16384
    """Tokens per packed row (a multiple of 16)."""
