"""Checkpoint conversion: Megatron torch_dist ⇄ the released Hugging Face GenLIP format.

- :func:`megatron_to_hf`: a Megatron distributed checkpoint of any TP/PP (read on CPU, one
  process) → ``config.json`` + one ``model.safetensors`` (bf16 by default) + the bundled
  modeling, image-processing and processing files (``auto_map``) + the run's image
  preprocessing (``preprocessor_config.json``) + the run's tokenizer (required unless
  ``require_tokenizer=False``). ``vision_only`` drops the text embedding, in_proj/proj and
  lm_head (what an MLLM loads; ``AutoModel`` is then the vision tower).
- :func:`hf_to_megatron`: a released-format directory → a Megatron checkpoint
  (``<dst>/iter_0000000`` + ``latest``) that the trainer loads with ``training.init_from`` under
  any TP/PP; ``tp``/``pp`` are validated, recorded and used to chunk the tensors as a run of that
  layout would save them.
- :func:`megatron_state_dict_to_hf` / :func:`hf_state_dict_to_megatron`: the same mapping on
  in-memory TP=1 state dicts.

Both file converters stream: one rule's tensors are in memory at a time (peak RSS stays well
under 2× the checkpoint size, see ``benchmarks/convert.py``), write into ``<dst>.partial`` and
rename at the end, and refuse an existing ``dst`` unless ``force``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
from tokenizers import Tokenizer
from torch import Tensor

from genlip_megatron.config import ModelConfig
from genlip_megatron.config.loader import to_dict
from genlip_megatron.convert.hf_config import HF_FILES, PROCESSOR_AUTO_MAP, \
    check_against_variant, hf_config_dict, image_processor_dict, image_section_from_export, \
    image_settings, model_config_from_dict, qk_layernorm_note, read_hf_config
from genlip_megatron.convert.megatron_io import DistCheckpointReader, TensorLayout, \
    write_dist_checkpoint
from genlip_megatron.convert.registry import MEGATRON_EXTRA_STATE, ConversionError, \
    MappingRegistry, hf_pattern, hf_shapes, mapping_registry
from genlip_megatron.convert.safetensors_io import SafetensorsReader, SafetensorsStreamWriter, \
    dtype_from_name
from genlip_megatron.config.data import DEFAULT_PROMPT
from genlip_megatron.training.checkpoint_layout import iteration_dir, mark_complete, \
    write_latest

logger = logging.getLogger(__name__)

__all__ = ["megatron_to_hf", "hf_to_megatron", "megatron_state_dict_to_hf",
           "hf_state_dict_to_megatron", "megatron_shapes", "resolve_run_tokenizer", "HF_DIR",
           "TOKENIZER_FILES"]

HF_DIR = Path(__file__).resolve().parent / "hf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json",
                   "preprocessor_config.json", "chat_template.jinja")


# ------------------------------------------------------------------------------ helpers
def megatron_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Expected canonical megatron shape of every key (derived through the rules on meta)."""
    reg = mapping_registry(m)
    shapes = {}
    hf = hf_shapes(m)
    for b in reg.bound:
        metas = tuple(torch.empty(hf[hf_pattern(n)], device="meta") for n in b.hf)
        shapes[b.megatron] = tuple(b.rule.to_megatron(metas).shape)
    return shapes


@contextlib.contextmanager
def _staged_output(dst: Path, force: bool) -> Iterator[Path]:
    """Write into a fresh ``<dst>.partial`` and move it to ``dst`` only on success.

    Raises:
        FileExistsError: ``dst`` exists (and is not an empty directory) and not ``force``.
    """
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not force:
        raise FileExistsError(f"output {dst} already exists; pass --force to overwrite it.")
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)   # never leave half a checkpoint behind
        raise
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    os.replace(tmp, dst)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True)


def _check_megatron_shapes(reader: DistCheckpointReader, reg: MappingRegistry,
                           m: ModelConfig) -> dict[str, str]:
    source = reg.check_megatron_keys(reader.keys())
    want = megatron_shapes(m)
    for canon, key in source.items():
        got = reader.shape(key)
        if got != want[canon]:
            raise ConversionError(f"{key} has shape {list(got)} but the checkpoint's config "
                                  f"(hidden={m.hidden_size}, ffn={m.ffn_hidden_size}, heads="
                                  f"{m.num_attention_heads}, text_dim={m.text_dim}, vocab="
                                  f"{m.vocab_size}) implies {list(want[canon])}; the config "
                                  "saved with the checkpoint does not describe its weights.")
    return source


def _copy_tokenizer(tokenizer: Optional[str | Path], dst: Path) -> Optional[Path]:
    if tokenizer is None:
        return None
    tok = Path(tokenizer)
    if tok.is_file():
        if tok.suffix != ".json":
            raise ConversionError(f"--tokenizer {tok} is not a tokenizer.json file (or a "
                                  "directory of tokenizer files).")
        shutil.copy2(tok, dst / "tokenizer.json")
        return dst / "tokenizer.json"
    if tok.is_dir():
        copied = [f for f in TOKENIZER_FILES if (tok / f).is_file()]
        if not copied:
            raise ConversionError(f"--tokenizer {tok} holds none of {list(TOKENIZER_FILES)}.")
        for f in copied:
            shutil.copy2(tok / f, dst / f)
        return dst / "tokenizer.json" if "tokenizer.json" in copied else None
    raise ConversionError(f"--tokenizer {tok} does not exist.")


def _tokenizer_ids(tok_json: Optional[Path]) -> dict:
    """``image_token_id`` and vision start/end ids of a tokenizer.json (None when absent)."""
    if tok_json is None or not tok_json.is_file():
        return {}
    tok = Tokenizer.from_file(str(tok_json))
    return {"image_token_id": tok.token_to_id("<|image_pad|>"),
            "special_ids": {"vision_start_token_id": tok.token_to_id("<|vision_start|>"),
                            "vision_end_token_id": tok.token_to_id("<|vision_end|>")},
            "generation": {"eos": tok.token_to_id("<|im_end|>"),
                           "pad": tok.token_to_id("<|endoftext|>")}}


def resolve_run_tokenizer(common: dict, checkpoint: str | Path) -> tuple[Optional[Path], str]:
    """The training tokenizer of a Megatron checkpoint, wherever the command runs.

    ``data.text.tokenizer_path`` is usually relative to the folder training ran in (e.g.
    ``data/demo/tokenizer.json``): it is looked up under every folder above the checkpoint,
    nearest first (the run's folder holds ``runs/...`` and ``data/...`` side by side), then as
    given (absolute, or from the current folder). A file with more ids than the model's
    vocabulary is some other run's tokenizer and is passed over.

    Returns:
        (the tokenizer.json or None, the configured path for messages, "" when unset).
    """
    config = common.get("config") or {}
    configured = ((config.get("data") or {}).get("text") or {}).get("tokenizer_path") or ""
    if not configured:
        return None, ""
    rel = Path(configured)
    vocab = (config.get("model") or {}).get("vocab_size")
    candidates = ([] if rel.is_absolute() else
                  [d / rel for d in Path(checkpoint).resolve().parents]) + [rel]
    for cand in candidates:
        if cand.is_file() and (vocab is None or _tokenizer_size(cand) <= int(vocab)):
            return cand, configured
    return None, configured


def _tokenizer_size(path: Path) -> int:
    return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)


def write_hf_files(dst: Path, m: ModelConfig, *, dtype: str, vision_only: bool,
                   tokenizer: Optional[str | Path] = None,
                   provenance: Optional[dict] = None, image: Optional[dict] = None,
                   prompt: Optional[str] = None) -> None:
    """config.json, the bundled modeling/processing files, preprocessor_config.json,
    processor_config.json, generation_config.json and tokenizer files of an export in ``dst``.

    Args:
        image: :func:`hf_config.image_settings` of the run (default fixed 224).
        prompt: the training caption prompt (``GenLIPProcessor``'s default).
    """
    tok_json = _copy_tokenizer(tokenizer, dst)
    ids = _tokenizer_ids(tok_json)
    image = image or image_settings(None, m.patch_size)
    cfg = hf_config_dict(m, dtype=dtype, vision_only=vision_only, provenance=provenance,
                         image=image, **{k: v for k, v in ids.items() if k != "generation"})
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in HF_FILES:
        shutil.copy2(HF_DIR / f, dst / f)
    (dst / "preprocessor_config.json").write_text(
        json.dumps(image_processor_dict(image), indent=2) + "\n")
    if tok_json is None:
        return
    gen = ids["generation"]
    (dst / "processor_config.json").write_text(json.dumps(
        {"processor_class": "GenLIPProcessor", "auto_map": dict(PROCESSOR_AUTO_MAP),
         "prompt": prompt or DEFAULT_PROMPT}, indent=2) + "\n")
    if not vision_only and not (dst / "generation_config.json").is_file():
        (dst / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": gen["eos"], "pad_token_id": gen["pad"], "do_sample": False,
             "max_new_tokens": 256}, indent=2) + "\n")
    if not (dst / "tokenizer_config.json").is_file():
        (dst / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
             "pad_token": "<|endoftext|>", "padding_side": "left"}, indent=2) + "\n")


# ------------------------------------------------------------------------------ Megatron → HF
def megatron_to_hf(src: str | Path, dst: str | Path, *, dtype: str = "bf16",
                   vision_only: bool = False, tokenizer: Optional[str | Path] = None,
                   variant: Optional[str] = None, force: bool = False,
                   progress: bool = True, require_tokenizer: bool = True) -> Path:
    """Convert a Megatron torch_dist checkpoint (any TP/PP) to the released HF format.

    Args:
        src: ``iter_N`` dir or a save dir (its ``latest``, else its newest finished checkpoint).
        dst: output directory (created; must not exist unless ``force``).
        dtype: stored dtype of every tensor ("bf16" as released, "fp32", "fp16").
        vision_only: drop embeddings, in_proj/proj and lm_head.
        tokenizer: tokenizer.json or a directory of tokenizer files to copy (default: the
            training config's ``data.text.tokenizer_path``, see :func:`resolve_run_tokenizer`).
        require_tokenizer: refuse to write an export without a tokenizer (the processor and
            captioning need it); False allows a weights-only export.
        variant: refuse the checkpoint unless it has this preset's shape (e.g. "g/16").
        force: overwrite ``dst``.

    Returns:
        ``dst``.
    """
    dst = Path(dst)
    out_dtype = dtype_from_name(dtype)
    reader = DistCheckpointReader(src)
    m = model_config_from_dict((reader.common.get("config") or {}).get("model"))
    if variant:
        check_against_variant(m, variant)
    if tokenizer is None:
        tokenizer, configured = resolve_run_tokenizer(reader.common, reader.path)
        if tokenizer is None and require_tokenizer:
            seen = (f"the run's data.text.tokenizer_path {configured!r} is not found from "
                    f"{Path.cwd()} nor from any folder above {reader.path}" if configured
                    else "the checkpoint's config names no data.text.tokenizer_path")
            raise ConversionError(f"no tokenizer for the export: {seen}; pass --tokenizer "
                                  "path/to/tokenizer.json (or a folder of tokenizer files), or "
                                  "--no-tokenizer for a weights-only export.")
        if tokenizer is not None:
            logger.info("copying the training tokenizer %s (data.text.tokenizer_path)", tokenizer)
    data_cfg = (reader.common.get("config") or {}).get("data") or {}
    note = qk_layernorm_note(m)
    if note:
        logger.warning(note)
    reg = mapping_registry(m, vision_only=vision_only)
    _check_megatron_shapes(reader, reg, m)
    shapes = hf_shapes(m, vision_only)
    layout = [(n, shapes[hf_pattern(n)], out_dtype) for n in reg.hf_keys()]
    with _staged_output(dst, force) as tmp:
        with _progress(len(layout), f"to-hf {Path(src).name}", progress) as bar, \
                SafetensorsStreamWriter(tmp / "model.safetensors", layout) as writer:
            for name, tensor in reg.megatron_to_hf(reader.get, reader.keys()):
                writer.write(name, tensor.to(out_dtype))
                bar.update(1)
        write_hf_files(tmp, m, dtype=dtype, vision_only=vision_only, tokenizer=tokenizer,
                       provenance={"source": str(reader.path),
                                   "source_layout": reader.common.get("layout")},
                       image=image_settings(data_cfg.get("image"), m.patch_size),
                       prompt=(data_cfg.get("text") or {}).get("prompt"))
    logger.info("wrote %s (%d tensors, %s%s)", dst, len(layout), dtype,
                ", vision only" if vision_only else "")
    return dst


# ------------------------------------------------------------------------------ HF → Megatron
def _check_hf(reader: SafetensorsReader, m: ModelConfig, reg: MappingRegistry) -> None:
    reg.check_hf_keys(reader.keys())
    shapes = hf_shapes(m)
    for name in reg.hf_keys():
        want, got = shapes[hf_pattern(name)], reader.shape(name)
        if tuple(got) != tuple(want):
            raise ConversionError(f"{name} has shape {list(got)} but config.json (hidden="
                                  f"{m.hidden_size}, intermediate={m.ffn_hidden_size}, heads="
                                  f"{m.num_attention_heads}, layers={m.num_layers}) implies "
                                  f"{list(want)}; config.json does not match the weights.")


def _validate_layout(m: ModelConfig, tp: int, pp: int) -> None:
    if tp < 1 or pp < 1:
        raise ConversionError(f"--tp ({tp}) and --pp ({pp}) must be >= 1.")
    for what, n in (("num_attention_heads", m.num_attention_heads),
                    ("ffn_hidden_size", m.ffn_hidden_size), ("vocab_size", m.vocab_size)):
        if n % tp:
            ok = [d for d in range(1, m.num_attention_heads + 1)
                  if m.num_attention_heads % d == 0 and m.ffn_hidden_size % d == 0
                  and m.vocab_size % d == 0]
            raise ConversionError(f"model.{what} ({n}) is not divisible by --tp ({tp}); use tp "
                                  f"in {ok}.")
    if m.num_layers % pp:
        ok = [d for d in range(1, m.num_layers + 1) if m.num_layers % d == 0]
        raise ConversionError(f"model.num_layers ({m.num_layers}) is not divisible by --pp "
                              f"({pp}); use pp in {ok}.")


def _export_data_section(src: Path) -> dict:
    """The ``data`` keys an export knows (image preprocessing, tokenizer), for the probes and a
    later ``to-hf`` of the converted checkpoint."""
    out: dict = {}
    pre = src / "preprocessor_config.json"
    if pre.is_file():
        out["image"] = image_section_from_export(json.loads(pre.read_text()))
    if (src / "tokenizer.json").is_file():
        out["text"] = {"tokenizer_path": str((src / "tokenizer.json").resolve())}
    return out


def hf_to_megatron(src: str | Path, dst: str | Path, *, tp: int = 1, pp: int = 1,
                   dtype: Optional[str] = None, variant: Optional[str] = None,
                   force: bool = False, progress: bool = True) -> Path:
    """Convert a released-format HF directory to a Megatron torch_dist checkpoint.

    Args:
        src: directory with config.json and model.safetensors.
        dst: output save dir; receives ``iter_0000000/`` and ``latest``.
        tp, pp: target layout (validated, recorded, and used for the chunking); the trainer
            can load the result under any layout.
        dtype: stored dtype ("bf16", "fp32", "fp16"); None keeps each tensor's dtype.
        variant: refuse the checkpoint unless it has this preset's shape.
        force: overwrite ``dst``.

    Returns:
        the ``iter_0000000`` directory.
    """
    src, dst = Path(src), Path(dst)
    reader = SafetensorsReader(src)
    emb = reader.shape("embeddings.weight") if "embeddings.weight" in reader.entries else None
    m, raw = read_hf_config(src, emb)
    if raw.get("vision_only") or emb is None:
        raise ConversionError(f"{src} is a vision-only export (no embeddings.weight); it cannot "
                              "become a Megatron GenLIP checkpoint. Convert the full export.")
    if variant:
        check_against_variant(m, variant)
    _validate_layout(m, tp, pp)
    reg = mapping_registry(m)
    _check_hf(reader, m, reg)
    want = megatron_shapes(m)
    out_dtype = dtype_from_name(dtype) if dtype else None
    by_key = {b.megatron: b for b in reg.bound}
    layouts = [TensorLayout(b.megatron, want[b.megatron], b.rule.tp_axis,
                            tp * b.rule.tp_stride if b.rule.tp_axis is not None else 1)
               for b in reg.bound]

    def dtype_of(key: str) -> torch.dtype:
        return out_dtype or reader.dtype(by_key[key].hf[0])

    def produce(key: str) -> Tensor:
        b = by_key[key]
        return b.rule.to_megatron(tuple(reader.get(n) for n in b.hf)).to(dtype_of(key))

    common = {
        "config": {"model": to_dict(m), "parallel": {"tp": tp, "pp": pp},
                   "data": _export_data_section(src)},
        # dp 0: no per-rank state (RNG, data loader) in this checkpoint, so a loading trainer
        # never takes it for a same-layout resume.
        "layout": {"tp": tp, "pp": pp, "dp": 0},
        "training_state": {"step": 0, "consumed_rows": 0, "extra": {"converted_from": str(src)}},
        "num_model_chunks": 1,
        "converted_from_hf": {"source": str(src), "tp": tp, "pp": pp},
    }
    with _staged_output(dst, force) as tmp, \
            _progress(len(layouts), f"from-hf {src.name}", progress) as bar:
        ckpt = iteration_dir(tmp, 0)
        ckpt.mkdir()
        write_dist_checkpoint(ckpt, layouts, m.num_layers, dtype_of, produce,
                              common, on_tensor=lambda _: bar.update(1),
                              objects=MEGATRON_EXTRA_STATE)
        mark_complete(ckpt, ckpt.name)   # finished as the trainer's own checkpoints are
        write_latest(tmp, ckpt.name)
    logger.info("wrote %s (tp=%d, pp=%d layout, %d tensors)", dst, tp, pp, len(layouts))
    return iteration_dir(dst, 0)


# ------------------------------------------------------------------------------ in memory
def megatron_state_dict_to_hf(state_dict: Mapping[str, Tensor], m: ModelConfig,
                              vision_only: bool = False) -> dict[str, Tensor]:
    """Canonical TP=1 megatron state dict (global layer numbers) → HF state dict.

    Use :meth:`MappingRegistry.merge_ranks` first for per-rank (TP/PP) state dicts.
    """
    reg = mapping_registry(m, vision_only=vision_only)
    return dict(reg.megatron_to_hf(state_dict.__getitem__, state_dict.keys()))


def hf_state_dict_to_megatron(state_dict: Mapping[str, Tensor], m: ModelConfig
                              ) -> dict[str, Tensor]:
    """HF state dict → canonical TP=1 megatron state dict."""
    reg = mapping_registry(m)
    return dict(reg.hf_to_megatron(state_dict.__getitem__, state_dict.keys()))
