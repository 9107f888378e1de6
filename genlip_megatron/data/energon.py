"""Megatron-Energon datasets as sources, read by our own shard reader (docs/data.md).

``energon prepare`` leaves the tars as they are and writes ``<root>/.nv-meta/``:
``dataset.yaml`` (sample type and field_map), ``split.yaml`` (``split_parts``: brace patterns
of the tars of each split, and ``exclude``), ``.info.json`` (samples per tar) and
``index.sqlite`` (byte offsets for random access). An Energon *metadataset* YAML
(``MetadatasetV2``) blends such folders with weights.

We resolve an energon source into plain sources before the loader starts: one per dataset
folder, with the split's tars as ``paths``, the blend weight times the source weight as
``weight``, and the sample layout and field_map from ``dataset.yaml``. From there the usual
streams, packer, skip accounting and exact resume state apply, so an Energon dataset trains
exactly like the same tars given as webdataset sources. Energon's own loader is not used: its
sample order and saved state depend on its worker layout, which would break our
worker-count-invariant, exactly resumable order (the decision is written down in docs/data.md).
Reading needs no megatron-energon install; only ``energon prepare`` does.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from typing import Any, Optional

import yaml

from genlip_megatron.config.loader import ConfigError
from genlip_megatron.config.data import DataConfig, SourceConfig
from genlip_megatron.data.storage import is_remote, join, read_bytes
from genlip_megatron.data.template import SampleError

META_DIR = ".nv-meta"
# Energon sample type → (our layout, fields its field_map must name)
SAMPLE_TYPES = {
    "CaptioningSample": ("caption", ("image", "caption")),
    "VQASample": ("vqa", ("image", "context", "answers")),
    "CrudeWebdataset": ("conversations", ()),
}
_MAX_DEPTH = 8  # nested metadatasets
# members Energon's default decoder turns into text (anything else stays bytes)
_TEXT_EXTS = ("txt", "text", "caption", "cls")


def resolve_data_config(cfg: DataConfig) -> DataConfig:
    """``cfg`` with every energon source replaced by plain sources (``cfg`` if none)."""
    if not any(s.format == "energon" for s in cfg.sources + cfg.eval_sources):
        return cfg
    return dataclasses.replace(cfg, sources=resolve_sources(cfg.sources, "data.sources"),
                               eval_sources=resolve_sources(cfg.eval_sources,
                                                            "data.eval_sources"))


def resolve_sources(sources: list[SourceConfig], where: str) -> list[SourceConfig]:
    """Plain sources for ``sources`` (energon ones expanded, others unchanged)."""
    out: list[SourceConfig] = []
    for i, src in enumerate(sources):
        if src.format != "energon":
            out.append(src)
            continue
        key = f"{where}[{i}]"
        refs = _references(src.path, src.split, src.weight, key, 0)
        for ref in refs:
            name = src.name if len(refs) == 1 else \
                f"{src.name or f'source{i}'}:{posixpath.basename(ref.root)}"
            out.append(_dataset_source(ref, name, key))
    return out


@dataclasses.dataclass
class _Reference:
    """One dataset folder of a (meta)dataset, with its effective weight and split."""

    root: str
    split: str
    weight: float
    dataset_config: str = "dataset.yaml"
    split_config: str = "split.yaml"


def _load_yaml(url: str, key: str) -> Any:
    try:
        return yaml.safe_load(read_bytes(url))
    except FileNotFoundError:
        raise ConfigError(f"{key}.path: {url} does not exist; run `energon prepare` on the "
                          "dataset folder or fix the path.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}.path: {url} is not valid YAML ({str(exc)[:120]}).") from None


def _references(path: str, split: str, weight: float, key: str, depth: int
                ) -> list[_Reference]:
    """Dataset folders under ``path`` (a prepared folder or a metadataset YAML)."""
    if not path.endswith((".yaml", ".yml")):
        return [_Reference(path.rstrip("/"), split, weight)]
    if depth > _MAX_DEPTH:
        raise ConfigError(f"{key}.path: metadatasets nest deeper than {_MAX_DEPTH} levels at "
                          f"{path}; is there a cycle?")
    doc = _load_yaml(path, key)
    cls = doc.get("__class__") if isinstance(doc, dict) else None
    if cls != "MetadatasetV2":
        raise ConfigError(f"{key}.path: {path} is a {cls or type(doc).__name__}, not an Energon "
                          "MetadatasetV2 (give a prepared dataset folder or a MetadatasetV2 "
                          "YAML).")
    splits = doc.get("splits") or {}
    if split not in splits:
        raise ConfigError(f"{key}.split: {path} has no split {split!r}; it has "
                          f"{sorted(splits)}.")
    return _node_references(splits[split], posixpath.dirname(path), split, weight, key, depth)


def _node_references(node: Any, base: str, split: str, weight: float, key: str, depth: int
                     ) -> list[_Reference]:
    """References of one metadataset node: ``{path: ...}`` or ``{blend: [...]}``."""
    if not isinstance(node, dict):
        raise ConfigError(f"{key}: a metadataset entry is a {type(node).__name__}, not a map.")
    unsupported = sorted(set(node) & {"join", "blend_epochized", "subset", "aux", "joiner"})
    if unsupported:
        raise ConfigError(f"{key}: metadataset entries with {unsupported} are not read by "
                          "genlip_megatron (blend and path are); flatten them into a weighted "
                          "blend.")
    if "blend" in node:
        total = []
        for entry in node["blend"]:
            w = float(entry.get("weight", 1.0)) if isinstance(entry, dict) else 1.0
            if w <= 0:
                raise ConfigError(f"{key}: blend weight {w} must be > 0.")
            total += _node_references(entry, base, split, weight * w, key, depth)
        return total
    if "path" not in node:
        raise ConfigError(f"{key}: metadataset entry {sorted(node)} has neither path nor blend.")
    sub = node["path"] if is_remote(node["path"]) or posixpath.isabs(node["path"]) \
        else join(base, node["path"])
    sub_split = node.get("split_part") or split
    refs = _references(sub, sub_split, weight, key, depth + 1)
    for ref in refs:
        ref.dataset_config = node.get("dataset_config") or ref.dataset_config
        ref.split_config = node.get("split_config") or ref.split_config
    return refs


def _dataset_source(ref: _Reference, name: Optional[str], key: str) -> SourceConfig:
    """The plain source for one prepared dataset folder."""
    meta = join(ref.root, META_DIR)
    ds = _load_yaml(join(meta, ref.dataset_config), key)
    parts = _load_yaml(join(meta, ref.split_config), key)
    if not isinstance(ds, dict) or not isinstance(parts, dict):
        raise ConfigError(f"{key}: {meta} holds no dataset.yaml/split.yaml maps; re-run "
                          "`energon prepare`.")
    sample_type = ds.get("sample_type", ds)
    cls = sample_type.get("__class__") if isinstance(sample_type, dict) else sample_type
    if cls not in SAMPLE_TYPES:
        raise ConfigError(f"{key}: {ref.root} has sample type {cls!r}; genlip_megatron reads "
                          f"{sorted(SAMPLE_TYPES)} (re-prepare with one of them).")
    layout, fields = SAMPLE_TYPES[cls]
    field_map = ds.get("field_map")
    if fields and not (isinstance(field_map, dict) and set(fields) <= set(field_map)):
        why = "a Python sample_loader" if "sample_loader" in ds else f"field_map {field_map}"
        raise ConfigError(f"{key}: {ref.root} maps its fields with {why}; genlip_megatron "
                          f"needs a field_map naming {list(fields)} (energon prepare "
                          "--field-map) or sample type CrudeWebdataset.")
    shards = _split_shards(ref, parts, key)
    return SourceConfig(paths=shards, weight=ref.weight, format=layout,
                        field_map={k: str(field_map[k]) for k in fields} if fields else None,
                        name=name)


def _split_shards(ref: _Reference, parts: dict, key: str) -> list[str]:
    """Sorted tar paths of ``ref.split`` (``split_parts`` patterns minus ``exclude``)."""
    from braceexpand import braceexpand

    split_parts = parts.get("split_parts") or {}
    if ref.split not in split_parts:
        raise ConfigError(f"{key}.split: {ref.root} has no split {ref.split!r} in "
                          f"{META_DIR}/split.yaml; it has {sorted(split_parts)}.")
    exclude = set(parts.get("exclude") or [])
    rel = [p for pattern in split_parts[ref.split] for p in braceexpand(str(pattern))]
    shards = sorted({join(ref.root, p) for p in rel if p not in exclude})
    if not shards:
        raise ConfigError(f"{key}.split: split {ref.split!r} of {ref.root} lists no tars.")
    return shards


# ---------------------------------------------------------------------------- field access
def mapped_fields(members: dict[str, bytes], field_map: dict[str, str], layout: str
                  ) -> tuple[bytes, dict]:
    """Image bytes and our json layout of one sample read through an Energon field_map.

    Raises:
        SampleError: missing_image, missing_text or bad_json (a counted skip).
    """
    image = _field(members, field_map["image"], "missing_image")
    if not isinstance(image, (bytes, bytearray)):
        raise SampleError("missing_image", f"field_map image {field_map['image']!r} is not "
                          "an image member")
    if layout == "caption":
        return bytes(image), {"caption": _field(members, field_map["caption"], "missing_text")}
    context = _field(members, field_map["context"], "missing_text")
    answers = _field(members, field_map["answers"], "missing_text")
    answer = answers[0] if isinstance(answers, list) and answers else answers
    if not isinstance(context, str) or not isinstance(answer, str):
        raise SampleError("bad_json", "vqa context/answers are not strings")
    return bytes(image), {"conversations": [{"from": "human", "value": context},
                                            {"from": "gpt", "value": answer}]}


def _field(members: dict[str, bytes], spec: str, missing: str) -> Any:
    """Energon field access: ``a,b`` = first present option; ``json[k][0]`` = nested key."""
    for option in spec.split(","):
        name, *keys = option.strip().replace("]", "").split("[")
        if name not in members:
            continue
        value = _decoded(name, members[name])
        try:
            for k in keys:
                value = value[int(k)] if isinstance(value, list) else value[k]
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        return value
    raise SampleError(missing, f"no member for field_map {spec!r} in {sorted(members)}")


def _decoded(name: str, data: bytes) -> Any:
    """A member as Energon's default decoder gives it: json parsed, text as str."""
    ext = name.rsplit(".", 1)[-1]
    try:
        if ext == "json":
            return json.loads(data.decode("utf-8"))
        if ext in _TEXT_EXTS:
            return data.decode("utf-8")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SampleError("bad_json", f"member {name}: {str(exc)[:80]}") from None
    return data


def shard_counts(root: str) -> Optional[dict[str, int]]:
    """Samples per tar from ``.nv-meta/.info.json`` (None when absent), for logs and tests."""
    try:
        return dict(json.loads(read_bytes(join(root, META_DIR, ".info.json")))["shard_counts"])
    except (FileNotFoundError, KeyError, ValueError):
        return None
