"""tools/compare_runs.py: curves and table from metric JSONLs (resumed steps, missing keys)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "tools" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(spec)
sys.modules["compare_runs"] = compare_runs  # dataclasses look their module up
spec.loader.exec_module(compare_runs)


def _write(path: Path, records: list[dict]) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_table_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the PNG needs matplotlib (main lane only)")
    a = _write(tmp_path / "ga", [
        {"step": 1, "loss/global_avg": 5.0, "throughput/tps": 10.0},
        {"step": 2, "loss/global_avg": 4.0, "throughput/tps": 100.0},
        {"step": 2, "loss/val": 4.5},
        {"step": 3, "loss/global_avg": 3.5, "throughput/tps": 300.0},
        {"step": 3, "loss/global_avg": 3.0, "throughput/tps": 200.0},   # resumed: last wins
        {"step": 3, "caption/cider": 1.25, "attention_sink/first_image_token_mass": 0.5,
         "probe/accuracy": 0.75, "seg/miou": 0.25, "sink/mass_mean": 0.125}])
    b = _write(tmp_path / "no_ga", [{"step": 1, "loss/global_avg": 6.0, "loss/val": None}])
    out = tmp_path / "cmp.png"
    assert compare_runs.main([str(a), str(b), "--out", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| run | final loss | val loss | CIDEr")
    row_a = [c.strip() for c in table[2].split("|")[1:-1]]
    assert row_a[:4] == ["ga", "3", "4.5", "1.25"]
    assert row_a[7:9] == ["0.75", "0.25"]   # probe accuracy, seg mIoU
    assert row_a[10] == "150"           # median tokens/s of windows 2..3 (first excluded)
    assert row_a[11:13] == ["0.5", "0.125"]
    row_b = [c.strip() for c in table[3].split("|")[1:-1]]
    assert row_b[:3] == ["no_ga", "6", "-"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs(tmp_path, capsys):
    assert compare_runs.main([str(tmp_path / "missing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text("not json\n")
    assert compare_runs.main([str(bad)]) == 2
    assert "is not JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare_runs.main([])
