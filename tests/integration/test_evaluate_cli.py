"""tools/evaluate.py gives the in-loop evaluator numbers, on the Megatron checkpoint and on its
HF export (one tiny training run with evaluation.suite on, probes and sink mass included)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training_helpers import ROOT, TINY_CONFIG, make_tiny_data, run_pretrain, tiny_overrides


def _eval_cli(checkpoint: Path, data_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / "evaluate.py"), str(checkpoint), "--config",
           str(TINY_CONFIG), "--set", f"data.eval_sources=[{{paths: '{data_dir}/eval/*.tar'}}]",
           f"data.sources=[{{paths: '{data_dir}/train/*.tar'}}]",
           f"data.text.tokenizer_path={data_dir}/tokenizer.json",
           "evaluation.max_new_tokens=8", "evaluation.max_samples=8",
           *[f"evaluation.{k}={v}" for k, v in PROBES.items()], *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


PROBES = {"probe_train_samples": 40, "sink_samples": 4}
"""Probe settings of the run and of the standalone evaluations."""


def _parse(line: str) -> dict[str, float]:
    assert line.startswith("EVAL "), line
    pairs = (kv.split("=", 1) for kv in line.split()[1:] if not kv.startswith("checkpoint="))
    return {k: float(v) for k, v in pairs}


@pytest.mark.slow  # ~40 s idle: one tiny run, a conversion and two evaluations
def test_standalone_equals_in_loop_on_megatron_and_hf(tmp_path):
    data_dir = make_tiny_data(tmp_path / "data")
    save = tmp_path / "run"
    proc = run_pretrain(tiny_overrides(data_dir, save, evaluation__suite="true",
                                       evaluation__max_new_tokens=8,
                                       evaluation__max_samples=8,
                                       **{f"evaluation__{k}": v for k, v in PROBES.items()}))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    recs = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    in_loop = [r for r in recs if "caption/loss" in r]
    assert [r["step"] for r in in_loop] == [8]                 # final checkpoint only
    hf = tmp_path / "hf"
    conv = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"),
                           "to-hf", str(save), str(hf), "--dtype", "fp32"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert conv.returncode == 0, conv.stderr[-3000:]
    for ckpt in (save, hf):
        out = _eval_cli(ckpt, data_dir, "--gallery", str(tmp_path / "gallery"))
        assert out.returncode == 0, out.stderr[-3000:]
        got = _parse(out.stdout.splitlines()[-1])
        assert {"caption/loss", "caption/perplexity", "caption/exact_match", "caption/cider",
                "probe/accuracy", "seg/miou", "sink/mass_mean", "sink/mass_layer_04",
                "gallery/images"} <= set(got)
        for key, value in got.items():
            if key != "gallery/images":   # --gallery adds the gallery to this evaluation only
                assert value == pytest.approx(in_loop[0][key], abs=1e-4), (ckpt, key)
        assert (tmp_path / "gallery" / f"{ckpt.resolve().name}.html").is_file()


def test_missing_held_out_data_is_one_line_error(tmp_path):
    out = _eval_cli(tmp_path / "nowhere", tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: ")
