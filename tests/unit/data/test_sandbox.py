"""The crash sandbox (data/sandbox.py): fresh helper processes, never a fork of the caller."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from genlip_megatron.data import sandbox
from genlip_megatron.config import ImageConfig
from genlip_megatron.data.image import CRASH_MARKER_ENV, build_decoder
from genlip_megatron.data.synthetic import encode_image

MARKER = "genlip-sandbox-test-crash"


def _images(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [encode_image(Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)),
                         "png") for _ in range(n)]


@pytest.mark.slow   # three helper starts (a fresh interpreter each) on the bisection path
def test_crasher_is_isolated_by_helpers_without_fork(monkeypatch):
    """One image segfaults the decoder: it alone is decoder_crash, the others decode exactly
    as in this process; os.fork is never called (a fork of a DALI-threaded worker can
    deadlock), and the helper cannot see a descriptor this process opened."""
    def no_fork():
        raise AssertionError("the sandbox must not fork() the calling process")

    monkeypatch.setattr(os, "fork", no_fork)
    monkeypatch.setenv(CRASH_MARKER_ENV, MARKER)
    cfg = ImageConfig(decoder="pillow", policy="fixed", fixed_size=32)
    datas = _images(3)
    datas[1] += MARKER.encode()   # trailing bytes: Pillow still decodes it, the hook crashes
    sizes = [(32, 32)] * 3
    out = sandbox.decode_isolated(cfg, "cpu", datas, sizes)
    reasons = [getattr(o.image, "reason", None) for o in out]
    assert reasons == [None, "decoder_crash", None], reasons
    # a loaded machine can hit the per-attempt timeout before the signal is reported
    assert "SIGSEGV" in out[1].image.detail or "hung" in out[1].image.detail
    want = build_decoder(cfg, "cpu").decode([datas[0], datas[2]], sizes[:2])
    for got, ref in zip([out[0], out[2]], want):
        assert torch.equal(got.image, ref)


def test_helper_inherits_no_descriptor_and_stops_with_a_timeout(monkeypatch):
    r, w = os.pipe()
    os.set_inheritable(w, True)   # even an inheritable one (a queue's write end) stays here
    try:
        helper = sandbox._Helper(ImageConfig(decoder="pillow"), "cpu")
        fd_dir = f"/proc/{helper.proc.pid}/fd"
        targets = {os.readlink(f"{fd_dir}/{fd}") for fd in os.listdir(fd_dir)}
        assert os.readlink(f"/proc/self/fd/{w}") not in targets
        monkeypatch.setattr(sandbox, "ATTEMPT_BASE_S", 0.0)
        monkeypatch.setattr(sandbox, "ATTEMPT_PER_IMAGE_S", 0.0)
        why = helper.attempt(_images(1), [(32, 32)])   # no time at all: reported as a hang
        assert isinstance(why, str) and "hung" in why and helper.proc.poll() is not None
    finally:
        os.close(r)
        os.close(w)
