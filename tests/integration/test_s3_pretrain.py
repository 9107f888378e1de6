"""pretrain_genlip.py reading its shards from a local S3 server (moto on 127.0.0.1).

The shards are streamed from ``s3://`` with the endpoint and credentials in the standard
AWS_* variables; a run killed after its step-4 checkpoint resumes from S3 and the whole
curve equals the golden curve of the same shards read from local files.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from training_helpers import assert_losses_close, make_tiny_data, read_golden, \
    read_jsonl_losses, run_pretrain, tiny_overrides

pytest.importorskip("boto3", reason="s3:// shards need boto3 (optional; not in every CI lane)")
pytest.importorskip("moto.server", reason="moto[server] serves S3 on loopback for this test")

from s3_helpers import LocalS3  # noqa: E402

pytestmark = pytest.mark.slow  # two short training runs (~25 s each on 2 busy cores)


def test_train_from_s3_kill_and_resume_matches_local_golden(tmp_path, monkeypatch):
    data = make_tiny_data(tmp_path / "data")
    server = LocalS3().start()
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        server.upload("shards", sorted((data / "train").glob("*.tar")), "tiny/train")
        sets = tiny_overrides(data, tmp_path / "run") + [
            "data.sources=[{paths: 's3://shards/tiny/train/shard-{000000..000003}.tar'}]"]
        killed = run_pretrain(sets, fault="after_step:6")
        assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
        resumed = run_pretrain(sets)
        out = resumed.stdout + resumed.stderr
        assert resumed.returncode == 0, out[-6000:]
        assert "(step 4)" in out
    finally:
        server.stop()
    losses = read_jsonl_losses(tmp_path / "run" / "metrics.jsonl")
    assert_losses_close(losses, read_golden(), what="S3 run (killed, resumed) vs local golden")


def _small_shards(src: Path, dst: Path, per_shard: int = 10) -> list[Path]:
    """The samples of ``src``/*.tar re-cut into shards of ``per_shard`` samples."""
    import tarfile

    dst.mkdir()
    members = []
    for shard in sorted(src.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members += [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    out = []
    for i in range(0, len(keys), per_shard):
        chunk = set(keys[i:i + per_shard])
        out.append(dst / f"shard-{i // per_shard:06d}.tar")
        with tarfile.open(out[-1], "w") as tar:
            for m, data in members:
                if m.name.split(".")[0] in chunk:
                    tar.addfile(m, io.BytesIO(data))
    return out


def test_run_rides_out_an_s3_outage_and_counts_the_retries(tmp_path, monkeypatch):
    """The S3 server stops after step 1 until the run has retried, then 3 s more: the run
    finishes and its JSONL counts the retries and no lost shard."""
    import json
    import subprocess
    import threading
    import time

    from training_helpers import ROOT, pretrain_command, pretrain_env

    data = make_tiny_data(tmp_path / "data")
    server = LocalS3().start()
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        server.upload("shards", _small_shards(data / "train", tmp_path / "small"),
                      "tiny/train")
        # one stream, small shards, shuffle blocks and packing buffer: samples are read just in
        # time, so a new shard (10 samples, a third of a step) is opened during the outage
        sets = tiny_overrides(data, tmp_path / "run") + [
            "data.sources=[{paths: 's3://shards/tiny/train/*.tar'}]",
            "data.reader.streams_per_source=1", "data.reader.shuffle_buffer=4",
            "data.packing.buffer_size=8", "data.packing.buffer_rows=1"]
        jsonl = tmp_path / "run" / "metrics.jsonl"
        proc = subprocess.Popen(pretrain_command(sets), cwd=ROOT, env=pretrain_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        retried = threading.Event()

        def read_output() -> None:
            for line in proc.stdout:
                lines.append(line)
                if "; retry 1/" in line:
                    retried.set()

        reader = threading.Thread(target=read_output, daemon=True)
        reader.start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not (
                jsonl.is_file() and '"step": 1' in jsonl.read_text()):
            time.sleep(0.2)
        server.stop()  # down until the run has met it (a retry), then 3 s more
        retried.wait(timeout=120)
        time.sleep(3.0)
        server.start()
        proc.wait(timeout=600)
        reader.join(timeout=30)
        out = "".join(lines)
    finally:
        server.stop()
    assert proc.returncode == 0, out[-6000:]
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    last = records[-1]
    assert last["data/shards/retries"] > 0, (last, out[-4000:])
    assert last["data/shards/unreadable"] == 0  # every retry succeeded: nothing lost
