"""Start-up checks of the data inputs, before any process group exists.

Path typos are the most common launch error. Found inside the loader, after the ranks started
their process group, they used to be a traceback on every rank (and, when only some ranks
failed, a wait for the rendezvous timeout on the others). Checked here from the configuration
alone, every rank fails alike and at once, as one ``error: <key> ...`` line with status 2.

Only cheap checks: globs are expanded (no shard is opened); whether each shard is a readable
tar is still decided by the loader (``shards.check_shards``), whose failures the trainer makes
the ranks agree on (training/distributed.py ``agree_on_startup``).
"""

from __future__ import annotations

from pathlib import Path

from genlip_megatron.config import ConfigError
from genlip_megatron.data.energon import resolve_data_config
from genlip_megatron.data.image import dali_available
from genlip_megatron.data.shards import expand_shards
from genlip_megatron.data.storage import is_remote


def check_data_inputs(cfg, shard_ranks: int) -> None:
    """Raise :class:`ConfigError` naming the key when a data input cannot work.

    Args:
        cfg: the validated ``data`` section.
        shard_ranks: how many ranks split each source's shards (the data-parallel size, or 1
            when every rank reads the global stream: ``training.dp_invariant_data``).
    """
    if not cfg.sources:
        raise ConfigError("data.sources is empty; list at least one source of tar shards, "
                          "e.g. data.sources='[{paths: /data/train/{00000..00099}.tar}]'.")
    cfg = resolve_data_config(cfg)   # Energon datasets → their shards (reads .nv-meta only)
    for where, sources in (("data.sources", cfg.sources), ("data.eval_sources",
                                                           cfg.eval_sources)):
        for i, src in enumerate(sources):
            key = f"{where}[{i}]"
            try:
                # object keys are checked by the loader's start-up shard check (one listing)
                found = [f for f in expand_shards(src.paths, key)
                         if is_remote(f) or Path(f).exists()]
            except FileNotFoundError as exc:
                raise ConfigError(str(exc)) from None
            if not found:   # literal paths, none of which exists
                raise ConfigError(f"{key}.paths {src.paths!r} names no existing file; check "
                                  "the path or build shards with tools/make_shards.py.")
            if where == "data.sources" and len(found) < shard_ranks:
                raise ConfigError(
                    f"{key}.paths matches {len(found)} shard(s) but there are {shard_ranks} "
                    "data-parallel ranks; every rank needs at least one. Write more, smaller "
                    "shards (tools/make_shards.py --samples-per-shard) or use fewer ranks.")
    tok = cfg.text.tokenizer_path
    if tok is None:
        raise ConfigError("data.text.tokenizer_path is not set; point it at a tokenizer.json "
                          "(tools/fetch_qwen3_tokenizer.py).")
    if not Path(tok).is_file():
        raise ConfigError(f"data.text.tokenizer_path ({tok}) is not a file; check the path "
                          "(tools/fetch_qwen3_tokenizer.py writes .cache/qwen3/tokenizer.json).")
    if cfg.image.decoder == "dali" and not dali_available():
        raise ConfigError("data.image.decoder is 'dali' but NVIDIA DALI is not installed; "
                          "`pip install nvidia-dali-cuda120`, or set data.image.decoder=pillow.")
