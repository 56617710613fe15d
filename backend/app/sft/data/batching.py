"""Batching: `epoch_batches` plans each epoch's micro-batches deterministically from the seed; `PaddedCollator`
and `PackedCollator` (padding-free) turn a micro-batch into tensors; `with_label_positions` adds the trained
positions on the host; `MaskedCopies` serves the fully masked copies that even out processes' shares."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from app.sft.loss import IGNORE_INDEX, label_positions
from app.sft.tokenized import TokenizedDataset


def epoch_batches(
    lengths: Sequence[int],
    *,
    batch_size: int,
    epoch: int,
    seed: int,
    shuffle: bool = True,
    token_budget: int | None = None,
    drop_last: bool = False,
) -> list[list[int]]:
    """The micro-batches (lists of example indices) of one epoch; the same arguments give the same plan.

    The order is a permutation from `torch.Generator().manual_seed(seed + epoch)` (or the dataset order
    when `shuffle` is False). Without `token_budget`: consecutive groups of `batch_size` (`drop_last` drops
    a short last group). With `token_budget` (packing): examples in that order fill each micro-batch up to
    `token_budget` tokens in total; an example longer than the budget gets a micro-batch of its own.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if token_budget is not None and token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    if token_budget is not None and drop_last:
        raise ValueError("drop_last applies to fixed-size batches, not to token_budget packing")
    count = len(lengths)
    if shuffle:
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    else:
        order = list(range(count))
    if token_budget is None:
        batches = [order[i : i + batch_size] for i in range(0, count, batch_size)]
        if drop_last and batches and len(batches[-1]) < batch_size:
            batches.pop()
        return batches
    batches, current, used = [], [], 0
    for index in order:
        if current and used + lengths[index] > token_budget:
            batches.append(current)
            current, used = [], 0
        current.append(index)
        used += lengths[index]
    if current:
        batches.append(current)
    return batches


def _ids(value: Any) -> list[int]:
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


class PaddedCollator:
    """Examples -> right-padded `input_ids`, `attention_mask` and `labels` (-100 on padding) LongTensors."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        ids = [_ids(example["input_ids"]) for example in examples]
        labels = [_ids(example.get("labels", ids[i])) for i, example in enumerate(examples)]
        width = max(len(row) for row in ids)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(ids), width), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(ids), width), dtype=torch.long),
            "labels": torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long),
        }
        for row, (row_ids, row_labels) in enumerate(zip(ids, labels, strict=True)):
            mask = examples[row].get("attention_mask")  # a tokenized example may bring its own (0 = padding)
            batch["input_ids"][row, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
            batch["attention_mask"][row, : len(row_ids)] = 1 if mask is None else torch.tensor(_ids(mask))
            batch["labels"][row, : len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
        batch["labels"][batch["attention_mask"] == 0] = IGNORE_INDEX  # padding is never a label
        return batch


class PackedCollator:
    """Examples -> ONE unpadded row: `input_ids`, `position_ids` and `labels` of shape [1, T], plus where the
    examples start.

    Positions restart at 0 for each example and its first token's label is -100, so no example is trained
    to predict across a boundary; attention is kept within each example (`attention.document_causal_sdpa`).
    There is no `attention_mask`. The examples' cumulative offsets `cu_seq_lens_q`/`cu_seq_lens_k` (int32,
    [examples + 1]) and the longest example `max_length_q`/`max_length_k` (an int) are computed here, on the
    host, under the names transformers' flash-attention kwargs use, so the GPU never has to be asked for them.
    """

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        ids, positions, labels, offsets = [], [], [], [0]
        for example in examples:
            example_ids = _ids(example["input_ids"])
            if not example_ids:
                raise ValueError("cannot pack an empty example")
            example_labels = _ids(example.get("labels", example_ids))
            ids += example_ids
            positions += range(len(example_ids))
            labels += [IGNORE_INDEX, *example_labels[1:]]
            offsets.append(len(ids))
        cu_seq_lens = torch.tensor(offsets, dtype=torch.int32)
        longest = max(end - start for start, end in itertools.pairwise(offsets))
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": longest,
            "max_length_k": longest,
        }


def with_label_positions(examples: list[dict[str, Any]], collate: Callable[[list], dict[str, Any]]) -> dict[str, Any]:
    """`collate(examples)` plus the flat indices of its trained positions (`loss.label_positions`), computed in
    the data loader (its workers, if any) rather than by the GPU during the step."""
    batch = collate(examples)
    batch["label_positions"] = label_positions(batch["labels"])
    return batch


class MaskedCopies(TorchDataset):
    """A tokenized dataset where index -1-i is example i with every label masked (it adds no tokens)."""

    def __init__(self, data: TokenizedDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index >= 0:
            return self.data[index]
        example = dict(self.data[-1 - index])
        example["labels"] = [IGNORE_INDEX] * len(example["input_ids"])
        return example


def make_loader(data: TokenizedDataset, batches: Sequence[Sequence[int]], collate: Callable[[list], dict[str, Any]], *,
                seed: int, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over exactly `batches` (lists of example indices; -1-i: example i fully masked, see
    `MaskedCopies`), with its own random generator so that loading never moves the global random streams."""
    return DataLoader(MaskedCopies(data), batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed))
