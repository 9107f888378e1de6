"""Decoding in throw-away child processes, to find the image that crashes a native decoder.

DALI's CPU decoder has segfaulted on real data (``libdali_operators.so``); a crash kills the
loader worker, which the loader restarts from its cursor, telling it which samples were in
flight. The new worker decodes those here: the batch runs in a forked child; if the child dies
by a signal (or hangs), the batch is split in halves and each half retried, down to the single
images that crash a child by themselves. Those come back as ``SampleError("decoder_crash")``;
the rest come back decoded exactly as in the worker (same decoder, same pixels).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Sequence, Union

import torch

from genlip_megatron.data.config import ImageConfig
from genlip_megatron.data.image import DecodeResult, build_decoder
from genlip_megatron.data.template import SampleError

logger = logging.getLogger(__name__)


@dataclass
class Isolated:
    """An image decoded in a child process, and whether it came from the Pillow fallback."""

    image: Union[DecodeResult, SampleError]
    fallback: bool = False


def _child(cfg: ImageConfig, device: str, datas: list[bytes], sizes: list[tuple[int, int]],
           conn) -> None:
    decoder = build_decoder(cfg, device)
    images = decoder.decode(datas, sizes)
    fell = getattr(decoder, "last_fallbacks", set())
    conn.send([(img.numpy() if hasattr(img, "numpy") else img, i in fell)
               for i, img in enumerate(images)])
    conn.close()


def _attempt(cfg: ImageConfig, device: str, datas: list[bytes], sizes: list[tuple[int, int]],
             timeout_s: float) -> Union[list[Isolated], str]:
    """Decode in one forked child: its results, or why it failed (a signal, a hang)."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(cfg, device, datas, sizes, send), daemon=True)
    proc.start()
    send.close()
    result = None
    try:
        if wait([recv], timeout_s):
            try:
                result = recv.recv()
            except (EOFError, OSError):
                result = None
    finally:
        proc.join(timeout=timeout_s if result is not None else 1.0)
        if proc.is_alive():
            proc.kill()
            proc.join()
        recv.close()
    if result is None:
        code = proc.exitcode
        if code is not None and code < 0:
            return f"decoder process killed by {signal.Signals(-code).name}"
        return f"decoder process exited with {code} (timeout {timeout_s:.0f} s)"
    return [Isolated(torch.from_numpy(img) if hasattr(img, "shape") else img, fb)
            for img, fb in result]


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
