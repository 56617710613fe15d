"""Token-summed causal-LM loss, computed only where there are labels.

In supervised fine-tuning most prompt tokens carry no label (-100), yet a stock forward pass multiplies every
position's hidden state by the full output matrix (vocabulary x hidden: 49k-128k rows). `causal_lm_loss_sum`
asks the model's own output layer for the labelled positions only, by selecting them in a forward pre-hook on
that layer, so the model code (norms, soft-capping, distributed wrappers) is untouched while the logits of
unlabelled positions are never computed. The cross-entropy is then taken in float32, a chunk of positions at a
time, so the upcast never holds every position's full-vocabulary logits at once.

Returning the *sum* and the token count (not a mean) lets callers weight micro-batches and processes exactly:
the loss of a step is sum(loss_sum) / sum(n_tokens) over everything that step saw.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
LOSS_CHUNK_TOKENS = 2048  # positions whose float32 logits are held at once


def count_label_tokens(labels: torch.Tensor) -> int:
    """Number of positions trained on in a batch: labels after the causal shift that are not ignored."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def causal_lm_loss_sum(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies over labelled positions, and how many positions that is.

    `batch` holds `input_ids` and `labels` (same shape, -100 where nothing is trained), plus optionally
    `attention_mask` (padded batches) or `position_ids` (packed rows). Labels are shifted as Hugging Face causal
    LMs do: the logits at position t are scored against `labels[t + 1]`.

    Works with Hugging Face causal LMs (also PEFT-wrapped or inside DDP/FSDP wrappers) and with any module whose
    forward takes `input_ids`/`attention_mask` and returns logits (a tensor or an object with `.logits`).
    """
    labels = batch["labels"]
    targets = labels[..., 1:]
    keep = targets != IGNORE_INDEX
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}

    head = _output_layer(model)
    if head is None:
        output = model(**inputs)
        logits = output if isinstance(output, torch.Tensor) else output.logits
        selected = logits[..., :-1, :][keep]
    else:
        def keep_labelled_positions(_module: nn.Module, args: tuple) -> tuple:
            hidden = args[0]
            return (hidden[:, :-1][keep].unsqueeze(0),) + tuple(args[1:])

        handle = head.register_forward_pre_hook(keep_labelled_positions)
        try:
            output = model(**inputs, use_cache=False)
        finally:
            handle.remove()
        selected = output.logits.flatten(0, 1)  # a view: its backward allocates nothing

    # `split` (not slicing) so the backward pass joins the chunks' gradients once instead of zero-filling a
    # full-size gradient per chunk.
    loss_sum = selected.new_zeros((), dtype=torch.float32)
    for logits, chunk_targets in zip(selected.split(LOSS_CHUNK_TOKENS), targets[keep].split(LOSS_CHUNK_TOKENS),
                                     strict=True):
        loss_sum = loss_sum + F.cross_entropy(logits.float(), chunk_targets, reduction="sum")
    return loss_sum, keep.sum()


def _output_layer(model: nn.Module) -> nn.Module | None:
    """The language-model head of a Hugging Face causal LM (through DDP/PEFT wrappers), else None."""
    inner = getattr(model, "module", model)  # DistributedDataParallel keeps the model in `.module`
    get_head = getattr(inner, "get_output_embeddings", None)
    if get_head is None:
        return None
    head = get_head()
    return head if isinstance(head, nn.Module) else None
