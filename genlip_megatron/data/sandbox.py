"""Decoding in throw-away child processes, to find the image that crashes a native decoder.

DALI's CPU decoder has segfaulted on real data (``libdali_operators.so``); a crash kills the
loader worker, which the loader restarts from its cursor, telling it which samples were in
flight. The new worker decodes those here: the batch runs in a helper process; if the helper
dies by a signal (or hangs), the batch is split in halves and each half retried, down to the
single images that crash a helper by themselves. Those come back as
``SampleError("decoder_crash")``; the rest come back decoded exactly as in the worker (same
decoder, same pixels).

The helper is a fresh interpreter (``subprocess``: fork + immediate exec), never a bare
``fork()`` of the worker: the worker runs DALI's thread pool, and a forked copy of a threaded
process can deadlock on a lock some other thread held (seen on Python 3.13), which then looked
like a hang and got good images counted as ``decoder_crash``. A fresh process also inherits no
descriptor but its own pipes (``close_fds``: not the worker's queue write end, whose holder
would keep the trainer from seeing the worker's death), dies with the worker (parent-death
signal) and ignores the trainer's stop signals (procguard.py). One helper serves every attempt
until it crashes, so the decoder is built once, not per attempt; each attempt has a bounded
timeout that grows with the batch (``ATTEMPT_BASE_S`` + ``ATTEMPT_PER_IMAGE_S`` per image), not
a flat 120 s per bisection step.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import BinaryIO, Optional, Sequence, Union

import numpy as np
import torch

from genlip_megatron.config.data import ImageConfig
from genlip_megatron.data.image import DecodeResult, build_decoder
from genlip_megatron.data.template import SampleError

logger = logging.getLogger(__name__)

ATTEMPT_BASE_S = 10.0
"""Per-attempt timeout: this much plus ``ATTEMPT_PER_IMAGE_S`` per image of the attempt."""
ATTEMPT_PER_IMAGE_S = 0.5
STARTUP_TIMEOUT_S = 120.0
"""A helper must import and build its decoder within this (not counted in the attempts)."""

_HEADER = struct.Struct("<Q")


@dataclass
class Isolated:
    """An image decoded in a child process, and whether it came from the Pillow fallback."""

    image: Union[DecodeResult, SampleError]
    fallback: bool = False


def _decode_here(decoder, datas: list[bytes], sizes: list[tuple[int, int]]) -> list[tuple]:
    images = decoder.decode(datas, sizes)
    fell = getattr(decoder, "last_fallbacks", set())
    return [(img.numpy() if isinstance(img, torch.Tensor) else img, i in fell)
            for i, img in enumerate(images)]


def _send(f: BinaryIO, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(_HEADER.pack(len(data)) + data)
    f.flush()


def _read_exact(fd: int, n: int, deadline: Optional[float]) -> Optional[bytes]:
    """``n`` bytes from ``fd``; None on end-of-file or when ``deadline`` passes."""
    chunks, got = [], 0
    # poll, not select: select() refuses descriptors ≥ FD_SETSIZE (1024), which a long-lived
    # trainer with many shards, workers and sockets reaches.
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000.0):
                return None
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _receive(fd: int, deadline: Optional[float]):
    header = _read_exact(fd, _HEADER.size, deadline)
    if header is None:
        return None
    body = _read_exact(fd, _HEADER.unpack(header)[0], deadline)
    return None if body is None else pickle.loads(body)


class _Helper:
    """One decoding helper process (``python -m genlip_megatron.data.sandbox``)."""

    def __init__(self, cfg: ImageConfig, device: str):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, str(os.getpid())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     close_fds=True, env=env)
        _send(self.proc.stdin, (cfg, device))
        if _receive(self.proc.stdout.fileno(), time.monotonic() + STARTUP_TIMEOUT_S) != "ready":
            why = self.stop()
            raise RuntimeError(f"the decoder sandbox process did not start ({why})")

    def attempt(self, datas: list[bytes], sizes: list[tuple[int, int]]
                ) -> Union[list[Isolated], str]:
        """Decoded images, or why the helper failed (it is then stopped)."""
        timeout_s = ATTEMPT_BASE_S + ATTEMPT_PER_IMAGE_S * len(datas)
        try:
            _send(self.proc.stdin, (datas, sizes))
            got = _receive(self.proc.stdout.fileno(), time.monotonic() + timeout_s)
        except (BrokenPipeError, OSError):
            got = None
        if got is None:
            hung = self.proc.poll() is None
            why = self.stop()
            return f"decoder process hung for {timeout_s:.0f} s" if hung else why
        return [Isolated(torch.from_numpy(img) if isinstance(img, np.ndarray) else img, fb)
                for img, fb in got]

    def stop(self) -> str:
        """Kill and reap the helper; how it ended."""
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        if code < 0:
            return f"decoder process killed by {signal.Signals(-code).name}"
        return f"decoder process exited with {code}"


def decode_isolated(cfg: ImageConfig, device: str, datas: Sequence[bytes],
                    sizes: Sequence[tuple[int, int]]) -> list[Isolated]:
    """Decode ``datas`` in child processes, bisecting around crashes (see module docstring)."""
    if device != "cpu":  # a GPU decode runs in the trainer and cannot be contained here
        decoder = build_decoder(cfg, device)
        images = decoder.decode(list(datas), list(sizes))
        fell = getattr(decoder, "last_fallbacks", set())
        return [Isolated(img, i in fell) for i, img in enumerate(images)]
    out: list = [None] * len(datas)
    helper: list[Optional[_Helper]] = [None]

    def run(idx: list[int]) -> None:
        if helper[0] is None:
            helper[0] = _Helper(cfg, device)
        got = helper[0].attempt([datas[i] for i in idx], [sizes[i] for i in idx])
        if not isinstance(got, str):
            for i, item in zip(idx, got):
                out[i] = item
            return
        helper[0] = None   # it was stopped: the next attempt starts a fresh one
        if len(idx) == 1:
            logger.warning("image %d of the batch in flight at a decoder crash crashes the "
                           "decoder by itself (%s); skipping it as decoder_crash", idx[0], got)
            out[idx[0]] = Isolated(SampleError("decoder_crash", got))
        else:
            half = len(idx) // 2
            run(idx[:half])
            run(idx[half:])

    try:
        if datas:
            run(list(range(len(datas))))
    finally:
        if helper[0] is not None:
            helper[0].stop()
    return out


def _serve(parent_pid: int) -> None:
    """The helper's loop: build the decoder, then decode each request until end-of-input."""
    from genlip_megatron.data.procguard import exit_with, ignore_stop_signals

    ignore_stop_signals()
    exit_with(parent_pid)
    faulthandler.disable()   # a crash here is expected and reported by the parent
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr   # stray prints must not corrupt the reply stream
    cfg, device = _receive(stdin.fileno(), None)
    decoder = build_decoder(cfg, device)
    _send(stdout, "ready")
    while (request := _receive(stdin.fileno(), None)) is not None:
        _send(stdout, _decode_here(decoder, *request))


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
