"""Decoding in throw-away child processes, to find the image that crashes a native decoder.

DALI's CPU decoder has segfaulted on real data (``libdali_operators.so``); a crash kills the
loader worker, which the loader restarts from its cursor, telling it which samples were in
flight. The new worker decodes those here: the batch runs in a forked child; if the child dies
by a signal (or hangs), the batch is split in halves and each half retried, down to the single
images that crash a child by themselves. Those come back as ``SampleError("decoder_crash")``;
the rest come back decoded exactly as in the worker (same decoder, same pixels).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import pickle
import select
import signal
import time
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

from genlip_megatron.config.data import ImageConfig
from genlip_megatron.data.image import DecodeResult, build_decoder
from genlip_megatron.data.template import SampleError

logger = logging.getLogger(__name__)


@dataclass
class Isolated:
    """An image decoded in a child process, and whether it came from the Pillow fallback."""

    image: Union[DecodeResult, SampleError]
    fallback: bool = False


def _decode_here(cfg: ImageConfig, device: str, datas: list[bytes],
                 sizes: list[tuple[int, int]]) -> list[tuple]:
    decoder = build_decoder(cfg, device)
    images = decoder.decode(datas, sizes)
    fell = getattr(decoder, "last_fallbacks", set())
    return [(img.numpy() if isinstance(img, torch.Tensor) else img, i in fell)
            for i, img in enumerate(images)]


def _attempt(cfg: ImageConfig, device: str, datas: list[bytes], sizes: list[tuple[int, int]],
             timeout_s: float) -> Union[list[Isolated], str]:
    """Decode in one forked child: its results, or why it failed (a signal, a hang).

    ``os.fork`` rather than multiprocessing: loader workers are daemonic processes, which
    multiprocessing forbids to have children.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: decode, send, exit without running the parent's clean-up
        code = 1
        try:
            faulthandler.disable()  # a crash here is expected and reported by the parent
            os.close(r)
            with os.fdopen(w, "wb") as f:
                f.write(pickle.dumps(_decode_here(cfg, device, datas, sizes)))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    chunks, deadline = [], time.monotonic() + timeout_s
    # poll, not select: select() refuses descriptors ≥ FD_SETSIZE (1024), which a long-lived
    # trainer with many shards, workers and sockets reaches.
    poller = select.poll()
    with os.fdopen(r, "rb", buffering=0) as f:
        poller.register(f, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000.0):
                os.kill(pid, signal.SIGKILL)
                break
            chunk = f.read(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"decoder process killed by {signal.Signals(os.WTERMSIG(status)).name}"
    if os.WEXITSTATUS(status) != 0 or not chunks:
        return f"decoder process exited with {os.WEXITSTATUS(status)}"
    return [Isolated(torch.from_numpy(img) if isinstance(img, np.ndarray) else img, fb)
            for img, fb in pickle.loads(b"".join(chunks))]


def decode_isolated(cfg: ImageConfig, device: str, datas: Sequence[bytes],
                    sizes: Sequence[tuple[int, int]], timeout_s: float = 120.0
                    ) -> list[Isolated]:
    """Decode ``datas`` in child processes, bisecting around crashes (see module docstring)."""
    if device != "cpu":  # a GPU decode runs in the trainer and cannot be contained here
        decoder = build_decoder(cfg, device)
        images = decoder.decode(list(datas), list(sizes))
        fell = getattr(decoder, "last_fallbacks", set())
        return [Isolated(img, i in fell) for i, img in enumerate(images)]
    out: list = [None] * len(datas)

    def run(idx: list[int]) -> None:
        got = _attempt(cfg, device, [datas[i] for i in idx], [sizes[i] for i in idx],
                       timeout_s)
        if not isinstance(got, str):
            for i, item in zip(idx, got):
                out[i] = item
        elif len(idx) == 1:
            logger.warning("image %d of the batch in flight at a decoder crash crashes the "
                           "decoder by itself (%s); skipping it as decoder_crash", idx[0], got)
            out[idx[0]] = Isolated(SampleError("decoder_crash", got))
        else:
            half = len(idx) // 2
            run(idx[:half])
            run(idx[half:])

    if datas:
        run(list(range(len(datas))))
    return out
