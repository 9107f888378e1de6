"""Training from Megatron-Energon datasets prepared by the real ``energon prepare``.

An Energon dataset (and a two-dataset metadataset) must train exactly like the same tars given
as plain webdataset sources, and a run killed after its step-4 checkpoint must resume
bit-identically (the resumed run is compared to the uninterrupted plain run).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from training_helpers import make_tiny_data, read_jsonl_losses, run_pretrain, tiny_overrides

pytest.importorskip("megatron.energon", reason="megatron-energon (energon prepare) is optional; "
                    "the newest-stack lane does not install it")

pytestmark = pytest.mark.slow  # four short runs + two resumes (~25 s each on 2 busy cores)

CAPTION_MAP = {"image": "jpg,png,webp", "caption": "json[caption]"}
VQA_MAP = {"image": "jpg,png,webp", "context": "json[question]", "answers": "json[answers]"}


def energon_prepare(folder: Path, sample_type: str, field_map: dict) -> None:
    """Run the real ``energon prepare`` non-interactively (all tars in split train)."""
    cmd = [sys.executable, "-c", "from megatron.energon.cli.main import main; main()",
           "prepare", str(folder), "--non-interactive", "--no-progress",
           "--split-parts", r"train:.*\.tar", "--sample-type", sample_type,
           "--field-map", json.dumps(field_map)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=folder)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (folder / ".nv-meta" / "split.yaml").is_file()


def _vqa_copy(src: Path, dst: Path) -> None:
    """The same samples with a VQA json: question = the training prompt, answers = [caption]."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for info in tin.getmembers():
            data = tin.extractfile(info).read()
            if info.name.endswith(".json"):
                caption = json.loads(data)["caption"]
                data = json.dumps({"question": "Describe the image in detail.",
                                   "answers": [caption]}).encode()
                info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict:
    """tiny data; ``train/`` prepared as a CaptioningSample dataset; ``a/`` (shards 0-1,
    captions) and ``b/`` (shards 2-3 as VQA) prepared apart and blended 2:1 by a metadataset."""
    root = make_tiny_data(tmp_path_factory.mktemp("energon_data"))
    energon_prepare(root / "train", "CaptioningSample", CAPTION_MAP)
    shards = sorted((root / "train").glob("*.tar"))
    (root / "a").mkdir()
    (root / "b").mkdir()
    for i, shard in enumerate(shards):
        if i < 2:
            (root / "a" / shard.name).symlink_to(shard)
        else:
            _vqa_copy(shard, root / "b" / shard.name)
    energon_prepare(root / "a", "CaptioningSample", CAPTION_MAP)
    energon_prepare(root / "b", "VQASample", VQA_MAP)
    (root / "blend.yaml").write_text(
        "__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n  train:\n"
        "    blend:\n      - {weight: 2, path: a}\n      - {weight: 1, path: b}\n")
    return {"root": root}


def _run(root: Path, save: Path, sources: str, kill_at: int | None = None) -> dict:
    sets = tiny_overrides(root, save) + [f"data.sources={sources}"]
    if kill_at is not None:
        killed = run_pretrain(sets, fault=f"after_step:{kill_at}")
        assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
        assert (save / "latest").read_text().strip() == "iter_0000004"
    proc = run_pretrain(sets)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    if kill_at is not None:
        assert "(step 4)" in proc.stdout + proc.stderr
    return read_jsonl_losses(save / "metrics.jsonl")


def test_energon_dataset_trains_like_its_tars_and_resumes_bit_identically(datasets, tmp_path):
    root = datasets["root"]
    plain = _run(root, tmp_path / "plain", f"[{{paths: '{root}/train/*.tar'}}]")
    energon = _run(root, tmp_path / "energon",
                   f"[{{path: '{root}/train', format: energon, split: train}}]", kill_at=6)
    assert sorted(plain) == list(range(1, 9))
    assert energon == plain  # bit-identical: same samples, same order, exact resume


def test_energon_metadataset_blend_trains_like_two_weighted_sources(datasets, tmp_path):
    root = datasets["root"]
    vqa = "{image: 'jpg,png,webp', context: 'json[question]', answers: 'json[answers]'}"
    plain = _run(root, tmp_path / "plain",
                 f"[{{paths: '{root}/a/*.tar', weight: 2.0}}, "
                 f"{{paths: '{root}/b/*.tar', weight: 1.0, format: vqa, field_map: {vqa}}}]")
    blend = _run(root, tmp_path / "blend",
                 f"[{{path: '{root}/blend.yaml', format: energon}}]", kill_at=6)
    assert sorted(plain) == list(range(1, 9))
    assert blend == plain
