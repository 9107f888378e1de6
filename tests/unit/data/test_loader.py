"""PackedLoader end to end: both stage formats, robustness counters, determinism, exact resume."""

import io
import logging
import tarfile

import pytest
import torch

from genlip_megatron.data.batch import IGNORE_INDEX, PackedBatch
from genlip_megatron.data import sample as sample_mod
from genlip_megatron.config.data import SourceConfig
from genlip_megatron.data.loader import DataStateMismatch, build_train_loader, \
    packing_efficiency
from genlip_megatron.data.shard_writer import write_shards
from genlip_megatron.data.synthetic import BAD_KINDS, BAD_REASON, ODD_KINDS, bad_sample, \
    demo_samples

from .conftest import make_cfg

FIELDS = ("tokens", "labels", "position_ids", "image_mask", "segment_ids", "pixel_values",
          "image_grid_hw", "sample_offsets", "cu_seqlens", "cu_seqlens_image", "cu_seqlens_text")


def assert_same(a: PackedBatch, b: PackedBatch):
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def check_row_invariants(b: PackedBatch, tok, seq_len):
    assert b.tokens.shape == (b.tokens.shape[0], seq_len)
    assert b.pixel_values.shape[0] == int(b.image_lens.sum()) == int(b.image_mask.sum())
    assert torch.equal(b.image_grid_hw.prod(1).int(), b.image_lens)
    flat_tok, flat_lab = b.tokens.flatten(), b.labels.flatten()
    flat_pos = b.position_ids.permute(1, 0, 2).reshape(3, -1)
    prompt = tok.encode("Describe the image in detail.")
    for j in range(len(b.image_lens)):
        o, n, t = int(b.sample_offsets[j]), int(b.image_lens[j]), int(b.text_lens[j])
        gh, gw = b.image_grid_hw[j].tolist()
        assert (flat_tok[o:o + n] == 0).all() and b.image_mask.flatten()[o:o + n].all()
        assert flat_pos[0, o:o + n].eq(0).all() and flat_pos[1, o:o + n].max() == gh - 1
        assert flat_pos[2, o:o + n].max() == gw - 1
        assert flat_pos[:, o + n:o + n + t].tolist() == [list(range(max(gh, gw),
                                                                    max(gh, gw) + t))] * 3
        text = flat_tok[o + n:o + n + t].tolist()
        assert text[-2:] == tok.end_ids
        lab = flat_lab[o + n - 1:o + n + t]  # shifted labels of this sample
        assert lab[-1] == IGNORE_INDEX and flat_lab[o:o + n - 1].eq(IGNORE_INDEX).all()
        trained = lab[:-1] != IGNORE_INDEX
        assert torch.equal(lab[:-1][trained], torch.tensor(text)[trained])
        if text[:len(prompt)] == prompt:  # stage 1: prompt masked, caption + end trained
            assert not trained[:len(prompt)].any() and trained[len(prompt):].all()


def test_stage1_caption_rows(data_root, tiny_tok):
    loader = build_train_loader(make_cfg(data_root), dp_rank=0, dp_size=1, micro_batch_size=2,
                                seed=0)
    for _ in range(3):
        b = next(loader)
        check_row_invariants(b, tiny_tok, 512)
        assert (b.image_grid_hw == 4).all()  # fixed 64 px → 4×4 patches
    c = loader.counters()
    assert c["rows"] == 6 and packing_efficiency(c) > 0.97
    # conservation: every used sample is in a row or still in the packing buffer
    assert c["samples/used"] == c["samples/packed"] + len(loader.packer.buffer)
    assert c["samples/read"] == c["samples/used"] + sum(
        v for k, v in c.items() if k.startswith("skipped/"))
    assert sum(v for k, v in c.items() if k.startswith("skipped/")) == 0


def test_stage2_native_conversations(data_root, tiny_tok):
    loader = build_train_loader(make_cfg(data_root, stage=2, max_seq_len=1024), dp_rank=1,
                                dp_size=2, micro_batch_size=2, seed=0)
    grids, multi_turn = set(), 0
    for _ in range(3):
        b = next(loader)
        check_row_invariants(b, tiny_tok, 1024)
        grids |= {tuple(g) for g in b.image_grid_hw.tolist()}
        # a sample with two assistant turns has two separate runs of trained labels
        for j in range(len(b.image_lens)):
            o, n, t = (int(x) for x in (b.sample_offsets[j], b.image_lens[j], b.text_lens[j]))
            trained = (b.labels.flatten()[o + n - 1:o + n + t - 1] != IGNORE_INDEX).int()
            multi_turn += int((trained[1:] - trained[:-1]).eq(1).sum() >= 2)
    assert len(grids) > 5 and all(4 <= h * w <= 64 for h, w in grids)
    assert multi_turn > 0


def test_stream_does_not_depend_on_num_workers(data_root):
    batches = {}
    for nw, in_main in ((0, False), (2, False), (2, True)):
        cfg = make_cfg(data_root, num_workers=nw)
        cfg.image.decode_in_main = in_main
        loader = build_train_loader(cfg, dp_rank=0, dp_size=1, micro_batch_size=2, seed=7)
        batches[nw, in_main] = [next(loader) for _ in range(3)]
        loader.close()
    for key in ((2, False), (2, True)):
        for a, b in zip(batches[0, False], batches[key]):
            assert_same(a, b)


def test_resume_is_exact_two_ranks_two_workers(data_root):
    n_before, n_after = 3, 5
    for rank in range(2):
        # frequent resume points: the one used must precede the oldest buffered sample
        cfg = make_cfg(data_root, max_seq_len=1024, num_workers=2, snapshot_interval=5)
        run = build_train_loader(cfg, dp_rank=rank, dp_size=2, micro_batch_size=2, seed=11)
        for _ in range(n_before):
            next(run)
        buf = io.BytesIO()
        torch.save(run.state_dict(), buf)
        assert buf.tell() < 20_000  # positions and indices only, no pixels
        expected = [next(run) for _ in range(n_after)]  # the uninterrupted run
        counters = run.counters()
        run.close()
        assert counters["epoch/source0"] >= 1  # the resumed part crosses an epoch boundary
        resumed = build_train_loader(cfg, dp_rank=rank, dp_size=2, micro_batch_size=2, seed=11)
        buf.seek(0)
        resumed.load_state_dict(torch.load(buf))
        for a, b in zip(expected, [next(resumed) for _ in range(n_after)]):
            assert_same(a, b)
        assert resumed.counters() == counters
        resumed.close()


def test_state_of_another_layout_is_refused(data_root):
    a = build_train_loader(make_cfg(data_root), dp_rank=0, dp_size=1, micro_batch_size=1, seed=1)
    next(a)
    state = a.state_dict()
    b = build_train_loader(make_cfg(data_root), dp_rank=0, dp_size=1, micro_batch_size=1, seed=2)
    with pytest.raises(ValueError, match="seed"):
        b.load_state_dict(state)
    b.load_state_dict(state, strict=False)  # counters kept, fresh epoch
    assert b.counters()["samples/read"] == a.counters()["samples/read"]
    assert b.counters()["epoch/source0"] == 1
    next(b)


def _one_source(cfg, paths):
    cfg.sources = [SourceConfig(paths=[str(p) for p in paths], format="caption")]
    return cfg


def _saved_state(data_root, steps=2):
    """A loader state over all 8 shards of s1 after ``steps`` batches, and its counters."""
    a = build_train_loader(make_cfg(data_root), dp_rank=0, dp_size=1, micro_batch_size=1,
                           seed=1)
    for _ in range(steps):
        next(a)
    state, counters = a.state_dict(), a.counters()
    a.close()
    return state, counters


def test_changed_shard_set_is_refused_naming_the_switch(data_root):
    state, _ = _saved_state(data_root)
    shards = sorted((data_root / "s1").glob("*.tar"))
    renamed = data_root / "s1_swapped"
    renamed.mkdir(exist_ok=True)
    (renamed / "other.tar").write_bytes(shards[0].read_bytes())
    for paths, change in ((shards[1:], "8 → 7 shards, 1 removed"),
                          ([renamed / "other.tar"] + shards[1:], "same count, different")):
        b = build_train_loader(_one_source(make_cfg(data_root), paths), dp_rank=0, dp_size=1,
                               micro_batch_size=1, seed=1)
        with pytest.raises(DataStateMismatch, match="data.reshard_on_resume=true") as err:
            b.load_state_dict(state)
        assert change in str(err.value) and "data.sources[0]" in str(err.value)
        b.close()


def _resharded(data_root, shards, step, state):
    b = build_train_loader(_one_source(make_cfg(data_root), shards), dp_rank=0, dp_size=1,
                           micro_batch_size=1, seed=1)
    b.load_state_dict(state, reshard_step=step)
    return b


def test_reshard_restarts_the_streams_reseeded_from_the_step(data_root, caplog):
    state, counters = _saved_state(data_root)
    shards = sorted((data_root / "s1").glob("*.tar"))[1:]
    with caplog.at_level(logging.WARNING):
        b = _resharded(data_root, shards, 7, state)
    assert "8 → 7 shards, 1 removed" in caplog.text and "step 7" in caplog.text
    assert b.counters()["samples/read"] == counters["samples/read"]   # counters kept
    got = [next(b) for _ in range(2)]
    middle = b.state_dict()
    later = [next(b) for _ in range(2)]
    b.close()
    # deterministic in (seed, step): the same step gives the same batches ...
    again = _resharded(data_root, shards, 7, state)
    for x, y in zip(got + later, [next(again) for _ in range(4)]):
        assert_same(x, y)
    again.close()
    # ... another step re-seeds differently, and neither is the plain seed's stream
    other = _resharded(data_root, shards, 8, state)
    fresh = build_train_loader(_one_source(make_cfg(data_root), shards), dp_rank=0, dp_size=1,
                               micro_batch_size=1, seed=1)
    first = got[0].tokens
    assert not torch.equal(next(other).tokens, first)
    assert not torch.equal(next(fresh).tokens, first)
    other.close(), fresh.close()
    # a checkpoint written after the reshard resumes exactly without the switch
    resumed = build_train_loader(_one_source(make_cfg(data_root), shards), dp_rank=0,
                                 dp_size=1, micro_batch_size=1, seed=1)
    resumed.load_state_dict(middle)
    for x, y in zip(later, [next(resumed) for _ in range(2)]):
        assert_same(x, y)
    resumed.close()


def test_reshard_does_not_cover_other_changes(data_root):
    state, _ = _saved_state(data_root)
    b = build_train_loader(make_cfg(data_root), dp_rank=0, dp_size=1, micro_batch_size=1,
                           seed=2)
    with pytest.raises(DataStateMismatch, match="seed") as err:
        b.load_state_dict(state, reshard_step=3)
    assert "reshard_on_resume" not in str(err.value)
    b.close()


def _truncated_tar(path, good_samples, keep):
    """A tar of good samples cut inside the first member of sample ``keep``."""
    write_shards(good_samples, path.parent, samples_per_shard=10_000, prefix=path.stem)
    full = path.parent / f"{path.stem}-000000.tar"
    with tarfile.open(full) as tf:
        members = tf.getmembers()
    cut = next(m for m in members if m.name.startswith(f"g{keep:08d}")).offset_data + 10
    path.write_bytes(full.read_bytes()[:cut])
    full.unlink()


def test_bad_inputs_are_skipped_and_counted(tmp_path, data_root, caplog, monkeypatch):
    kinds = list(BAD_KINDS) + list(ODD_KINDS)
    samples = []
    good = list(demo_samples(6, 5, key_prefix="g"))
    for i, kind in enumerate(kinds):
        samples += [good[i % 6] | {"__key__": f"good{i:03d}"},
                    bad_sample(kind, f"bad{i:03d}{kind.replace('_', '')}", i, long_words=800)]
    write_shards(samples, tmp_path, prefix="a")
    (tmp_path / "b-unreadable.tar").write_bytes(b"not a tar file" * 100)
    _truncated_tar(tmp_path / "c-truncated.tar", demo_samples(8, 9, key_prefix="g"), keep=5)
    cfg = make_cfg(data_root, streams_per_source=1, shuffle=1)
    # conversations format: caption-only json falls back to its caption (reference behaviour)
    cfg.sources = [SourceConfig(paths=[str(tmp_path / "a-000000.tar"),
                                       str(tmp_path / "b-unreadable.tar"),
                                       str(tmp_path / "c-truncated.tar")],
                                format="conversations")]
    cfg.reader.shuffle_shards = False
    loader = build_train_loader(cfg, dp_rank=0, dp_size=1, micro_batch_size=1, seed=0)
    epoch = len(samples) + 5
    monkeypatch.setattr(sample_mod, "SKIP_LOG", sample_mod.SkipLog(first=100))
    with caplog.at_level(logging.INFO, logger="genlip_megatron.data"):
        # one epoch and the first sample of the next, sample by sample (the error at the end of
        # c-truncated.tar is reported with the next sample read, which is in the next epoch)
        for _ in range(epoch + 1):
            loader._consume(loader._pull())
    c = loader.counters()
    for kind in BAD_KINDS:
        expected = sum(1 for k in BAD_KINDS if BAD_REASON[k] == BAD_REASON[kind])
        assert c[f"skipped/{BAD_REASON[kind]}"] == expected, kind
    assert c["shards/not_a_tar"] == 1 and c["shards/unreadable"] == 1
    assert c["samples/read"] == epoch + 1
    assert c["samples/used"] == len(kinds) + len(ODD_KINDS) + 5 + 1
    assert c["info/unknown_keys"] == 2  # the unknown_keys odd sample + missing_image's xyz
    text = caplog.text
    assert "bad000truncatedjpeg" in text and "a-000000.tar" in text and "undecodable" in text
    assert "b-unreadable.tar" in text and "c-truncated.tar" in text
    b = next(loader)  # and training goes on
    assert b.tokens.shape == (1, 512)


def test_all_shards_unreadable_fails_at_start_naming_them(tmp_path, data_root):
    for i in range(2):
        (tmp_path / f"x{i}.tar").write_bytes(b"garbage" * 100)
    cfg = make_cfg(data_root)
    cfg.sources = [SourceConfig(paths=[str(tmp_path / "*.tar"), str(tmp_path / "gone.tar")])]
    with pytest.raises(ValueError, match=r"0 readable shard.*missing: \[.*gone.tar.*"
                                         r"not a tar: \[.*x0.tar.*x1.tar"):
        build_train_loader(cfg, dp_rank=0, dp_size=1, micro_batch_size=1, seed=0)


def test_two_sources_mixed(data_root, tiny_tok):
    cfg = make_cfg(data_root, max_seq_len=1024)
    cfg.sources = [SourceConfig(paths=str(data_root / "s1" / "*.tar"), weight=3.0),
                   SourceConfig(paths=str(data_root / "s2" / "*.tar"), weight=1.0,
                                format="conversations", name="conv")]
    cfg.image.policy = "native"
    cfg.image.min_pixels, cfg.image.max_pixels = 1024, 16384
    loader = build_train_loader(cfg, dp_rank=0, dp_size=1, micro_batch_size=2, seed=0)
    check_row_invariants(next(loader), tiny_tok, 1024)
    c = loader.counters()
    assert {"epoch/source0", "epoch/conv"} <= set(c)
