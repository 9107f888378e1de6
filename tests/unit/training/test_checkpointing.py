"""genlip_megatron.training.checkpointing: transient read errors are retried, not "damaged"."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from genlip_megatron.training import checkpointing as ckp


class _DcpLike(BaseException):
    """Shape of torch DCP's CheckpointException: per-rank failures with tracebacks."""

    def __init__(self, failures):
        super().__init__("CheckpointException ranks: ...")
        self.failures = failures


def _wrapped(inner: BaseException) -> Exception:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise RuntimeError("megatron CheckpointingException: load failed") from exc
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize("code", [errno.EIO, errno.ESTALE, errno.EAGAIN, errno.ETIMEDOUT])
def test_transient_causes_are_found_through_wrappers(code):
    err = OSError(code, "x", "/ckpt/__0_0.distcp")
    assert ckp.transient_cause(err) is err
    assert ckp.transient_cause(_wrapped(err)) is err
    assert ckp.transient_cause(_DcpLike({1: (err, "tb")})) is err
    assert ckp.transient_cause(_wrapped(_DcpLike({0: err}))) is err


@pytest.mark.parametrize("err", [OSError(errno.ENOENT, "gone"), EOFError("truncated"),
                                 ValueError("bad pickle"), MemoryError()])
def test_other_errors_are_not_transient(err):
    assert ckp.transient_cause(_wrapped(err)) is None


def test_reads_are_retried_with_backoff_then_one_line(monkeypatch, caplog):
    sleeps = []
    monkeypatch.setattr(ckp.time, "sleep", sleeps.append)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _wrapped(OSError(errno.ESTALE, "Stale file handle", "/c/iter_0000008/a"))
        return "loaded"

    assert ckp.with_read_retries(flaky, Path("/c/iter_0000008")) == "loaded"
    assert len(calls) == 3 and sleeps == [ckp.READ_RETRY_DELAY_S, 2 * ckp.READ_RETRY_DELAY_S]
    assert caplog.text.count("transient read error on checkpoint") == 2

    def broken():
        raise OSError(errno.EIO, "Input/output error", "/c/iter_0000008/common.pt")

    with pytest.raises(ckp.TransientReadError) as err:
        ckp.with_read_retries(broken, Path("/c/iter_0000008"))
    assert "/c/iter_0000008/common.pt" in str(err.value) and "\n" not in str(err.value)
    assert not isinstance(err.value, ckp.DamagedCheckpoint)   # never a fallback
    assert len(sleeps) == 2 + ckp.READ_ATTEMPTS - 1


def test_other_errors_are_not_retried(monkeypatch):
    monkeypatch.setattr(ckp.time, "sleep", lambda s: pytest.fail("slept"))
    calls = []

    def damaged():
        calls.append(1)
        raise ckp.DamagedCheckpoint(Path("/c/iter_4"), "a.distcp is truncated")

    with pytest.raises(ckp.DamagedCheckpoint):
        ckp.with_read_retries(damaged, Path("/c/iter_4"))
    assert calls == [1]


def test_diagnose_raises_a_transient_error_instead_of_calling_it_damaged(tmp_path, monkeypatch):
    (tmp_path / "metadata.json").write_text("{}")
    monkeypatch.setenv("GENLIP_FAULT_INJECT", "checkpoint:diagnose=ESTALE")
    with pytest.raises(OSError) as err:
        ckp.diagnose_checkpoint(tmp_path)
    assert err.value.errno == errno.ESTALE
    monkeypatch.setenv("GENLIP_FAULT_INJECT", "checkpoint:diagnose=EACCES")   # not transient
    assert ckp.diagnose_checkpoint(tmp_path) == "metadata.json is unreadable (PermissionError)"
