"""Shard assignment, block-shuffled streams with cursors, and source mixing."""

import io
import tarfile

import numpy as np
import pytest
from webdataset.tariterators import tarfile_samples

from genlip_megatron.config.data import SourceConfig
from genlip_megatron.data.shards import ShardStream, SourceSchedule, StreamCursor, \
    build_streams, expand_shards, iter_tar_samples, rank_streams


def test_expand_globs_braces_and_lists(data_root):
    shards = expand_shards(str(data_root / "s1" / "*.tar"))
    assert len(shards) == 8 and shards == sorted(shards)
    brace = expand_shards(str(data_root / "s1" / "shard-{000000..000003}.tar"))
    assert brace == shards[:4]
    assert expand_shards([shards[0], str(data_root / "s1" / "shard-00000[12].tar")]) == shards[:3]
    with pytest.raises(FileNotFoundError, match="data.sources"):
        expand_shards(str(data_root / "nothing" / "*.tar"))


def test_ranks_partition_shards_every_epoch():
    shards = [f"s{i:02d}.tar" for i in range(10)]
    orders = []
    for epoch in range(3):
        per_rank = [rank_streams(shards, seed=5, source=0, epoch=epoch, dp_rank=r, dp_size=3,
                                 streams=2, shuffle=True) for r in range(3)]
        flat = [s for rank in per_rank for stream in rank for s in stream]
        assert sorted(flat) == shards  # disjoint, complete
        assert [len(r) for r in per_rank] == [2, 2, 2]
        orders.append(flat)
    assert orders[0] != orders[1] != orders[2]  # reshuffled per epoch


def test_too_few_shards_for_dp_is_an_error(data_root):
    src = [SourceConfig(paths=str(data_root / "s1" / "shard-00000[01].tar"))]
    with pytest.raises(ValueError, match=r"data.sources\[0\].paths has 2 readable shard"):
        build_streams(src, seed=0, dp_rank=0, dp_size=4, streams_per_source=2,
                      shuffle_buffer=4, shuffle_shards=True)


def _stream(data_root, block=16):
    shards = expand_shards(str(data_root / "s1" / "*.tar"))
    return ShardStream(shards, source=0, stream=1, seed=3, dp_rank=0, dp_size=1, streams=2,
                       shuffle_buffer=block, shuffle_shards=True)


def test_stream_restores_mid_block_and_across_epochs(data_root):
    a = _stream(data_root)
    keys = [next(a).key for _ in range(250)]  # 240 samples per epoch in this stream
    assert len(set(keys[:240])) == 240 and a.cursor.epoch == 1
    assert keys[:16] != sorted(keys[:16])  # shuffled within the block
    for cut in (0, 7, 16, 239):
        b = _stream(data_root)
        for _ in range(cut):
            cursor = next(b).cursor_after
        c = _stream(data_root)
        if cut:
            c.restore(StreamCursor.from_list(cursor))
        assert [next(c).key for _ in range(10)] == keys[cut:cut + 10]


def test_schedule_mixes_by_weight_and_is_stateless():
    sch = SourceSchedule([3.0, 1.0], [2, 4], seed=0, dp_rank=0)
    counts = [0, 0]
    walk = [x for _, x in zip(range(20000), sch.walk(0, counts))]
    frac = np.mean([s == 0 for _, s, _ in walk])
    assert abs(frac - 0.75) < 0.02 and sum(counts) == 20000
    # stream ids: source 0 → 0..1, source 1 → 2..5, round-robin within a source
    assert [g for _, s, g in walk if s == 1][:6] == [2, 3, 4, 5, 2, 3]
    # resuming the walk from (n, counts) reproduces it
    counts2 = [sum(1 for _, s, _ in walk[:777] if s == k) for k in range(2)]
    again = [x for _, x in zip(range(100), sch.walk(777, counts2))]
    assert again == walk[777:877]


def test_unreadable_shard_is_reported_once_even_after_restore(tmp_path, data_root):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar" * 50)
    shards = [str(bad), str(data_root / "s1" / "shard-000000.tar")]

    def stream():
        return ShardStream(shards, source=0, stream=0, seed=0, dp_rank=0, dp_size=1, streams=1,
                           shuffle_buffer=16, shuffle_shards=False)

    a = stream()
    got = [next(a) for _ in range(20)]
    assert got[0].shard_errors == [str(bad)]
    assert all(not s.shard_errors for s in got[1:])
    b = stream()
    b.restore(StreamCursor.from_list(got[4].cursor_after))  # mid-block: the block is re-read
    again = [next(b) for _ in range(15)]
    assert [s.key for s in again] == [s.key for s in got[5:]]
    assert all(not s.shard_errors for s in again)


def test_tar_reader_groups_like_webdataset(data_root):
    url = expand_shards(str(data_root / "s2" / "*.tar"))[0]
    errors = []
    ours = list(iter_tar_samples(url, errors))
    ref = list(tarfile_samples([{"url": url}]))
    assert not errors and len(ours) == len(ref) == 40
    for a, b in zip(ours, ref):
        assert a == {k: v for k, v in b.items() if k != "__local_path__"}


def test_tar_reader_goes_on_after_a_duplicate_key(tmp_path):
    """Keys a, b, a, c: the second a is flagged, and c (after it, not last) still comes back."""
    url = tmp_path / "dup.tar"
    with tarfile.open(url, "w") as tar:
        for key in ("a", "b", "a", "c"):
            for ext, data in (("txt", key.encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    errors = []
    got = [(s["__key__"], s["txt"], s.get("__duplicate__", False))
           for s in iter_tar_samples(str(url), errors)]
    assert not errors
    assert got == [("a", b"a", False), ("b", b"b", False), ("a", b"a", True),
                   ("c", b"c", False)]
