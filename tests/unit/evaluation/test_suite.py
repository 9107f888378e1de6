"""The evaluator suite on held-out shards: caption loss = the HF model's own loss, demo labels
read off the captions, the zero-shot evaluator wired to them, the EVAL line format."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from convert_testlib import TINY, random_hf_state_dict

from genlip_megatron.evaluation.demo_tasks import DEMO_CLASSES, demo_class
from genlip_megatron.evaluation.suite import CheckpointSuiteHook, build_suite, eval_line
from genlip_megatron.probes.loading import build_hf_model

ROOT = Path(__file__).resolve().parents[3]


def tiny_data_config(tmp_path_factory):
    """(data section, tokenizer) of the tiny labelled demo-style set (tests/training_helpers.py)."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from training_helpers import TINY_CONFIG, make_tiny_data, tiny_overrides

    from genlip_megatron.config import load_config
    from genlip_megatron.data.tokenizer import load_tokenizer

    root = make_tiny_data(tmp_path_factory.mktemp("tiny_data"))
    data = load_config(TINY_CONFIG, tiny_overrides(root)).data
    return data, load_tokenizer(data.text.tokenizer_path)


def load_tiny_set(tmp_path_factory):
    """(held-out samples, tokenizer) of the tiny set."""
    from genlip_megatron.data.inference import iter_eval_samples

    data, tok = tiny_data_config(tmp_path_factory)
    return list(iter_eval_samples(data, tok)), tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    data, tok = tiny_data_config(tmp_path_factory)
    model = build_hf_model(TINY, random_hf_state_dict(TINY, seed=5, scale=0.3))
    return data, tok, model


def test_demo_classes_come_from_single_shape_captions():
    assert len(DEMO_CLASSES) == 24
    assert DEMO_CLASSES[demo_class("an orange star at the bottom right.")] == "an orange star"
    assert demo_class("a red circle at the top left.") == DEMO_CLASSES.index("a red circle")
    assert demo_class("a red circle at the top and a blue star at the left.") == -1
    assert demo_class('a red circle at the top. the word "sun" is written at the left.') == -1


def test_caption_loss_equals_the_models_own_loss(tiny):
    data, tok, model = tiny
    suite = build_suite(data, tok, max_samples=5, max_new_tokens=4, demo_tasks=False)
    metrics = suite(model)
    samples = suite.evaluators[0].samples
    total = tokens = 0.0
    with torch.no_grad():  # the HF loss: mean CE over labelled tokens of one unpadded row
        for s in samples:
            gh, gw = s.grid
            text = list(s.prompt_ids) + tok.encode(s.caption.strip()) + list(tok.end_ids)
            ids = torch.zeros(1, gh * gw + len(text), dtype=torch.long)
            ids[0, gh * gw:] = torch.tensor(text)
            labels = torch.full_like(ids, -100)
            labels[0, gh * gw + len(s.prompt_ids):] = ids[0, gh * gw + len(s.prompt_ids):]
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[0, :gh * gw] = True
            out = model(input_ids=ids, pixel_values=s.pixel_values, image_mask=mask,
                        image_grid_thw=torch.tensor([[1, gh, gw]]), labels=labels)
            n = int((labels[0, 1:] >= 0).sum())
            total += float(out.loss) * n
            tokens += n
    assert metrics["caption/loss"] == pytest.approx(total / tokens, abs=1e-4)
    assert metrics["caption/perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-3)
    assert 0.0 <= metrics["caption/cider"] and 0.0 <= metrics["caption/exact_match"] <= 1.0
    assert len(suite.evaluators[0].last_captions) == len(samples) == 5


def test_demo_suite_adds_zero_shot_on_the_labelled_images(tiny):
    data, tok, model = tiny
    suite = build_suite(data, tok, max_samples=16, max_new_tokens=2, demo_tasks=True)
    zs = suite.evaluators[1]
    want = [demo_class(s.caption) for s in suite.evaluators[0].samples]
    assert zs.labels == [c for c in want if c >= 0] and len(zs.labels) > 0
    m = suite(model)
    assert m["zeroshot/chance"] == pytest.approx(1 / 24)
    assert m["zeroshot/images"] == len(zs.labels)
    assert 0.0 <= m["zeroshot/accuracy"] <= 1.0


def test_hook_runs_at_the_interval_and_the_final_step():
    hook = CheckpointSuiteHook(None, "unused", final_step=10, interval=4)
    assert [s for s in range(1, 11) if hook.due(s)] == [4, 8, 10]
    hook = CheckpointSuiteHook(None, "unused", final_step=10)
    assert [s for s in range(1, 11) if hook.due(s)] == [10]
    assert hook(3, "/nonexistent") == {}          # not due: nothing loaded


def test_eval_line():
    line = eval_line({"b/x": 1.23456, "a/y": float("nan")}, extra=["checkpoint=c"])
    assert line == "EVAL a/y=nan b/x=1.2346 checkpoint=c"


def test_probes_sink_and_gallery_join_the_suite(tiny, tmp_path):
    data, tok, model = tiny
    logged = {}
    hook = CheckpointSuiteHook(data, data.text.tokenizer_path, final_step=4, max_samples=16,
                               max_new_tokens=2, probe_train_samples=60, sink_samples=4,
                               gallery_images=2,
                               image_logger=lambda images, step: logged.update({step: images}))
    suite = hook.suite
    probe, seg = suite.evaluators[1].features, suite.evaluators[2].features
    assert probe is seg                     # one feature cache for both probes
    assert len(probe.train) == 60 and all(s.label >= 0 for s in probe.train + probe.test)
    m = suite(model)
    assert 0.0 <= m["probe/accuracy"] <= 1.0 and m["probe/test_images"] == 16
    assert 0.0 <= m["seg/miou"] <= 1.0 and m["seg/classes"] >= 2
    assert 0.0 < m["sink/mass_mean"] < 1.0 and "sink/mass_layer_02" in m
    assert m["gallery/images"] == 2
    feats = probe(model)
    assert probe(model) is feats            # extracted once per model
    hook.publish_gallery(4, tmp_path / "gallery" / "iter_0000004.html")
    page = (tmp_path / "gallery" / "iter_0000004.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and samples_keys(suite)[0] in page
    assert sorted(logged[4]) == ["gallery/00", "gallery/01"]
    assert logged[4]["gallery/00"].ndim == 3 and logged[4]["gallery/00"].shape[2] == 3
    assert suite(model) == m                # deterministic: a second evaluation agrees


def samples_keys(suite):
    return [s.key for s in suite.evaluators[0].samples]
