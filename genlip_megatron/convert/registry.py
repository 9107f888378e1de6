"""The Megatron ⇄ Hugging Face mapping of GenLIP: one table of per-tensor rules, and its engine.

:func:`mapping_registry` is the whole contract (read it as a table). Megatron names are the
canonical TP=1 names of ``genlip_megatron.model`` (``decoder.layers.<global index>...``); HF names
are the released GenLIP checkpoint keys (docs/reference-architecture.md, no ``model.`` prefix). The
engine
(:class:`MappingRegistry`) expands ``*`` over layers, checks that every source key is consumed
exactly once (dropped keys are listed explicitly) and every target key produced exactly once,
converts tensor by tensor (streaming: one rule's tensors in memory at a time), and merges or
splits per-rank state dicts (TP gather/shard through each rule, PP layer renumbering).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Optional

from torch import Tensor

from genlip_megatron.config import ModelConfig
from genlip_megatron.convert.rules import ConvAsLinear, GatedMLPMapping, QKVGateMapping, \
    Rename, Rule

__all__ = ["mapping_registry", "MappingRegistry", "BoundRule", "ConversionError",
           "renumber_layers", "hf_shapes", "hf_pattern", "BACKEND_ALIASES", "MEGATRON_EXTRA_STATE"]


class ConversionError(ValueError):
    """A checkpoint that does not fit the mapping (missing/unexpected keys, wrong shapes)."""


# The canonical names are the dist-checkpoint names of genlip_megatron.model (TE's fused-norm
# names for every backend). The local backend's in-memory ``state_dict()`` names the two block
# norms differently; this is the one place that maps them (same table as
# ``model.layer_spec.LOCAL_TO_TE_KEYS``, pinned by a unit test).
BACKEND_ALIASES: dict[str, str] = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}

# Keys with no counterpart on the other side (None in the table's sense): consumed, not mapped.
DROPPED_MEGATRON = ("*._extra_state", "*._extra_state/*")  # linear/TE FP8 metadata, no weights
DROPPED_HF = ("rotary_emb.inv_freq", "visual.rotary_emb.inv_freq")  # recomputed from config
# The megatron-only objects of a GenLIP checkpoint (ShardedObjects, ``get_extra_state`` of every
# parallel linear): dropped by to-hf, written as ``None`` by from-hf (what local linears save and
# what TE accepts for "no FP8 metadata yet"), so megatron's loader finds every key it expects.
MEGATRON_EXTRA_STATE = (
    "decoder.layers.*.self_attention.linear_qkv._extra_state",
    "decoder.layers.*.self_attention.linear_proj._extra_state",
    "decoder.layers.*.mlp.linear_fc1._extra_state",
    "decoder.layers.*.mlp.linear_fc2._extra_state",
    "output_layer._extra_state",
    # TE's final LayerNorm (an ops-based module with get_extra_state, TE >= 2.0); local models
    # do not request it, so writing it costs nothing (found by tests/te_standin).
    "decoder.final_layernorm._extra_state",
)


def mapping_registry(m: ModelConfig, vision_only: bool = False) -> "MappingRegistry":
    """The GenLIP mapping for architecture ``m`` (``*`` = global layer index).

    Args:
        m: the model architecture (hidden/heads/layers/text width/patch).
        vision_only: the HF side is a vision-encoder-only export (text rules are dropped).
    """
    L, V = "decoder.layers.*.", "visual.layers.*."
    nh, gated = m.num_attention_heads, m.gated_attention
    has_proj = m.text_dim != m.hidden_size
    # model.qk_layernorm: per-head norms, not in the released format (docs/conversion.md).
    qk_norms = [Rename(L + f"self_attention.{x}_layernorm.{p}", hf=V + f"self_attn.{x}_norm.{p}")
                for x in "qk" for p in ("weight", "bias")] if m.qk_layernorm else []
    rules: list[Rule] = [
        # ---- megatron (TP=1 name) ----------------- HF (released name) ------------- TP ------
        ConvAsLinear("embedding.patch_embed.weight", hf="vision_embeddings.patch_embedding.weight",
                     channels=m.num_channels, patch_size=m.patch_size),
        Rename("embedding.patch_embed.bias", hf="vision_embeddings.patch_embedding.bias"),
        Rename("embedding.word_embeddings.weight", hf="embeddings.weight", tp_axis=0, text=True),
        *([Rename("embedding.in_proj.weight", hf="in_proj.weight", text=True),
           Rename("embedding.in_proj.bias", hf="in_proj.bias", text=True)] if has_proj else []),
        Rename(L + "self_attention.linear_qkv.layer_norm_weight", hf=V + "layer_norm1.weight"),
        Rename(L + "self_attention.linear_qkv.layer_norm_bias", hf=V + "layer_norm1.bias"),
        QKVGateMapping(L + "self_attention.linear_qkv.weight", q=V + "self_attn.q_proj.weight",
                       k=V + "self_attn.k_proj.weight", v=V + "self_attn.v_proj.weight",
                       num_heads=nh, gated=gated, tp_axis=0),
        QKVGateMapping(L + "self_attention.linear_qkv.bias", q=V + "self_attn.q_proj.bias",
                       k=V + "self_attn.k_proj.bias", v=V + "self_attn.v_proj.bias",
                       num_heads=nh, gated=gated, tp_axis=0),
        *qk_norms,
        Rename(L + "self_attention.linear_proj.weight", hf=V + "self_attn.out_proj.weight",
               tp_axis=1),
        Rename(L + "self_attention.linear_proj.bias", hf=V + "self_attn.out_proj.bias"),
        Rename(L + "self_attn_bda.layer_scale", hf=V + "layer_scale1.lambda1"),
        Rename(L + "mlp.linear_fc1.layer_norm_weight", hf=V + "layer_norm2.weight"),
        Rename(L + "mlp.linear_fc1.layer_norm_bias", hf=V + "layer_norm2.bias"),
        GatedMLPMapping(L + "mlp.linear_fc1.weight", gate=V + "mlp.gate_fc.weight",
                        up=V + "mlp.fc1.weight", tp_axis=0, tp_stride=2),
        GatedMLPMapping(L + "mlp.linear_fc1.bias", gate=V + "mlp.gate_fc.bias",
                        up=V + "mlp.fc1.bias", tp_axis=0, tp_stride=2),
        Rename(L + "mlp.linear_fc2.weight", hf=V + "mlp.fc2.weight", tp_axis=1),
        Rename(L + "mlp.linear_fc2.bias", hf=V + "mlp.fc2.bias"),
        Rename(L + "mlp_bda.layer_scale", hf=V + "layer_scale2.lambda1"),
        Rename("decoder.final_layernorm.weight", hf="ln_post.weight"),
        Rename("decoder.final_layernorm.bias", hf="ln_post.bias"),
        *([Rename("output_proj.weight", hf="proj.weight", text=True),
           Rename("output_proj.bias", hf="proj.bias", text=True)] if has_proj else []),
        Rename("output_layer.weight", hf="lm_head.weight", tp_axis=0, text=True),
    ]
    return MappingRegistry(rules, m.num_layers, vision_only=vision_only)


def hf_pattern(name: str) -> str:
    """``visual.layers.7.mlp.fc1.weight`` → ``visual.layers.*.mlp.fc1.weight`` (table key)."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "visual" and parts[1] == "layers":
        parts[2] = "*"
    return ".".join(parts)


def hf_shapes(m: ModelConfig, vision_only: bool = False) -> dict[str, tuple[int, ...]]:
    """Expected shape of every HF tensor (docs/reference-architecture.md), ``*`` = layer index."""
    e, i, t, v = m.hidden_size, m.ffn_hidden_size, m.text_dim, m.vocab_size
    V = "visual.layers.*."
    q = 2 * e if m.gated_attention else e
    shapes = {
        "vision_embeddings.patch_embedding.weight": (e, m.num_channels, m.patch_size,
                                                     m.patch_size),
        "vision_embeddings.patch_embedding.bias": (e,),
        V + "layer_norm1.weight": (e,), V + "layer_norm1.bias": (e,),
        V + "self_attn.q_proj.weight": (q, e), V + "self_attn.q_proj.bias": (q,),
        V + "self_attn.k_proj.weight": (e, e), V + "self_attn.k_proj.bias": (e,),
        V + "self_attn.v_proj.weight": (e, e), V + "self_attn.v_proj.bias": (e,),
        V + "self_attn.out_proj.weight": (e, e), V + "self_attn.out_proj.bias": (e,),
        V + "layer_norm2.weight": (e,), V + "layer_norm2.bias": (e,),
        V + "mlp.fc1.weight": (i, e), V + "mlp.fc1.bias": (i,),
        V + "mlp.gate_fc.weight": (i, e), V + "mlp.gate_fc.bias": (i,),
        V + "mlp.fc2.weight": (e, i), V + "mlp.fc2.bias": (e,),
        V + "layer_scale1.lambda1": (e,), V + "layer_scale2.lambda1": (e,),
        "ln_post.weight": (e,), "ln_post.bias": (e,),
    }
    if m.qk_layernorm:
        shapes.update({V + f"self_attn.{x}_norm.{p}": (m.kv_channels,)
                       for x in "qk" for p in ("weight", "bias")})
    if not vision_only:
        shapes.update({"embeddings.weight": (v, t), "lm_head.weight": (v, t)})
        if t != e:
            shapes.update({"in_proj.weight": (e, t), "in_proj.bias": (e,),
                           "proj.weight": (t, e), "proj.bias": (t,)})
    return shapes


@dataclass(frozen=True)
class BoundRule:
    """A rule with concrete names (layer index filled in)."""

    rule: Rule
    megatron: str
    hf: tuple[str, ...]
    layer: Optional[int]


def _concrete(pattern: str, layer: Optional[int]) -> str:
    return pattern if layer is None else pattern.replace("*", str(layer))


def _pattern_regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"(\d+)") + "$")


_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def canonical_megatron_key(key: str) -> str:
    """Map backend aliases (the local backend's separate norm names) to the canonical name."""
    match = _LAYER_RE.match(key)
    if match and match.group(2) in BACKEND_ALIASES:
        return f"decoder.layers.{match.group(1)}.{BACKEND_ALIASES[match.group(2)]}"
    return key


def renumber_layers(state_dict: Mapping[str, Tensor], offset: int) -> dict[str, Tensor]:
    """PP renumbering: ``decoder.layers.<j>.`` → ``decoder.layers.<j + offset>.``.

    A pipeline stage's in-memory state dict numbers its layers from 0; the canonical (and the
    dist-checkpoint) numbering is global, offset by the layers of the earlier stages.
    """
    out = {}
    for key, value in state_dict.items():
        match = _LAYER_RE.match(key)
        out[f"decoder.layers.{int(match.group(1)) + offset}.{match.group(2)}"
            if match else key] = value
    return out


class MappingRegistry:
    """Engine over a list of rules for a model with ``num_layers`` layers."""

    def __init__(self, rules: list[Rule], num_layers: int, vision_only: bool = False) -> None:
        self.rules = rules
        self.num_layers = num_layers
        self.vision_only = vision_only
        self.bound: list[BoundRule] = []
        for rule in rules:
            layers = range(num_layers) if "*" in rule.megatron else [None]
            for i in layers:
                self.bound.append(BoundRule(rule, _concrete(rule.megatron, i),
                                            tuple(_concrete(n, i) for n in rule.hf_names()), i))
        self._by_megatron = {b.megatron: b for b in self.bound}
        self._by_hf = {n: b for b in self.bound for n in b.hf}
        if len(self._by_megatron) != len(self.bound) or \
                len(self._by_hf) != sum(len(b.hf) for b in self.bound):
            raise AssertionError("mapping_registry has a key mapped twice")

    # ------------------------------------------------------------------ the table
    def table(self) -> str:
        """The mapping as a markdown table (one row per rule, ``*`` = layer)."""
        rows = ["| megatron (TP=1) | HF | rule | TP split |", "|---|---|---|---|"]
        for r in self.rules:
            tp = "replicated" if r.tp_axis is None else \
                f"axis {r.tp_axis}" + (f", stride {r.tp_stride}" if r.tp_stride > 1 else "")
            text = " (text; dropped by --vision-only)" if r.text else ""
            rows.append(f"| `{r.megatron}` | {', '.join(f'`{n}`' for n in r.hf_names())}{text} "
                        f"| {type(r).__name__} | {tp} |")
        for k in MEGATRON_EXTRA_STATE:
            rows.append(f"| `{k}` | None (dropped; written as None by from-hf) | – | – |")
        for k in DROPPED_HF:
            rows.append(f"| None (dropped) | `{k}` | – | – |")
        return "\n".join(rows)

    # ------------------------------------------------------------------ key accounting
    def _active(self) -> list[BoundRule]:
        return [b for b in self.bound if not (self.vision_only and b.rule.text)]

    def hf_keys(self) -> list[str]:
        """Every HF key this registry produces/consumes, in table order."""
        return [n for b in self._active() for n in b.hf]

    def megatron_keys(self) -> list[str]:
        """Every canonical megatron key, in table order."""
        return [b.megatron for b in self.bound]

    def rule_for_megatron(self, key: str) -> Optional[BoundRule]:
        """The bound rule of a canonical megatron key (None if unmapped)."""
        return self._by_megatron.get(canonical_megatron_key(key))

    def check_megatron_keys(self, keys: Iterable[str]) -> dict[str, str]:
        """Check a megatron key set covers the table exactly; returns canonical → source key.

        Raises:
            ConversionError: with the missing and unexpected keys and the likely cause.
        """
        found: dict[str, str] = {}
        unexpected = []
        for key in keys:
            if any(fnmatch.fnmatchcase(key, p) for p in DROPPED_MEGATRON):
                continue
            canon = canonical_megatron_key(key)
            if canon in found:
                raise ConversionError(f"megatron keys {found[canon]!r} and {key!r} both map to "
                                      f"{canon!r}; the checkpoint mixes backends.")
            if canon in self._by_megatron:
                found[canon] = key
            else:
                unexpected.append(key)
        missing = [k for k in self.megatron_keys() if k not in found]
        if missing or unexpected:
            raise ConversionError(
                "the megatron checkpoint does not match the GenLIP mapping for "
                f"{self.num_layers} layers: missing {_short(missing)}, unexpected "
                f"{_short(unexpected)}; check model.num_layers / text_dim in the checkpoint's "
                "config, or extend convert.registry.mapping_registry for new parameters.")
        return found

    def check_hf_keys(self, keys: Iterable[str]) -> None:
        """Check an HF key set covers the table exactly (dropped keys are ignored).

        Raises:
            ConversionError: with the missing and unexpected keys.
        """
        keys = [k for k in keys if k not in DROPPED_HF]
        expected, found = set(self.hf_keys()), set(keys)
        missing = [k for k in self.hf_keys() if k not in found]
        unexpected = [k for k in keys if k not in expected]
        if missing or unexpected:
            hint = ""
            if any(k.startswith("model.") for k in unexpected):
                hint = " (keys carry a 'model.' prefix; the released format has none)"
            raise ConversionError(
                f"the HF checkpoint does not match config.json ({self.num_layers} layers"
                f"{', vision-only' if self.vision_only else ''}): missing {_short(missing)}, "
                f"unexpected {_short(unexpected)}{hint}.")

    # ------------------------------------------------------------------ conversion
    def megatron_to_hf(self, get: Callable[[str], Tensor],
                       keys: Iterable[str]) -> Iterator[tuple[str, Tensor]]:
        """Stream HF tensors from a megatron (TP=1, global layer numbers) source.

        Args:
            get: loads one megatron tensor by its source key.
            keys: every model key of the source (checked by :meth:`check_megatron_keys`).

        Yields:
            ``(hf_key, tensor)`` in table order; each HF key exactly once.
        """
        source = self.check_megatron_keys(keys)
        produced: set[str] = set()
        for b in self.bound:
            if self.vision_only and b.rule.text:
                continue  # consumed and dropped: the vision-only export has no text path
            for name, tensor in zip(b.hf, b.rule.to_hf(get(source[b.megatron]))):
                if name in produced:
                    raise AssertionError(f"HF key {name} produced twice")
                produced.add(name)
                yield name, tensor
        if produced != set(self.hf_keys()):
            raise AssertionError(f"HF keys not produced: {set(self.hf_keys()) - produced}")

    def hf_to_megatron(self, get: Callable[[str], Tensor],
                       keys: Iterable[str]) -> Iterator[tuple[str, Tensor]]:
        """Stream canonical megatron tensors from an HF source (``get`` loads one HF tensor)."""
        if self.vision_only:
            raise ConversionError("a vision-only export has no text embedding, in_proj/proj or "
                                  "lm_head, so it cannot become a Megatron GenLIP checkpoint; "
                                  "convert the full export instead.")
        self.check_hf_keys(keys)
        for b in self.bound:
            yield b.megatron, b.rule.to_megatron(tuple(get(n) for n in b.hf))

    # ------------------------------------------------------------------ per-rank state dicts
    def merge_ranks(self, rank_state_dicts: Mapping[tuple[int, int], Mapping[str, Tensor]],
                    layer_offsets: Optional[Mapping[int, int]] = None) -> dict[str, Tensor]:
        """Per-rank megatron state dicts ``{(pp_rank, tp_rank): sd}`` → one canonical TP=1 dict.

        Args:
            rank_state_dicts: every (pp, tp) rank's ``model.state_dict()`` (local layer numbers).
            layer_offsets: global index of each PP stage's first layer; default: the layer
                counts of the earlier stages.
        """
        pps = sorted({p for p, _ in rank_state_dicts})
        tps = sorted({t for _, t in rank_state_dicts})
        if set(rank_state_dicts) != {(p, t) for p in pps for t in tps}:
            raise ConversionError(f"rank state dicts {sorted(rank_state_dicts)} do not form a "
                                  "full (pp, tp) grid.")
        offsets = dict(layer_offsets or {})
        if not offsets:
            acc = 0
            for p in pps:
                offsets[p] = acc
                acc += _num_local_layers(rank_state_dicts[(p, tps[0])])
        merged: dict[str, Tensor] = {}
        for p in pps:
            shards = [renumber_layers(rank_state_dicts[(p, t)], offsets[p]) for t in tps]
            for key in shards[0]:
                if any(fnmatch.fnmatchcase(key, d) for d in DROPPED_MEGATRON):
                    continue
                bound = self.rule_for_megatron(key)
                if bound is None:
                    raise ConversionError(f"megatron key {key!r} (pp rank {p}) is not in the "
                                          "mapping; extend convert.registry.mapping_registry.")
                canon = bound.megatron
                if canon in merged:
                    raise ConversionError(f"{canon} appears on more than one pipeline stage; "
                                          "pass layer_offsets for virtual pipeline chunks.")
                merged[canon] = bound.rule.gather([s[key] for s in shards])
        return merged

    def split_ranks(self, state_dict: Mapping[str, Tensor], tp: int, pp: int,
                    local_names: bool = False) -> dict[tuple[int, int], dict[str, Tensor]]:
        """Canonical TP=1 dict → per-rank dicts ``{(pp_rank, tp_rank): sd}`` (local numbering).

        Stage 0 holds the embedding, the last stage the final norm and head (megatron's layout).
        ``local_names`` emits the local backend's in-memory norm names (``input_layernorm.*``),
        i.e. what ``model.load_state_dict`` of a local-spec chunk expects.
        """
        inverse = {v: k for k, v in BACKEND_ALIASES.items()}
        if self.num_layers % pp:
            raise ConversionError(f"num_layers ({self.num_layers}) is not divisible by pp ({pp}).")
        per = self.num_layers // pp
        out: dict[tuple[int, int], dict[str, Tensor]] = {(p, t): {} for p in range(pp)
                                                          for t in range(tp)}
        for key, value in state_dict.items():
            bound = self.rule_for_megatron(key)
            if bound is None:
                raise ConversionError(f"megatron key {key!r} is not in the mapping.")
            if bound.layer is not None:
                p, local = divmod(bound.layer, per)
                suffix = bound.megatron.split(".", 3)[3]
                suffix = inverse.get(suffix, suffix) if local_names else suffix
                local_key = f"decoder.layers.{local}.{suffix}"
            else:
                p = 0 if key.startswith("embedding.") else pp - 1
                local_key = bound.megatron
            for t in range(tp):
                out[(p, t)][local_key] = bound.rule.shard(value, t, tp)
        return out


def _num_local_layers(state_dict: Mapping[str, Tensor]) -> int:
    idx = {int(m.group(1)) for k in state_dict if (m := _LAYER_RE.match(k))}
    return max(idx) + 1 if idx else 0


def _short(keys: list[str], n: int = 6) -> str:
    if not keys:
        return "none"
    more = f" … (+{len(keys) - n} more)" if len(keys) > n else ""
    return "[" + ", ".join(keys[:n]) + "]" + more
