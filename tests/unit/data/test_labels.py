"""Labelled demo shards: ``cls`` and ``seg.png`` written by the generator, read by the
held-out reader (genlip_megatron/data/synthetic.py, data/inference.py)."""

import io

import numpy as np
from PIL import Image

from genlip_megatron.config.data import SourceConfig
from genlip_megatron.data.inference import iter_eval_samples, sample_labels
from genlip_megatron.data.shard_writer import write_shards
from genlip_megatron.data.synthetic import COLORS, PROBE_CLASSES, SEG_CLASSES, demo_samples, \
    region_map, render_sample, render_scene, sample_scene, scene_label, scene_mask

from .conftest import make_cfg


def test_mask_marks_the_drawn_pixels_and_the_background_regions():
    rng = np.random.default_rng(3)
    n_shapes = SEG_CLASSES.index("circle")
    assert SEG_CLASSES[:n_shapes] == PROBE_CLASSES and n_shapes == 9   # regions: the 3×3 cells
    text = SEG_CLASSES.index("text")
    for _ in range(20):
        scene = sample_scene(rng, p_two=0.5, p_word=0.5)
        img = np.asarray(render_scene(scene)).astype(int)
        mask = scene_mask(scene)
        background = (img == scene.shade).all(-1)
        drawn = mask >= n_shapes
        assert mask.shape == img.shape[:2] and mask.max() < len(SEG_CLASSES)
        # the mask's glyphs are not anti-aliased: ± a pixel
        assert not background[drawn & (mask != text)].any()
        if scene.word is None:                          # shapes are not anti-aliased: exact
            assert ((~drawn) == background).all()
        for cell in range(9):     # background pixels carry the region (cell) they lie in
            x0, y0, x1, y1 = (int(round(v)) for v in scene.cell_box(cell))
            region = mask[y0 + 1:y1 - 1, x0 + 1:x1 - 1]
            assert (region[region < n_shapes] == cell).all()
            assert (region == cell).any()
        for cell, color, shape in scene.items:        # shape pixels carry the shape's id
            x0, y0, x1, y1 = (int(v) for v in scene.cell_box(cell))
            region = mask[y0 + 1:y1 - 1, x0 + 1:x1 - 1]
            colour_px = (img[y0 + 1:y1 - 1, x0 + 1:x1 - 1] == COLORS[color]).all(-1)
            assert (region[colour_px] == SEG_CLASSES.index(shape)).all() and colour_px.any()
        if scene.word is not None:
            assert (mask == text).any()


def test_region_map_splits_the_image_in_thirds():
    got = region_map(6, 3)
    assert got.tolist() == [[0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5], [6, 6, 7, 7, 8, 8]]
    assert np.bincount(region_map(100, 7).ravel()).tolist() == [2 * 33, 2 * 34, 2 * 33,
                                                                3 * 33, 3 * 34, 3 * 33,
                                                                2 * 33, 2 * 34, 2 * 33]


def test_scene_label_is_the_first_shape_cell():
    rng = np.random.default_rng(4)
    for _ in range(30):
        scene = sample_scene(rng, p_two=0.5)
        label = scene_label(scene)
        assert scene.caption.startswith(f"{'an' if scene.items[0][1][0] in 'aeiou' else 'a'} "
                                        f"{scene.items[0][1]} {scene.items[0][2]} at the "
                                        f"{PROBE_CLASSES[label]}")


def test_labels_leave_images_and_captions_unchanged():
    plain = list(demo_samples(12, 7))
    labelled = list(demo_samples(12, 7, labelled=True))
    rng = np.random.default_rng(7)
    for a, b in zip(plain, labelled):
        assert {k: v for k, v in b.items() if k not in ("cls", "seg.png")} == a
        assert int(b["cls"]) in range(len(PROBE_CLASSES))
    img, caption = render_sample(rng)   # render_sample draws the same first scene
    assert caption == plain[0]["json"]["caption"]


def test_eval_reader_returns_labels_and_resized_masks(tmp_path, data_root, tiny_tok):
    samples = list(demo_samples(6, 9, labelled=True))
    samples[1]["cls"] = "seven"            # malformed: no label, the sample stays
    samples[2]["seg.png"] = b"not a png"   # malformed: no mask
    write_shards(samples, tmp_path / "lab")
    cfg = make_cfg(data_root)
    cfg.eval_sources = [SourceConfig(paths=str(tmp_path / "lab" / "*.tar"))]
    got = list(iter_eval_samples(cfg, tiny_tok))
    assert [s.key for s in got] == [s["__key__"] for s in samples]
    assert got[0].label == int(samples[0]["cls"]) and got[1].label == -1
    assert got[2].mask is None and got[0].mask.shape == (64, 64)   # fixed 64 px policy
    ref = Image.open(io.BytesIO(samples[0]["seg.png"])).resize((64, 64), Image.NEAREST)
    assert (got[0].mask == np.asarray(ref)).all()
    assert set(np.unique(got[0].mask)) <= set(range(len(SEG_CLASSES)))


def test_sample_labels_rejects_colour_masks():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    assert sample_labels({"cls": b" 3\n", "seg.png": buf.getvalue()}, (1, 1), 8, "k") == (3, None)


def test_demo_sets_with_old_labels_are_written_again(tmp_path):
    """``make demo`` rewrites a demo set whose meta.json lacks the labels or carries an older
    ``labels_version`` (the shape-only masks), and keeps a current one."""
    import json

    from genlip_megatron.data.synthetic import LABELS_VERSION
    from genlip_megatron.run import _labelled_demo_set

    meta = tmp_path / "meta.json"
    assert not _labelled_demo_set(tmp_path)                       # nothing written yet
    current = {"classes": list(PROBE_CLASSES), "seg_classes": list(SEG_CLASSES),
               "labels_version": LABELS_VERSION}
    for m, ok in (({"train_samples": 3}, False),                  # before the labels
                  ({"classes": list(PROBE_CLASSES),               # version-1 masks
                    "seg_classes": ["background", "circle", "square", "triangle", "star",
                                    "text"]}, False),
                  ({**current, "labels_version": LABELS_VERSION - 1}, False),
                  (current, True)):
        meta.write_text(json.dumps(m))
        assert _labelled_demo_set(tmp_path) is ok
