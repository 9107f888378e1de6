"""Peak resident memory of a stretch of code in this process (Linux), for the CPU benchmarks.

CPU tensors have no allocator statistics like ``torch.cuda.max_memory_allocated``. glibc hands
large blocks back to the OS on free, so the resident set follows the live tensors, and the
kernel keeps its high-water mark (``VmHWM``), which ``/proc/self/clear_refs`` resets ("5", Linux
≥ 4.0). :class:`PeakRss` resets it at the start, so transient peaks of the set-up (imports,
data) do not hide the measured code's.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["PeakRss"]


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}; peak RSS needs Linux.")
    return int(match.group(1))


class PeakRss:
    """``with PeakRss() as m: ...`` → ``m.peak_bytes``: high-water mark above the start RSS."""

    def __enter__(self) -> "PeakRss":
        Path("/proc/self/clear_refs").write_text("5")      # VmHWM := current VmRSS
        self.start = _status_kib("VmRSS") * 1024
        self.peak_bytes = 0
        return self

    def __exit__(self, *exc) -> None:
        self.peak_bytes = _status_kib("VmHWM") * 1024 - self.start
