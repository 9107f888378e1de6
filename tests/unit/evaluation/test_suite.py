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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from training_helpers import TINY_CONFIG, make_tiny_data, tiny_overrides

    from genlip_megatron.config import load_config
    from genlip_megatron.data.tokenizer import load_tokenizer

    root = make_tiny_data(tmp_path_factory.mktemp("tiny_data"))
    data = load_config(TINY_CONFIG, tiny_overrides(root)).data
    model = build_hf_model(TINY, random_hf_state_dict(TINY, seed=5, scale=0.3))
    return data, load_tokenizer(data.text.tokenizer_path), model


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
