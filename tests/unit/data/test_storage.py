"""s3:// shards served by moto's standalone server on 127.0.0.1 (started and stopped here)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

pytest.importorskip("boto3", reason="s3:// shards need boto3 (optional; not in every CI lane)")
pytest.importorskip("moto.server", reason="moto[server] serves S3 on loopback for these tests")

from genlip_megatron.data import storage  # noqa: E402
from genlip_megatron.config.data import SourceConfig  # noqa: E402
from genlip_megatron.data.loader import PackedLoader  # noqa: E402
from genlip_megatron.data.shards import check_shards, expand_shards, \
    iter_tar_samples  # noqa: E402
from s3_helpers import LocalS3  # noqa: E402
from tests.unit.data.conftest import make_cfg  # noqa: E402


@pytest.fixture(scope="module")
def s3(data_root):
    server = LocalS3().start()
    mp = pytest.MonkeyPatch()
    for k, v in server.env().items():
        mp.setenv(k, v)
    storage._clients.clear()
    server.urls = server.upload("bucket", sorted((data_root / "s1").glob("*.tar")), "s1")
    yield server
    server.stop()
    mp.undo()
    storage._clients.clear()


@pytest.fixture
def small_chunks():
    """Force many ranged GETs and a read-ahead of two chunks per shard."""
    storage.configure(storage.RemotePolicy(retries=6, backoff_s=0.2, read_ahead_bytes=16384,
                                           chunk_bytes=8192))
    yield
    storage.configure(storage.RemotePolicy())


def _samples(url: str) -> list[tuple[str, dict]]:
    errors: list[str] = []
    out = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
           for s in iter_tar_samples(url, errors)]
    assert not errors, errors
    return out


def test_streamed_object_equals_the_local_tar(s3, data_root, small_chunks):
    local = sorted((data_root / "s1").glob("*.tar"))[0]
    assert local.stat().st_size > 4 * 8192  # really several chunks
    assert _samples(s3.urls[0]) == _samples(str(local))


def test_brace_range_and_glob_over_keys_and_missing_keys_are_named(s3, caplog):
    listed = expand_shards("s3://bucket/s1/*.tar")
    assert listed == sorted(s3.urls)
    wanted = expand_shards("s3://bucket/s1/shard-{000000..000009}.tar")
    good, bad = check_shards(wanted, "data.sources[0]")
    assert good == sorted(s3.urls)
    assert bad == {"missing": ["s3://bucket/s1/shard-000008.tar",
                               "s3://bucket/s1/shard-000009.tar"]}
    assert any("shard-000008.tar" in r.getMessage() and "missing" in r.getMessage()
               for r in caplog.records)


def _batches(loader: PackedLoader, n: int) -> list[torch.Tensor]:
    return [next(loader).tokens.clone() for _ in range(n)]


def test_loader_from_s3_equals_local_and_resumes(s3, data_root, small_chunks):
    local_cfg = make_cfg(data_root, shuffle=20)
    s3_cfg = make_cfg(data_root, shuffle=20)
    s3_cfg.sources = [SourceConfig(paths="s3://bucket/s1/shard-{000000..000007}.tar")]
    kw = dict(dp_rank=0, dp_size=1, micro_batch_size=2, seed=7)
    want = _batches(PackedLoader(local_cfg, **kw), 6)
    loader = PackedLoader(s3_cfg, **kw)
    got = _batches(loader, 3)
    state = loader.state_dict()
    resumed = PackedLoader(s3_cfg, **kw)
    resumed.load_state_dict(state)
    got += _batches(resumed, 3)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_outage_is_retried_and_what_cannot_be_read_is_counted(s3, data_root, small_chunks):
    """The endpoint goes away for 3 s: with enough retries nothing is lost; with one short
    retry the shards opened during the outage are skipped and counted, and reading goes on."""
    cfg = make_cfg(data_root, shuffle=4, streams_per_source=1)
    cfg.sources = [SourceConfig(paths="s3://bucket/s1/*.tar")]
    kw = dict(dp_rank=0, dp_size=1, micro_batch_size=1, seed=3)
    # (retries, first back-off): 0.2+0.4+...+6.4 s outlasts the outage; one 1 s retry does not
    for retries, backoff, lost in ((6, 0.2, False), (1, 1.0, True)):
        cfg.reader.remote_retries, cfg.reader.remote_backoff_s = retries, backoff
        loader = PackedLoader(cfg, **kw)
        next(loader)
        s3.stop()
        restart = threading.Timer(3.0, s3.start)
        restart.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 6.0:  # keep reading through the outage and after it
            next(loader)
        restart.join()
        # under load the read that met the outage may still be ahead of the packer: read on
        # (bounded) until the sample carrying its count has been consumed
        key = "shards/unreadable" if lost else "shards/retries"
        while loader.counters()[key] == 0 and time.monotonic() - t0 < 40.0:
            next(loader)
        c = loader.counters()
        assert c["samples/used"] > 0
        if lost:
            assert c["shards/unreadable"] > 0, c
        else:
            assert c["shards/retries"] > 0 and c["shards/unreadable"] == 0, c
        assert c["samples/read"] == c["samples/used"] + sum(
            v for k, v in c.items() if k.startswith("skipped/"))
        loader.close()


def test_energon_dataset_on_s3_resolves_to_its_keys(s3):
    """An Energon folder kept in the bucket: the YAML index files are read from S3."""
    import boto3

    from genlip_megatron.data.energon import resolve_sources

    client = boto3.client("s3")
    meta = {"dataset.yaml": "sample_type: {__module__: megatron.energon, __class__: "
                            "CaptioningSample}\nfield_map:\n  image: jpg\n  caption: json[caption]\n",
            "split.yaml": "split_parts:\n  train:\n  - shard-{000000..000002}.tar\n"}
    for name, text in meta.items():
        client.put_object(Bucket="bucket", Key=f"s1/.nv-meta/{name}", Body=text.encode())
    [src] = resolve_sources([SourceConfig(path="s3://bucket/s1", format="energon")],
                            "data.sources")
    assert src.paths == sorted(s3.urls)[:3] and src.format == "caption"
