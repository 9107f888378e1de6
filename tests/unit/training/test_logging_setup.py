"""One-write status lines: ranks share the launcher's pipe."""

from __future__ import annotations

import io
import os
import sys

from genlip_megatron.training import logging_setup


def test_exit_line_is_one_write_with_its_newline(monkeypatch, capfd):
    """Two ranks' watchdog lines merged in the launcher's pipe when text and newline were
    written separately; the emergency line goes out in one write(2)."""
    writes = []
    real_write = os.write
    monkeypatch.setattr(logging_setup.os, "write",
                        lambda fd, data: writes.append(data) or real_write(fd, data))
    logging_setup.write_line("error: hang watchdog: rank 1 made no progress", sys.stderr)
    assert writes == [b"error: hang watchdog: rank 1 made no progress\n"]
    assert capfd.readouterr().err == "error: hang watchdog: rank 1 made no progress\n"


def test_a_stream_without_a_descriptor_gets_the_whole_line():
    stream = io.StringIO()
    logging_setup.write_line("STOPPED steps=3", stream)
    assert stream.getvalue() == "STOPPED steps=3\n"


def test_stack_dump_goes_out_in_whole_line_atomic_writes(monkeypatch, capfd):
    """faulthandler writes a frame in small pieces; two ranks' dumps broke each other's lines.
    Every write is whole lines and at most PIPE_BUF bytes."""
    writes = []
    real_write = os.write
    monkeypatch.setattr(logging_setup.os, "write",
                        lambda fd, data: writes.append(data) or real_write(fd, data))
    monkeypatch.setattr(logging_setup, "PIPE_ATOMIC_BYTES", 200)   # force several chunks
    logging_setup.dump_stacks(sys.stderr)
    err = capfd.readouterr().err
    assert "in test_stack_dump_goes_out_in_whole_line_atomic_writes" in err
    assert len(writes) > 1 and b"".join(writes).decode() == err
    assert all(w.endswith(b"\n") for w in writes)
    assert all(len(w) <= 200 or w.count(b"\n") == 1 for w in writes)
