"""The RUN/DEMO line's evaluation fields (genlip_megatron/run.py)."""

from genlip_megatron.run import RunReport, _eval_fields


def _report(final: dict, init: dict) -> RunReport:
    return RunReport(steps=7, final_loss=0.5, unigram_loss=2.0, checkpoint=None,
                     val_loss=0.25, eval_metrics=final, init_metrics=init)


def test_demo_line_carries_every_probe_with_its_init_value():
    final = {"probe/accuracy": 0.91, "seg/miou": 0.62, "sink/mass_mean": 0.1,
             "zeroshot/accuracy": 0.9, "caption/cider": 9.0, "caption/loss": 0.06}
    init = {"probe/accuracy": 0.33, "seg/miou": 0.28, "loss/val": 6.2}
    fields = dict(kv.split("=") for kv in _eval_fields(_report(final, init), True).split())
    assert fields["probe_accuracy"] == "0.9100" and fields["probe_accuracy_init"] == "0.3300"
    assert fields["seg_miou"] == "0.6200" and fields["seg_miou_init"] == "0.2800"
    assert fields["val_loss"] == "0.2500" and fields["val_loss_init"] == "6.2000"
    assert fields["sink_mass_init"] == "nan"          # not measured: nan, never left out


def test_run_line_leaves_out_what_the_suite_did_not_measure():
    line = _eval_fields(_report({"caption/cider": 1.0}, {}), False)
    assert line == "val_loss=0.2500 cider=1.0000"
