"""Attention for packed rows that never builds a dense mask: each example attends only to itself.

A packed row holds several examples one after another, with `position_ids` restarting at 0 for each. The stock
`sdpa` path turns that into a dense (T x T) block-diagonal mask and computes attention over the whole row, so a
row of eight 450-token examples costs as much attention as one 3,600-token sequence. Here attention costs only
sum(length^2), exactly, in one of two ways:

- on CUDA in half precision: one variable-length flash-attention call per layer over the whole row
  (`torch.nn.attention.varlen.varlen_attn`), given the examples' cumulative offsets (`cu_seq_lens_q`) and the
  longest example (`max_length_q`) that `PackedCollator` computed on the host, so the forward pass never waits
  for the GPU to say where the examples start;
- elsewhere (CPU, float32, attention dropout, a torch without `varlen_attn`): causal sdpa on each example
  separately, the exact reference.

Registered with transformers under the name `DOCUMENT_SDPA`; the trainer selects it for `packing: true` when no
`attn_implementation` is configured. Anything that is not a single packed row (batched rows, generation with a
cache) goes to the stock sdpa function unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

DOCUMENT_SDPA = "sft_document_sdpa"
_HALF = (torch.float16, torch.bfloat16)


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
    dtype = _compute_dtype(query)
    if packed_kernel(query.device, dtype, dropout) == "varlen":
        offsets, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
        if offsets is None or longest is None:  # a batch not made by PackedCollator: find the bounds (one sync)
            bounds = _example_bounds(position_ids)
            offsets = torch.tensor(bounds, dtype=torch.int32, device=query.device)
            longest = max(end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True))
        return varlen_causal_attention(query, key, value, offsets, int(longest), scaling, dtype), None
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = _example_bounds(position_ids)
    outputs = [
        F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                       dropout_p=dropout, is_causal=True, scale=scaling)
        for start, end in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def packed_kernel(device: torch.device, dtype: torch.dtype, dropout: float = 0.0) -> str:
    """`"varlen"` (one flash-attention call over the packed row) where it runs, else `"per_example"`."""
    usable = device.type == "cuda" and dtype in _HALF and dropout == 0.0 and _VARLEN_CAUSAL
    return "varlen" if usable else "per_example"


def varlen_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    offsets: torch.Tensor,
    longest: int,
    scaling: float | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Causal attention within each example of a packed row through `varlen_attn`: query/key/value
    [1, heads, T, head_dim] (grouped key/value heads allowed), `offsets` the examples' cumulative starts
    (int32, [examples + 1], on the row's device), `longest` the longest example; returns [1, T, heads, head_dim]."""
    head_dim = query.shape[-1]
    options: dict[str, Any] = {}
    if "window_size" in _VARLEN_PARAMETERS:
        options["window_size"] = (-1, 0)  # causal
    else:
        options["is_causal"] = True
    if scaling is not None and "scale" in _VARLEN_PARAMETERS:
        options["scale"] = scaling
    elif scaling is not None:  # no `scale` keyword: fold the scale into the query
        query = query * (scaling * head_dim**0.5)
    if "enable_gqa" in _VARLEN_PARAMETERS:
        options["enable_gqa"] = True
    else:
        groups = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q, k, v = (t[0].transpose(0, 1).to(dtype).contiguous() for t in (query, key, value))  # [T, heads, head_dim]
    offsets = offsets.to(device=q.device, dtype=torch.int32)
    return _VARLEN_ATTN(q, k, v, offsets, offsets, longest, longest, **options).unsqueeze(0)


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: autocast's on this device when it is on (as sdpa would), else the query's."""
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return query.dtype


def _load_varlen_attn() -> Callable[..., torch.Tensor] | None:
    """torch's variable-length flash attention, where this torch has it (2.9 and later)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


# Looked up once at import (not inside the forward pass, which torch.compile traces). The keywords of
# `varlen_attn` changed between torch releases (`is_causal` in the first; `window_size`, `scale` and `enable_gqa`
# later, and torch 2.11 takes `window_size` but not `enable_gqa`): each is passed only where this torch has it.
_VARLEN_ATTN = _load_varlen_attn()
_VARLEN_PARAMETERS = frozenset(inspect.signature(_VARLEN_ATTN).parameters) if _VARLEN_ATTN else frozenset()
_VARLEN_CAUSAL = bool(_VARLEN_PARAMETERS & {"window_size", "is_causal"})


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
