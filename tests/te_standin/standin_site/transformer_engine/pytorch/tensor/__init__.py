"""Quantized tensor classes: the stand-in never creates one (GEMMs stay high precision)."""

import torch


class QuantizedTensor(torch.Tensor):
    """Base class of TE's FP8/FP4 tensors; ``isinstance`` checks in megatron see none."""


class Float8Tensor(QuantizedTensor):
    """Per-tensor-scaled FP8 tensor (name only)."""
