"""The evaluator suite spread over DP ranks equals the single-process suite, bit for bit.

Every evaluator of the suite (caption loss / exact match / CIDEr-D, demo zero-shot, the
attentive and segmentation probes, attention-sink mass, the gallery) is run with its items split
over the 2 ranks (blocks of ``batch_size`` dealt round-robin, partial results gathered and
reduced; the probes' features gathered to the last rank, which trains them; the gallery whole
on the last rank) and compared with the same suite run whole on this rank. Then the
trainer's wiring: a DP=2 run whose checkpoint hook is the run's ``CheckpointSuiteHook``
logs exactly the single-process numbers of the checkpoint it saved.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from training_helpers import TINY_CONFIG, tiny_overrides

# caption / zero-shot / sink: blocks of 3 (4, 4 and 3 of them); probes: 40 train + 10 test
# images in 3 encoder blocks of 32 (gathered to the last rank); the gallery runs whole there.
SUITE = dict(max_samples=10, max_new_tokens=4, batch_size=3, demo_tasks=True,
             probe_train_samples=40, sink_samples=7, gallery_images=2)


def _suite(data_dir):
    from genlip_megatron.config import load_config
    from genlip_megatron.data.tokenizer import load_tokenizer
    from genlip_megatron.evaluation.suite import build_suite

    data = load_config(TINY_CONFIG, tiny_overrides(data_dir)).data
    return build_suite(data, load_tokenizer(data.text.tokenizer_path), **SUITE)


@pytest.mark.world_size(2)
def test_every_evaluator_split_over_dp2_equals_one_process(data_dir):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "convert"))
    from convert_testlib import tiny_hf_model

    model = tiny_hf_model()
    suite = _suite(data_dir)
    assert [ev.name for ev in suite.evaluators] == ["caption", "zeroshot", "probe", "seg",
                                                     "sink", "gallery"]
    whole = suite(model)                       # this rank alone, every item
    whole_captions = list(suite.evaluators[0].last_captions)
    split = suite(model, dist.group.WORLD)     # collective: half the blocks each
    assert split == whole                      # exact: same blocks, same reduction order
    assert suite.evaluators[0].last_captions == whole_captions
    assert whole["zeroshot/images"] > 0 and whole["caption/loss"] > 0
    assert whole["probe/train_images"] == 40 and whole["seg/classes"] >= 2
    assert "sink/mass_layer_01" in whole and whole["gallery/images"] == 2
    everyone = [None, None]
    dist.all_gather_object(everyone, split)
    assert everyone[0] == everyone[1]


@pytest.mark.world_size(2)
def test_trainer_spreads_checkpoint_evaluators_over_dp(data_dir):
    from genlip_megatron.config import load_config
    from genlip_megatron.evaluation.suite import CheckpointSuiteHook
    from genlip_megatron.training.trainer import Trainer

    tmp = Path(os.environ.get("GENLIP_TEST_TMP", "/tmp/genlip_test")) / "eval_dp2"
    sets = tiny_overrides(data_dir, tmp) + ["training.train_steps=4", "checkpoint.save_interval=4"]
    cfg = load_config(TINY_CONFIG, sets).validate(world_size=dist.get_world_size())
    hook = CheckpointSuiteHook(cfg.data, cfg.data.text.tokenizer_path, final_step=4,
                               **{k: v for k, v in SUITE.items()})
    calls = []

    def counted(step, path, group):
        calls.append(dist.get_world_size(group))
        return hook(step, path, group)

    trainer = Trainer(cfg, checkpoint_evaluators=[counted])
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    assert calls == [2]                        # both DP ranks took part, once
    if dist.get_rank() == dist.get_world_size() - 1:
        want = hook.suite.on_checkpoint(summary.checkpoint)   # one process, whole suite
        got = {k: v for k, v in summary.eval_metrics.items() if k != "time/eval(s)"}
        assert got == want
    dist.barrier()


@pytest.mark.world_size(2)
def test_plain_evaluator_runs_on_the_last_rank_and_is_broadcast():
    """The last rank of the group is the trainer's logging rank: it keeps the side products
    (the gallery page and images) of a whole evaluator."""
    from genlip_megatron.evaluation.data_parallel import evaluate_spread

    calls = []

    def plain(model):
        calls.append(model)
        return {"plain/rank": float(dist.get_rank())}

    got = evaluate_spread(plain, "model", dist.group.WORLD)
    last = dist.get_world_size() - 1
    assert got == {"plain/rank": float(last)}
    assert len(calls) == (1 if dist.get_rank() == last else 0)
