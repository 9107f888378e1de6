"""Metric sinks: the console line, JSONL and TensorBoard event files."""

from __future__ import annotations

import json

from genlip_megatron.config.training import LoggingConfig
from genlip_megatron.training.metrics import MetricLogger, console_line


def test_console_line_has_the_fixed_fields():
    line = console_line(7, 100, {"loss/global_avg": 1.5, "lr": 1e-3, "grad_norm": 0.5,
                                 "tokens/loss": 123, "throughput/tps": 1000.0, "mfu(%)": 41.2,
                                 "data/skipped/bad_json": 2, "memory/rss(GiB)": 1.0})
    for part in ("step      7/100", "loss 1.5000", "lr 1.000e-03", "grad_norm 0.500",
                 "tokens 123", "tps 1000", "mfu 41.2%", "mem 1.00GiB", "skipped 2"):
        assert part in line, line


def test_sinks_write_jsonl_and_tensorboard(tmp_path):
    cfg = LoggingConfig(tensorboard_dir=str(tmp_path / "tb"), jsonl_path=str(tmp_path / "m.jsonl"))
    logger = MetricLogger(cfg, enabled=True, total_steps=2)
    logger.log({"loss/global_avg": 2.0, "lr": 0.1}, 1)
    logger.log({"loss/global_avg": 1.0, "lr": 0.1}, 2)
    logger.close()
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss/global_avg"]) for r in rows] == [(1, 2.0), (2, 1.0)]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_disabled_logger_writes_nothing(tmp_path):
    cfg = LoggingConfig(jsonl_path=str(tmp_path / "m.jsonl"))
    MetricLogger(cfg, enabled=False).log({"loss/global_avg": 1.0}, 1)
    assert not (tmp_path / "m.jsonl").exists()


def test_nan_is_written_as_null_and_skipped_steps_are_marked(tmp_path, caplog):
    import logging

    cfg = LoggingConfig(jsonl_path=str(tmp_path / "m.jsonl"))
    logger = MetricLogger(cfg, enabled=True, total_steps=10)
    with caplog.at_level(logging.INFO):
        logger.log({"loss/global_avg": float("nan"), "grad_norm": float("inf"),
                    "train/skipped_step": 1.0, "train/skipped_steps_total": 2.0}, 3,
                   note="non-finite loss")
    logger.close()
    text = (tmp_path / "m.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    row = json.loads(text)
    assert row["loss/global_avg"] is None and row["grad_norm"] is None
    line = caplog.records[-1].getMessage()
    assert caplog.records[-1].levelname == "WARNING"
    assert line.startswith("SKIPPED step      3/10") and line.endswith("| non-finite loss")
    assert "skipped_steps 2" in line


def test_console_shows_pace_and_consumption():
    line = console_line(5, 100, {"time/step(s)": 0.25, "time/eta(s)": 3725.0,
                                 "consumed/samples": 12345.0, "consumed/tokens": 2.5e9})
    for part in ("0.250s/step", "eta 1:02:05", "consumed 12.35k samples 2.50G tokens"):
        assert part in line, line


def test_a_partial_record_left_by_a_kill_is_cut_before_appending(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss/global_avg": 2.0}\n{"step": 2, "loss/gl')
    logger = MetricLogger(LoggingConfig(jsonl_path=str(path)), enabled=True)
    logger.log({"loss/global_avg": 1.5}, 2)
    logger.close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
