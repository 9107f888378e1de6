"""Sample json → conversation → token ids and labels (the reference chat template).

Reference: ``Qwen2VLPretrainTemplate.encode_messages(..., no_special_tokens=True)`` with
``recap_datacomp_1b_preprocess`` (stage 1) and ``mmpretrain_mixed_preprocess`` (stage 2),
docs/reference-architecture.md. A sample is ``[IMG×N] prompt caption <|im_end|>\\n``:

- no BOS, no ``<|vision_start|>``/``<|vision_end|>``, no ``<|im_start|>``;
- each message is ``.strip()``-ed and encoded on its own (the image pads lead the first user
  message, so only its trailing whitespace is stripped, as in the reference);
- user text (prompt) is masked (-100), assistant text is labelled, ``<|im_end|>\\n`` is appended
  once and labelled;
- stage-2 conversations concatenate their turns with no separator; every assistant turn is
  labelled.

Deliberate differences from the reference (both are reference bugs, see
docs/reference-architecture.md, "Problems in the released training code"): json bytes are
decoded, and the reference README's ``conversation`` key is accepted besides ``conversations``.
The image always leads the sample (our packed layout and MRoPE ids assume it); the reference drops a
conversation whose first user turn lacks ``<image>``, we keep it with the image in front.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from genlip_megatron.data.batch import IGNORE_INDEX
from genlip_megatron.config.data import DEFAULT_PROMPT, TextConfig
from genlip_megatron.data.tokenizer import TextTokenizer

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class SampleError(Exception):
    """A sample that is skipped; ``reason`` is the counter name (e.g. ``bad_json``)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Conversation:
    """Alternating turns; the image goes in front of ``turns[0]`` (always a user turn)."""

    turns: list[tuple[str, str]]  # (role in {"user", "assistant"}, text)


@dataclass
class TextEncoding:
    """Token ids of the text part of one sample and their (unshifted) labels."""

    ids: np.ndarray     # int32 [T]
    labels: np.ndarray  # int32 [T]; -100 on user/prompt tokens


def parse_json_bytes(raw: Optional[bytes]) -> dict:
    """Decode a sample's json member (bytes or str) into a dict, or raise SampleError."""
    if raw is None:
        raise SampleError("missing_json")
    try:
        meta = json.loads(raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SampleError("bad_json", str(exc)[:80]) from None
    if not isinstance(meta, dict):
        raise SampleError("bad_json", f"top level is {type(meta).__name__}, not an object")
    return meta


def conversation_from_json(meta: dict, fmt: str, prompt: str = DEFAULT_PROMPT) -> Conversation:
    """Build the conversation of one sample from its json (stage-1 or stage-2 layout).

    Args:
        meta: the decoded json object.
        fmt: "caption" (``{"caption": str}``) or "conversations".
        prompt: user prompt of caption-format samples.
    """
    if fmt == "conversations":
        turns = meta.get("conversations", meta.get("conversation"))
        if turns is not None:
            return _conversation_from_turns(turns)
    if "caption" not in meta:
        raise SampleError("missing_text", f"json keys {sorted(meta)[:5]} have no caption"
                          + (" or conversations" if fmt == "conversations" else ""))
    caption = meta["caption"]
    if not isinstance(caption, str):
        raise SampleError("bad_json", f"caption is a {type(caption).__name__}, not a string")
    if not caption.strip():
        raise SampleError("empty_caption")
    return Conversation([("user", prompt), ("assistant", caption)])


def _normalise_turn(turn: Any) -> tuple[str, Any]:
    if not isinstance(turn, dict):
        raise SampleError("bad_conversation", f"turn is {type(turn).__name__}")
    if "from" in turn:
        role, value = turn["from"], turn.get("value")
    elif "role" in turn:
        role, value = turn["role"], turn.get("content")
    elif len(turn) == 1:  # {"human": "..."} form, as the reference accepts
        (role, value), = turn.items()
    else:
        raise SampleError("bad_conversation", f"turn keys {sorted(turn)}")
    if role not in _ROLES:
        raise SampleError("bad_conversation", f"unknown role {role!r}")
    return _ROLES[role], value


def _conversation_from_turns(turns: Any) -> Conversation:
    """mmpretrain_mixed_preprocess: drop a leading non-user turn, then (user, assistant) pairs."""
    if not isinstance(turns, list) or not turns:
        raise SampleError("bad_conversation", "conversations is not a non-empty list")
    norm = [_normalise_turn(t) for t in turns]
    if norm[0][0] != "user":
        norm = norm[1:]
    out: list[tuple[str, str]] = []
    for i in range(len(norm) // 2):
        a, b = norm[2 * i], norm[2 * i + 1]
        user, asst = (a, b) if a[0] == "user" else (b, a)
        if not isinstance(user[1], str) or not isinstance(asst[1], str):
            raise SampleError("bad_conversation", "a turn value is not a string")
        out += [("user", user[1].replace("<image>", "")), ("assistant", asst[1])]
    if not out:
        raise SampleError("bad_conversation", "no (user, assistant) pair")
    if not any(text.strip() for role, text in out if role == "assistant"):
        raise SampleError("empty_caption")
    return Conversation(out)


class TextEncoder:
    """Encodes conversations with the reference template.

    Args:
        cfg: the ``data.text`` section.
        tokenizer: a loaded tokenizer.
    """

    def __init__(self, cfg: TextConfig, tokenizer: TextTokenizer) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer

    def encode_batch(self, convs: Sequence[Conversation]) -> list[TextEncoding]:
        """Encode many conversations with one parallel tokenizer call."""
        segments: list[str] = []
        for conv in convs:
            for i, (_, text) in enumerate(conv.turns):
                # turn 0 follows the image pads, so .strip() of the reference only removes its
                # trailing whitespace; later turns are stripped on both sides.
                segments.append(text.rstrip() if i == 0 else text.strip())
        ids = self.tokenizer.encode_batch(segments) if segments else []
        out, k = [], 0
        end = self.tokenizer.end_ids
        for conv in convs:
            tok, lab = [], []
            for role, _ in conv.turns:
                seg = ids[k]
                k += 1
                tok += seg
                lab += seg if role == "assistant" else [IGNORE_INDEX] * len(seg)
            tok += end
            lab += end
            out.append(TextEncoding(np.asarray(tok, np.int32), np.asarray(lab, np.int32)))
        return out

    def encode_prompt(self, prompt: Optional[str] = None) -> np.ndarray:
        """Ids of a user prompt alone (for generation: image + prompt, no caption, no end)."""
        text = self.cfg.prompt if prompt is None else prompt
        return np.asarray(self.tokenizer.encode(text.rstrip()), np.int32)
