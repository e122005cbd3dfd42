"""Pooling of a decoder's output for sequence tasks (the ``pooled`` argument)."""

from __future__ import annotations

import torch
from torch import Tensor


def last_token(hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
    """Each sequence's row at its last position whose ``attention_mask`` is not 0, whether the
    batch is padded on the right or on the left: how a decoder's ``*ForSequenceClassification``
    in Hugging Face pools (position 0 for a sequence with no such position, as there). No host
    sync; gradients flow back to the rows taken.

    Args:
        hidden_states: [B, S, D].
        attention_mask: [B, S], any dtype; 0 marks padding.

    Returns:
        [B, D], in the dtype of ``hidden_states``.
    """
    if not isinstance(hidden_states, Tensor) or hidden_states.dim() != 3:
        raise ValueError(f"last_token: hidden_states must be [B, S, D], got {getattr(hidden_states, 'shape', None)}")
    if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(f"last_token: attention_mask must be [B, S] = {tuple(hidden_states.shape[:2])}, "
                         f"got {getattr(attention_mask, 'shape', None)}")  # fmt: skip
    if attention_mask.device != hidden_states.device:
        raise ValueError(f"last_token: attention_mask is on {attention_mask.device}, hidden_states on "
                         f"{hidden_states.device}")  # fmt: skip
    batch, seq_len = attention_mask.shape
    positions = torch.arange(seq_len, device=attention_mask.device, dtype=torch.int32)
    last = (positions * (attention_mask != 0)).argmax(dim=-1)
    return hidden_states[torch.arange(batch, device=hidden_states.device), last]
