"""tools/convert_checkpoint.py: argument handling, exit codes and one-line errors."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
from convert_testlib import TINY, random_hf_state_dict, write_hf_export
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[3]


def _cli():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_cli",
                                                  ROOT / "tools" / "convert_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_round_trip_through_the_cli(tmp_path, caplog):
    from genlip_megatron.data.synthetic import caption_corpus
    from genlip_megatron.data.tokenizer import train_tiny_bpe

    cli = _cli()
    sd = random_hf_state_dict(TINY)
    src = write_hf_export(tmp_path / "hf", TINY, sd)
    assert cli.main(["from-hf", str(src), str(tmp_path / "mg"), "--tp", "2", "--pp", "2",
                     "--no-progress"]) == 0
    to_hf = ["to-hf", str(tmp_path / "mg"), str(tmp_path / "out"), "--dtype", "fp32",
             "--no-progress"]
    with caplog.at_level(logging.ERROR):   # no tokenizer anywhere: refused, with the fix
        assert cli.main(to_hf) == 2
    assert "no tokenizer for the export" in caplog.text and "--tokenizer" in caplog.text
    assert not (tmp_path / "out").exists()
    train_tiny_bpe(caption_corpus(), 200, tmp_path / "tok.json")
    assert cli.main(to_hf + ["--tokenizer", str(tmp_path / "tok.json")]) == 0
    back = load_file(tmp_path / "out" / "model.safetensors")
    assert all((back[k] == v).all() for k, v in sd.items())
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert cli.main(to_hf[:2] + [str(tmp_path / "bare")] + to_hf[3:] + ["--no-tokenizer"]) == 0
    assert not (tmp_path / "bare" / "tokenizer.json").exists()


@pytest.mark.parametrize("argv,match", [
    (["from-hf", "{hf}", "{tmp}/mg", "--tp", "3"], "is not divisible by --tp (3)"),
    (["from-hf", "{hf}", "{hf}"], "already exists; pass --force"),
    (["to-hf", "{hf}", "{tmp}/x"], "looks like an HF export"),
    (["from-hf", "{tmp}/nothing", "{tmp}/y"], "no model.safetensors"),
    (["from-hf", "{hf}", "{tmp}/z", "--variant", "g/16"], "not a g/16 model"),
    (["from-hf", "{hf}", "{tmp}/w", "--variant", "q/16"], "model.variant 'q/16' is unknown"),
])
def test_errors_exit_2_with_one_line(tmp_path, caplog, argv, match):
    cli = _cli()
    hf = write_hf_export(tmp_path / "hf", TINY, random_hf_state_dict(TINY))
    (tmp_path / "nothing").mkdir()
    argv = [a.format(hf=hf, tmp=tmp_path) for a in argv]
    with caplog.at_level(logging.ERROR):
        assert cli.main(argv + ["--no-progress"]) == 2
    assert match in caplog.text


def test_table_command(capsys):
    assert _cli().main(["table", "--variant", "g/16"]) == 0
    out = capsys.readouterr().out
    assert "| `decoder.layers.*.mlp.linear_fc1.weight` |" in out and "GatedMLPMapping" in out


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as exc:
        _cli().main(["from-hf", "only-one-path"])
    assert exc.value.code == 2
