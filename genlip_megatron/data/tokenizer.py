"""Text tokenizer: a thin typed wrapper over a local HF ``tokenizers`` tokenizer.json.

Real runs use the Qwen3 tokenizer.json (``tools/fetch_qwen3_tokenizer.py``); tests and the CPU
demo train a tiny byte-level BPE with :func:`train_tiny_bpe`, which carries the same special
tokens so the chat template is identical. No hub access anywhere.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

IM_END = "<|im_end|>"
IMAGE_PAD = "<|image_pad|>"
END_OF_TEXT = "<|endoftext|>"
# Special tokens of the Qwen2-VL/Qwen3 family that the tiny BPE also defines (ids 0..5 there).
SPECIAL_TOKENS = (END_OF_TEXT, "<|im_start|>", IM_END, IMAGE_PAD, "<|vision_start|>",
                  "<|vision_end|>")


class TextTokenizer:
    """A loaded tokenizer plus the ids the GenLIP template needs.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` holding at least ``<|im_end|>``,
            ``<|image_pad|>`` and ``<|endoftext|>`` as added tokens.
        path: where it was loaded from (for messages).
    """

    def __init__(self, tokenizer: Tokenizer, path: str = "<memory>") -> None:
        self._tok = tokenizer
        self.path = path
        missing = [t for t in (IM_END, IMAGE_PAD, END_OF_TEXT) if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer {path} lacks the special tokens {missing}; use the "
                             "Qwen3 tokenizer.json or one made by train_tiny_bpe().")
        self.im_end_id: int = tokenizer.token_to_id(IM_END)
        self.image_pad_id: int = tokenizer.token_to_id(IMAGE_PAD)
        self.endoftext_id: int = tokenizer.token_to_id(END_OF_TEXT)
        # "<|im_end|>\n": appended to every sample and trained on (Qwen3: [151645, 198]).
        self.end_ids: list[int] = self.encode(IM_END + "\n")

    @property
    def vocab_size(self) -> int:
        """Number of token ids including added tokens (Qwen3: 151669; the model pads to 151936)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no BOS/EOS added (special tokens in the text are kept)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` for many texts at once (parallel in Rust)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped unless ``skip_special_tokens`` is False."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry, or None."""
        return self._tok.token_to_id(token)

    def __getstate__(self) -> dict:
        # tokenizers.Tokenizer pickles, but a JSON string is smaller and version-proof.
        return {"json": self._tok.to_str(), "path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(Tokenizer.from_str(state["json"]), state["path"])


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """Load a local ``tokenizer.json`` (no network).

    Raises:
        FileNotFoundError: with the command that fetches the Qwen3 tokenizer.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist (data.text.tokenizer_path); "
                                "run `python tools/fetch_qwen3_tokenizer.py` for Qwen3 or "
                                "`python tools/make_demo_data.py` for the demo tokenizer.")
    return TextTokenizer(Tokenizer.from_file(str(path)), str(path))


def train_tiny_bpe(texts: Iterable[str], vocab_size: int, out_path: str | Path | None = None,
                   *, full_byte_alphabet: bool = False) -> TextTokenizer:
    """Train a small byte-level BPE (Qwen-style pre-tokenisation) with the GenLIP special tokens.

    Args:
        texts: training corpus (captions, prompts).
        vocab_size: target size including the special tokens (ids 0..5, <|endoftext|> = 0).
        out_path: where to write tokenizer.json (parent directories are created); None skips.
        full_byte_alphabet: include all 256 byte symbols so any text encodes (needs
            vocab_size ≥ 262); otherwise only characters seen in ``texts`` are covered and unseen
            characters are dropped when encoding.

    Returns:
        The trained tokenizer.
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if full_byte_alphabet else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=alphabet, show_progress=False)
    # "\n" follows <|im_end|> in every sample, so it must be in the alphabet.
    tok.train_from_iterator([*texts, "\n"], trainer=trainer)
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(out_path))
        logger.info("wrote tiny BPE tokenizer (%d ids) to %s", tok.get_vocab_size(), out_path)
    return TextTokenizer(tok, str(out_path) if out_path else "<memory>")
