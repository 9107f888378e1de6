"""Chat template: json → conversation → ids/labels exactly as the reference encodes them."""

import json

import numpy as np
import pytest

from genlip_megatron.config.data import TextConfig
from genlip_megatron.data.template import SampleError, TextEncoder, conversation_from_json, \
    parse_json_bytes

from .test_tokenizer import CAPTION, CAPTION_IDS, PROMPT_IDS

M = -100


def test_caption_sample_qwen3(qwen3_tok):
    enc = TextEncoder(TextConfig(), qwen3_tok)
    conv = conversation_from_json(parse_json_bytes(json.dumps({"caption": CAPTION}).encode()),
                                  "caption")
    (e,) = enc.encode_batch([conv])
    # [prompt (masked)] [caption] [<|im_end|> \n] ; the image pads are added by the packer
    assert e.ids.tolist() == PROMPT_IDS + CAPTION_IDS + [151645, 198]
    assert e.labels.tolist() == [M] * 6 + CAPTION_IDS + [151645, 198]


def test_caption_is_stripped_and_prompt_configurable(qwen3_tok):
    enc = TextEncoder(TextConfig(prompt="Describe the image in detail.   "), qwen3_tok)
    (e,) = enc.encode_batch([conversation_from_json({"caption": f"  {CAPTION}\n"}, "caption",
                                                    enc.cfg.prompt)])
    assert e.ids.tolist() == PROMPT_IDS + CAPTION_IDS + [151645, 198]


def test_conversations_every_assistant_turn_labelled(qwen3_tok):
    tok = qwen3_tok
    meta = {"conversation": [  # the reference README's spelling
        {"from": "human", "value": "<image>\nDescribe this image in detail."},
        {"from": "gpt", "value": "A red circle."},
        {"from": "human", "value": "What is the first shape?"},
        {"from": "gpt", "value": "a red circle."}]}
    conv = conversation_from_json(parse_json_bytes(json.dumps(meta).encode()), "conversations")
    (e,) = TextEncoder(TextConfig(), tok).encode_batch([conv])
    u1 = tok.encode("\nDescribe this image in detail.")  # after the image pads: only rstrip
    a1, u2, a2 = tok.encode("A red circle."), tok.encode("What is the first shape?"), \
        tok.encode("a red circle.")
    assert u1[0] == 198 and e.ids.tolist() == u1 + a1 + u2 + a2 + [151645, 198]
    assert e.labels.tolist() == [M] * len(u1) + a1 + [M] * len(u2) + a2 + [151645, 198]


@pytest.mark.parametrize("turns", [
    [{"from": "user", "value": "<image>Hi"}, {"from": "assistant", "value": "A cat."}],
    [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "A cat."}],
    [{"human": "<image>Hi"}, {"gpt": "A cat."}],
    [{"from": "gpt", "value": "leading non-user turn is dropped"},
     {"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "A cat."}],
])
def test_conversation_layouts(turns):
    conv = conversation_from_json({"conversations": turns}, "conversations")
    assert conv.turns == [("user", "Hi"), ("assistant", "A cat.")]


def test_conversations_fall_back_to_caption():
    conv = conversation_from_json({"caption": "A cat."}, "conversations", "P")
    assert conv.turns == [("user", "P"), ("assistant", "A cat.")]


@pytest.mark.parametrize("raw, fmt, reason", [
    (None, "caption", "missing_json"),
    (b"{not json", "caption", "bad_json"),
    (b"\xff\xfe", "caption", "bad_json"),
    (b"[1, 2]", "caption", "bad_json"),
    (b'{"caption": "  "}', "caption", "empty_caption"),
    (b'{"caption": 3}', "caption", "bad_json"),
    (b'{"text": "x"}', "caption", "missing_text"),
    (b'{"conversations": "x"}', "conversations", "bad_conversation"),
    (b'{"conversations": [{"from": "bot", "value": "x"}]}', "conversations", "bad_conversation"),
    (b'{"conversations": [{"from": "human", "value": "x"}]}', "conversations",
     "bad_conversation"),
    (b'{"conversations": [{"from": "human", "value": null}, {"from": "gpt", "value": "x"}]}',
     "conversations", "bad_conversation"),
    (b'{"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": " "}]}',
     "conversations", "empty_caption"),
])
def test_bad_json_reasons(raw, fmt, reason):
    with pytest.raises(SampleError) as info:
        conversation_from_json(parse_json_bytes(raw), fmt)
    assert info.value.reason == reason


def test_encode_prompt_only(tiny_tok):
    enc = TextEncoder(TextConfig(), tiny_tok)
    assert enc.encode_prompt().tolist() == tiny_tok.encode("Describe the image in detail.")
    assert enc.encode_prompt().dtype == np.int32
