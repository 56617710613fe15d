"""Token-summed causal-LM loss, computed only where there are labels, without full-vocabulary logits.

In supervised fine-tuning most prompt tokens carry no label (-100), yet a stock forward pass multiplies every
position's hidden state by the full output matrix (vocabulary x hidden: 49k-128k rows), upcasts all those logits
to float32, and keeps them, their log-softmax and its gradient alive until the backward pass. Here:

- the output layer sees the labelled positions only (the model code around it is untouched);
- when that layer is a plain `nn.Linear` whose output the model returns as is (Llama, Qwen, Mistral, SmolLM...),
  it is replaced for this one forward pass by `linear_cross_entropy_sum`: logits, float32 cross-entropy and
  its gradients, a chunk of positions at a time, so the logits of a chunk are freed before the next one is
  computed and the backward pass only scales gradients already computed;
- otherwise (a LoRA-adapted or quantised head, a model that rescales or soft-caps its logits) the layer runs
  as usual on the labelled positions and the cross-entropy is taken in float32 chunks.

Returning the *sum* and the token count (not a mean) lets callers weight micro-batches and processes exactly:
the loss of a step is sum(loss_sum) / sum(n_tokens) over everything that step saw.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
LOSS_CHUNK_TOKENS = 2048  # positions whose float32 logits are held at once
# What the model's forward takes from a batch; the offsets are those of packed rows (`attention.py`).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                "max_length_k")

# Output layers whose model returns the layer's output untouched (True), or does something to it (False).
_HEAD_OUTPUT_RETURNED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (into `labels.flatten()`, int64) of the positions whose *next* label is trained: the positions
    whose logits the loss scores. Computed on the host by the trainer's data loader, so that the step never
    waits for the GPU to count them (a boolean selection on the GPU would)."""
    width = labels.shape[-1]
    rows, columns = torch.nonzero(labels.reshape(-1, width)[:, 1:] != IGNORE_INDEX, as_tuple=True)
    return rows * width + columns


def causal_lm_loss_sum(model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies over labelled positions, and how many positions that is.

    `batch` holds `input_ids` and `labels` (same shape, -100 where nothing is trained), plus optionally
    `attention_mask` (padded batches) or `position_ids` and the examples' offsets (packed rows, see
    `PackedCollator`), and `label_positions` (`label_positions(labels)`, computed here when absent). Labels are
    shifted as Hugging Face causal LMs do: the logits at position t are scored against `labels[t + 1]`.

    Works with Hugging Face causal LMs (also PEFT-wrapped or inside DDP/FSDP wrappers) and with any module whose
    forward takes `input_ids`/`attention_mask` and returns logits (a tensor or an object with `.logits`).
    """
    labels = batch["labels"]
    positions = batch.get("label_positions")
    positions = label_positions(labels) if positions is None else positions.to(labels.device)
    targets = labels.flatten()[positions + 1]
    n_tokens = torch.full((), positions.numel(), dtype=torch.long, device=labels.device)
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}

    head = _output_layer(model)
    if head is None:
        output = model(**inputs)
        logits = output if isinstance(output, torch.Tensor) else output.logits
        return _chunked_cross_entropy_sum(logits.flatten(0, 1)[positions], targets), n_tokens
    if _is_plain_linear(head) and _HEAD_OUTPUT_RETURNED.get(head, True):
        loss_sum = _fused_head_loss_sum(model, head, inputs, positions, targets)
        if loss_sum is not None:
            return loss_sum, n_tokens

    def keep_labelled_positions(_module: nn.Module, args: tuple) -> tuple:
        return (args[0].flatten(0, 1)[positions].unsqueeze(0),) + tuple(args[1:])

    handle = head.register_forward_pre_hook(keep_labelled_positions)
    try:
        output = model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return _chunked_cross_entropy_sum(output.logits.flatten(0, 1), targets), n_tokens


def evaluation_totals(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """(summed loss, labelled tokens) over `batches` (already on the model's device), as a float32 tensor of 2,
    computed in eval mode without gradients; every module's train/eval mode is put back afterwards."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    totals = torch.zeros(2, device=next(model.parameters()).device)
    try:
        with torch.no_grad():
            for batch in batches:
                with autocast():
                    loss_sum, n_tokens = causal_lm_loss_sum(model, batch)
                totals += torch.stack([loss_sum.float(), n_tokens.float()])
    finally:
        for module, training in modes.items():
            module.train(training)
    return totals


def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """sum_i cross_entropy(hidden[i] @ weight.T + bias, targets[i]), never holding every row's logits at once.

    `hidden` is [N, H], `weight` [V, H], `targets` [N] (no ignored entries). The matrix products run in the
    autocast dtype when autocast is on (as `F.linear` would), the softmax in float32. When gradients are needed
    they are computed chunk by chunk in this forward pass, so the backward pass only scales them.
    """
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if needs_grad:
        return _LinearCrossEntropySum.apply(hidden, weight, bias, targets, dtype)
    return _linear_cross_entropy_chunks(hidden, weight, bias, targets, dtype, (False, False, False))[0]


class _LinearCrossEntropySum(torch.autograd.Function):
    """Autograd wrapper of `_linear_cross_entropy_chunks`: gradients computed forward, scaled backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, dtype):  # noqa: ANN001, ANN205 (autograd signature)
        wanted = tuple(ctx.needs_input_grad[:3])
        loss, grads = _linear_cross_entropy_chunks(hidden, weight, bias, targets, dtype, wanted)
        ctx.save_for_backward(*grads)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: ANN001, ANN205
        grads = [
            None if grad is None else (grad * grad_loss).to(dtype)
            for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True)
        ]
        return *grads, None, None


def _linear_cross_entropy_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    dtype: torch.dtype,
    wanted: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """The loss sum and the gradients `wanted` for (hidden, weight, bias), None for the others; weight and bias
    gradients in float32 so the chunks accumulate without rounding. Each chunk's logits are upcast, turned into
    the softmax in place, and freed before the next chunk. The products run in `dtype`, whatever autocast says."""
    x, w = hidden.to(dtype), weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    want_hidden, want_weight, want_bias = wanted
    loss = hidden.new_zeros((), dtype=torch.float32)
    grad_hidden = torch.empty_like(x) if want_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
    grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, x.shape[0], LOSS_CHUNK_TOKENS):
            rows, chunk_targets = x[start : start + LOSS_CHUNK_TOKENS], targets[start : start + LOSS_CHUNK_TOKENS]
            logits = F.linear(rows, w, b).float()
            target_logits = logits.gather(1, chunk_targets[:, None])
            row_max = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(row_max).exp_()  # in place: `logits` is not used again
            row_sum = probs.sum(dim=1, keepdim=True)
            loss += (row_max + row_sum.log() - target_logits).sum()
            if not any(wanted):
                continue
            probs.div_(row_sum)
            probs[torch.arange(len(chunk_targets), device=probs.device), chunk_targets] -= 1  # d loss / d logits
            grad_logits = probs.to(dtype)
            if grad_hidden is not None:
                torch.mm(grad_logits, w, out=grad_hidden[start : start + LOSS_CHUNK_TOKENS])
            if grad_weight is not None:
                grad_weight += grad_logits.T @ rows
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
    return loss, (grad_hidden, grad_weight, grad_bias)


def _fused_head_loss_sum(
    model: nn.Module,
    head: nn.Linear,
    inputs: dict[str, Any],
    positions: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor | None:
    """Run `model` with its output layer replaced by `linear_cross_entropy_sum` on the labelled positions, and
    return the loss sum; None (with the random state put back, as if nothing had run) when the model does not
    return the layer's output as is, which is then remembered so that the layer runs as usual from then on."""
    first_call = head not in _HEAD_OUTPUT_RETURNED
    restore_rng = _rng_restorer(positions.device) if first_call else None
    returned: list[tuple[torch.Tensor, int]] = []

    def labelled_loss(hidden: torch.Tensor) -> torch.Tensor:
        loss = linear_cross_entropy_sum(hidden.flatten(0, 1)[positions], head.weight, head.bias, targets)
        returned.append((loss, loss._version))
        return loss

    head.forward = labelled_loss  # this instance only, for this one call
    try:
        output = model(**inputs, use_cache=False)
    finally:
        del head.forward
    logits = getattr(output, "logits", None)
    untouched = len(returned) == 1 and logits is returned[0][0] and logits._version == returned[0][1]
    _HEAD_OUTPUT_RETURNED[head] = untouched
    if untouched:
        return logits
    if restore_rng is not None:
        restore_rng()
    return None


def _chunked_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Float32 cross-entropy summed over rows of `logits` [N, V], a chunk of rows at a time. `split` (not
    slicing) so the backward pass joins the chunks' gradients once instead of zero-filling one per chunk."""
    loss_sum = logits.new_zeros((), dtype=torch.float32)
    for chunk, chunk_targets in zip(
        logits.split(LOSS_CHUNK_TOKENS), targets.split(LOSS_CHUNK_TOKENS), strict=True
    ):
        loss_sum = loss_sum + F.cross_entropy(chunk.float(), chunk_targets, reduction="sum")
    return loss_sum


def _is_plain_linear(module: nn.Module) -> bool:
    """An `nn.Linear` (or a wrapper class, such as FSDP2's, that keeps its forward) with a floating weight."""
    return (
        isinstance(module, nn.Linear)
        and type(module).forward is nn.Linear.forward
        and module.weight.is_floating_point()
    )


def _rng_restorer(device: torch.device) -> Callable[[], None]:
    """A function that puts back the CPU and `device`'s random state as they are now (dropout draws from them)."""
    cpu_state = torch.get_rng_state()
    device_module = None if device.type == "cpu" else torch.get_device_module(device.type)
    device_state = None if device_module is None else device_module.get_rng_state(device)

    def restore() -> None:
        torch.set_rng_state(cpu_state)
        if device_module is not None:
            device_module.set_rng_state(device_state, device)

    return restore


def _output_layer(model: nn.Module) -> nn.Module | None:
    """The language-model head of a Hugging Face causal LM (through DDP/PEFT wrappers), else None."""
    inner = getattr(model, "module", model)  # DistributedDataParallel keeps the model in `.module`
    get_head = getattr(inner, "get_output_embeddings", None)
    if get_head is None:
        return None
    head = get_head()
    return head if isinstance(head, nn.Module) else None
