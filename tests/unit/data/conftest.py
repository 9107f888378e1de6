"""Fixtures for the data-pipeline tests: small synthetic shard sets and tokenizers.

Everything is generated once per session into a temporary directory (a few seconds); the Qwen3
tokenizer comes from `python tools/fetch_qwen3_tokenizer.py` (run by `make setup`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from genlip_megatron.config.data import DataConfig, ImageConfig, PackingConfig, ReaderConfig, \
    SourceConfig, TextConfig
from genlip_megatron.data.shard_writer import write_shards
from genlip_megatron.data.synthetic import caption_corpus, demo_samples
from genlip_megatron.data.tokenizer import load_tokenizer, train_tiny_bpe

REPO = Path(__file__).resolve().parents[3]
QWEN3_TOKENIZER = REPO / ".cache" / "qwen3" / "tokenizer.json"


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("genlip_data")
    # stage 1: 8 shards × 60 caption samples; stage 2: 4 shards × 40 conversation samples
    write_shards(demo_samples(480, 0, key_prefix="c"), root / "s1", samples_per_shard=60)
    write_shards(demo_samples(160, 1, fmt="conversations", key_prefix="v", min_side=24,
                              max_side=700, p_multi_turn=0.5),
                 root / "s2", samples_per_shard=40)
    train_tiny_bpe(caption_corpus() + ["Describe the image in detail."], 300,
                   root / "tokenizer.json", full_byte_alphabet=True)
    return root


@pytest.fixture(scope="session")
def tiny_tok(data_root):
    return load_tokenizer(data_root / "tokenizer.json")


@pytest.fixture(scope="session")
def qwen3_tok():
    if not QWEN3_TOKENIZER.is_file():
        msg = (f"{QWEN3_TOKENIZER} is missing; run `python tools/fetch_qwen3_tokenizer.py` "
               "(make setup does)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return load_tokenizer(QWEN3_TOKENIZER)


def make_cfg(root: Path, *, stage: int = 1, max_seq_len: int = 512, num_workers: int = 0,
             **reader) -> DataConfig:
    """A small DataConfig over the session shards (stage 1: fixed 64 px; stage 2: native)."""
    if stage == 1:
        sources = [SourceConfig(paths=str(root / "s1" / "*.tar"), format="caption")]
        image = ImageConfig(policy="fixed", fixed_size=64)
    else:
        sources = [SourceConfig(paths=str(root / "s2" / "*.tar"), format="conversations")]
        image = ImageConfig(policy="native", min_pixels=1024, max_pixels=16384)
    return DataConfig(
        sources=sources, max_seq_len=max_seq_len, image=image,
        text=TextConfig(tokenizer_path=str(root / "tokenizer.json")),
        packing=PackingConfig(buffer_size=32),
        reader=ReaderConfig(num_workers=num_workers, shuffle_buffer=reader.pop("shuffle", 50),
                            prefetch=16, **reader))
