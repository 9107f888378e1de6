"""The parallelism planner: FLOPs = flops.py, parameter counts, monotonic memory rules, CLI.

Its memory predictions are checked against measured per-rank memory in
tests/multirank/test_plan_memory.py (7 layouts, 2 ranks).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from genlip_megatron.config import decode_variant, load_config
from genlip_megatron.training import planner
from genlip_megatron.training.flops import FlopDims, training_flops

ROOT = Path(__file__).resolve().parents[3]


def _dims(variant: str) -> planner.ModelDims:
    return planner.ModelDims.from_model_config(decode_variant(variant))


def test_step_flops_are_flops_py_for_the_same_config():
    model = decode_variant("So/16")
    mix = planner.SampleMix(4096, 2, (196, 1024, 300, 64), (60, 200, 31, 9), labels=290)
    expected = 6 * training_flops(FlopDims.from_model_config(model), mix.image_lens,
                                  mix.text_lens, head_tokens=290)
    assert planner.step_flops(planner.ModelDims.from_model_config(model), mix, 6) == expected


def test_param_counts_match_the_reference_totals():
    """TP=1 totals equal test_model_param_counts' reference numbers (L/16: 16.17 M/layer)."""
    c = planner.param_counts(_dims("L/16"), tp=1)
    assert round(c["layer"] / 1e6, 2) == 16.17
    total = 24 * c["layer"] + c["first"] + c["last"]
    assert round(total / 1e6, 1) == round(388.9 + 313.5, 1)
    # TP shards the layer's matrices and the vocabulary, not the vectors
    c2 = planner.param_counts(_dims("L/16"), tp=2)
    assert c["layer"] / 2 < c2["layer"] < c["layer"] / 2 + 8 * 1152


def test_without_the_gate_the_layer_loses_its_gate_rows_and_flops():
    """model.gated_attention=false: q_proj loses its H gate rows (+ bias), FLOPs follow."""
    model = decode_variant("L/16")
    gated = planner.ModelDims.from_model_config(model)
    model.gated_attention = False
    plain = planner.ModelDims.from_model_config(model)
    h = gated.hidden
    assert planner.param_counts(gated, 1)["layer"] - planner.param_counts(plain, 1)["layer"] \
        == h * h + h
    assert plain.flop_dims() == FlopDims.from_model_config(model)
    mix = planner.SampleMix(1024, 1, (576,), (64,))
    assert planner.step_flops(plain, mix, 1) < planner.step_flops(gated, mix, 1)
    lay = planner.Layout(tp=1, pp=1, dp=1)
    assert planner.memory_per_rank(plain, lay, mix)[0].total < \
        planner.memory_per_rank(gated, lay, mix)[0].total


def test_memory_rules():
    d = _dims("g/16")
    mix = planner.SampleMix.uniform(8192, 1, 1024, 128)

    def mem(**kw):
        lay = planner.Layout(**{"tp": 2, "pp": 2, "dp": 4, "micro_batches": 8, **kw})
        return planner.memory_per_rank(d, lay, mix)

    base = mem()
    assert [e.stage for e in base] == [0, 1]
    assert mem(recompute="full")[0].activations < mem(recompute="selective")[0].activations \
        <= base[0].activations
    assert mem(sp=True)[0].activations < base[0].activations
    assert mem(distributed_optimizer=False)[0].state > base[0].state
    # 1F1B: stage 0 holds pp micro-batches, the last stage one
    assert base[0].activations > base[1].activations
    with pytest.raises(ValueError, match="pp × vpp"):
        mem(pp=3)


def test_plan_ranks_fitting_layouts_with_valid_set_flags():
    hw = planner.GPUS["H100"]
    plans = planner.plan(_dims("G/16"), hw, gpus=64, global_batch=256, seq=16384, image=1024,
                         text=128, top=5)
    assert plans and all(p.memory <= 0.9 * hw.memory for p in plans)
    assert [p.tokens_per_s for p in plans] == sorted((p.tokens_per_s for p in plans),
                                                     reverse=True)
    best = plans[0]
    assert best.layout.tp * best.layout.pp * best.layout.dp == 64 and 0 < best.mfu < 1
    cfg = load_config(ROOT / "tests" / "assets" / "configs" / "tiny_train.yaml",
                      ["model.variant=G/16", "training.global_batch_size=256"] + best.flags)
    assert cfg.parallel.tp == best.layout.tp and cfg.parallel.pp == best.layout.pp


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "plan_parallelism.py"), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_prints_layouts_and_refuses_bad_input_in_one_line():
    ok = _cli("--preset", "L/16", "--gpus", "8", "--top", "3")
    assert ok.returncode == 0, ok.stderr
    rows = [line for line in ok.stdout.splitlines() if "--set" in line]
    assert len(rows) == 3 and "parallel.tp=" in rows[0]
    bad = _cli("--preset", "Q/16")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: model.variant 'Q/16'")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_head_memory_follows_the_loss_impl():
    d = planner.ModelDims.from_model_config(decode_variant("L/16"))
    mix = planner.SampleMix.uniform(16384, 1, 196, 200)        # 41 samples, 8159 labels
    chunked, full = (planner.memory_per_rank(d, planner.Layout(tp=1, pp=1, dp=8, loss_impl=impl),
                                             mix)[0].activations for impl in ("chunked", "full"))
    # full keeps every label row's fp32 logits, chunked one block of 2^24
    assert full - chunked == pytest.approx((mix.label_count * d.vocab - 2 ** 24) * 4)
