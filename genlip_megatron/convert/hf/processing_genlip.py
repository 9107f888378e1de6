"""GenLIP processor for Hugging Face ``transformers``: image processor + tokenizer + prompt.

Self-contained (copied into every export; ``AutoProcessor.from_pretrained(export,
trust_remote_code=True)``). It builds the captioning prompt GenLIP was trained with,
``[<|image_pad|> × N] prompt`` (no BOS, no vision start/end tokens, the prompt right-stripped,
the caption to be generated after it), left-padded across the batch so ``generate()`` appends
to every row::

    proc = AutoProcessor.from_pretrained(export, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
    inputs = proc(images=[img1, img2])                      # default prompt
    out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    captions = proc.batch_decode(out[:, inputs["input_ids"].shape[1]:])
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import transformers
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

DEFAULT_PROMPT = "Describe the image in detail."
IMAGE_TOKEN = "<|image_pad|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

__all__ = ["GenLIPProcessor"]


class GenLIPProcessor(ProcessorMixin):
    """``GenLIPImageProcessor`` + the training tokenizer + the caption prompt.

    Args:
        image_processor: a ``GenLIPImageProcessor``.
        tokenizer: the training tokenizer (holds ``<|image_pad|>``, ``<|im_end|>``).
        prompt: the default user prompt (the training ``data.text.prompt``).
    """

    if int(transformers.__version__.split(".")[0]) < 5:   # 4.x finds sub-processors this way
        attributes = ["image_processor", "tokenizer"]
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None, prompt: str = DEFAULT_PROMPT,
                 **kwargs: Any) -> None:
        self.prompt = prompt
        super().__init__(image_processor, tokenizer, **kwargs)

    def _token_id(self, token: str) -> Optional[int]:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        return None if tid is None or tid == self.tokenizer.unk_token_id else int(tid)

    @property
    def image_token_id(self) -> int:
        """Id of ``<|image_pad|>`` (marks image positions in ``input_ids``)."""
        tid = self._token_id(IMAGE_TOKEN)
        if tid is None:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token; use the training "
                             "tokenizer.json.")
        return tid

    @property
    def pad_token_id(self) -> int:
        """Left-padding id (the tokenizer's pad token, else ``<|endoftext|>``)."""
        if self.tokenizer.pad_token_id is not None:
            return int(self.tokenizer.pad_token_id)
        return self._token_id(PAD_TOKEN) or 0

    @property
    def eos_token_id(self) -> Optional[int]:
        """``<|im_end|>``: where a caption ends (pass to ``generate``)."""
        return self._token_id(IM_END)

    def __call__(self, images=None, text: Union[None, str, Sequence[str]] = None,
                 return_tensors: Optional[str] = "pt", **kwargs: Any) -> BatchFeature:
        """Captioning inputs: one row ``[<|image_pad|> × N_i] prompt_i`` per image.

        Args:
            images: one image or a list (see ``GenLIPImageProcessor``); None = text only.
            text: the prompt for every image (str), one per image (list), or None (the
                training prompt).
            kwargs: image processor overrides (e.g. ``image_size``).

        Returns:
            ``input_ids`` / ``attention_mask`` ``[B, L]`` (left-padded), ``pixel_values``
            ``[sum N_i, C*p*p]``, ``image_grid_thw`` ``[B, 3]`` (with ``layout="images"``:
            ``pixel_values`` ``[B, C, H, W]`` and no grid, which the model derives).
        """
        if images is None:
            texts = [text] if isinstance(text, str) else list(text or [])
            rows = [self.tokenizer.encode(t.rstrip(), add_special_tokens=False) for t in texts]
            return BatchFeature(self._pad(rows))
        vision = self.image_processor(images, **kwargs)
        grids = vision.get("image_grid_thw")
        if grids is None:   # layout="images": [B, C, H, W], one grid for all
            b, _, h, w = vision["pixel_values"].shape
            p = self.image_processor.patch_size
            grids = torch.tensor([[1, h // p, w // p]] * b)
        n = len(grids)
        prompts = [self.prompt if text is None else text] * n if text is None or \
            isinstance(text, str) else list(text)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} images; give one per image or a "
                             "single string.")
        img = self.image_token_id
        rows = []
        for (_, gh, gw), p in zip(torch.as_tensor(grids).tolist(), prompts):
            rows.append([img] * (gh * gw) +
                        self.tokenizer.encode(p.rstrip(), add_special_tokens=False))
        return BatchFeature({**self._pad(rows), **vision})

    def _pad(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, length - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, length - len(r):] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def batch_decode(self, *args, **kwargs):
        """Tokenizer ``batch_decode`` (``skip_special_tokens=True`` by default)."""
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        """Tokenizer ``decode`` (``skip_special_tokens=True`` by default)."""
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"]
