"""Attention for packed rows that never builds a dense mask: causal sdpa run on each example separately.

A packed row holds several examples one after another, with `position_ids` restarting at 0 for each. The stock
`sdpa` path turns that into a dense (T x T) block-diagonal mask and computes attention over the whole row, so a
row of eight 450-token examples costs as much attention as one 3,600-token sequence. Here each example's
queries attend to its own keys with `is_causal=True`, which is exact and costs only sum(length^2).

Registered with transformers under the name `DOCUMENT_SDPA`; the trainer selects it for `packing: true` when no
`attn_implementation` is configured. Anything that is not a single packed row (batched rows, generation with a
cache) goes to the stock sdpa function unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

DOCUMENT_SDPA = "sft_document_sdpa"


def document_causal_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention inside each example of a packed row (query/key/value: [1, heads, T, head_dim])."""
    packed_row = (
        position_ids is not None and query.shape[0] == 1 and attention_mask is None
        and query.shape[2] == key.shape[2] == position_ids.shape[-1]
    )
    if not packed_row:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = _example_bounds(position_ids)
    outputs = [
        F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                       dropout_p=dropout, is_causal=True, scale=scaling)
        for start, end in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


_bounds_cache: tuple[torch.Tensor | None, list[int]] = (None, [])


def _example_bounds(position_ids: torch.Tensor) -> list[int]:
    """Start offsets of the examples in a packed row, plus its length; computed once per forward pass (every
    layer receives the same `position_ids` tensor)."""
    global _bounds_cache
    if _bounds_cache[0] is not position_ids:
        starts = torch.nonzero(position_ids[0] == 0).flatten().tolist()
        _bounds_cache = (position_ids, [*starts, position_ids.shape[-1]])
    return _bounds_cache[1]


def _mask_unless_unpadded(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """No mask at all for rows without padding (packed rows, plain sequences); sdpa's mask otherwise."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_document_attention() -> str:
    """Make `DOCUMENT_SDPA` a valid `attn_implementation` (idempotent); returns the name."""
    AttentionInterface.register(DOCUMENT_SDPA, document_causal_sdpa)
    AttentionMaskInterface.register(DOCUMENT_SDPA, _mask_unless_unpadded)
    return DOCUMENT_SDPA
