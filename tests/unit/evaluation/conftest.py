"""Evaluation tests reuse the conversion tests' helpers and fixtures (tests/unit/convert)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "convert"))

