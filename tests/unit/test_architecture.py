"""The import contracts of `.importlinter` hold, and they catch a deliberately added violation.

Layers (docs/design.md, "Package layers"): compat < config < model | data < training < convert
< probes < evaluation < run, with tools/, benchmarks/ and pretrain_genlip.py on top; the
exported HF code is self-contained; no cycle between sibling modules in the package or the
benchmarks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter is pinned in requirements/ci.txt "
                    "(main CI lane); the newest-stack lane's lock does not carry it")

ROOT = Path(__file__).resolve().parents[2]


def _lint(root: Path) -> subprocess.CompletedProcess:
    """Run lint-imports on the tree at ``root`` (its own copy of the package first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    code = "import sys; from importlinter.cli import lint_imports; " \
           "sys.exit(lint_imports(no_cache=True, no_logo=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def _copy_tree(tmp_path: Path) -> Path:
    dst = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("genlip_megatron", "benchmarks"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    shutil.copy(ROOT / ".importlinter", dst / ".importlinter")
    return dst


def test_repository_keeps_every_import_contract():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("module, line, contract", [
    # an upward import at function level (lazy imports count too)
    ("genlip_megatron/config/model.py",
     "\n\ndef _upward():\n    from genlip_megatron.training import trainer  # noqa\n",
     "Imports point one way"),
    # the model importing the data package (siblings in one layer are independent)
    ("genlip_megatron/model/rope.py", "\nimport genlip_megatron.data.batch  # noqa\n",
     "Imports point one way"),
    # the exported HF code reaching into the training package
    ("genlip_megatron/convert/hf/configuration_genlip.py",
     "\nimport genlip_megatron.config  # noqa\n", "self-contained"),
    # a cycle between two benchmarks
    ("benchmarks/throughput.py", "\nimport benchmarks.sweep  # noqa\n", "No import cycle"),
])
def test_a_deliberate_violation_breaks_the_build(tmp_path, module, line, contract):
    tree = _copy_tree(tmp_path)
    with open(tree / module, "a") as f:
        f.write(line)
    proc = _lint(tree)
    assert proc.returncode != 0, proc.stdout[-3000:]
    broken = proc.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, proc.stdout[-3000:]
