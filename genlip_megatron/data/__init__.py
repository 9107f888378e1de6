"""Data pipeline: webdataset shards → DALI/Pillow decoding → tokenized, packed prefix-LM rows.

Knows nothing about models; the trainer consumes :class:`PackedBatch`. Entry points:
:func:`build_train_loader`, :func:`load_tokenizer`, :func:`train_tiny_bpe`, :func:`encode_prompt`,
:func:`extend_batch`, :func:`iter_eval_samples`. Names are imported lazily, so loading the
config (``genlip_megatron.config.data``) does not pull in torch, PIL or DALI.
"""

import importlib

_EXPORTS = {
    "IGNORE_INDEX": "batch", "PackedBatch": "batch",
    "DataConfig": "config", "ImageConfig": "config", "PackingConfig": "config",
    "ReaderConfig": "config", "SourceConfig": "config", "TextConfig": "config",
    "EvalSample": "inference", "encode_prompt": "inference", "extend_batch": "inference",
    "iter_eval_samples": "inference",
    "PackedLoader": "loader", "build_train_loader": "loader", "packing_efficiency": "loader",
    "TextTokenizer": "tokenizer", "load_tokenizer": "tokenizer", "train_tiny_bpe": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
