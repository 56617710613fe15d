"""Splitting and mixing: validation data split off without leaking copies (`split_train_val`), and the training
and validation data of a config, one source or several `datasets:` mixed by weight (`build_datasets`)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from typing import Any, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from app.sft.config import SFTConfig
from app.sft.data.loading import EVAL_SPLITS
from app.sft.data.tokenizing import tokenized_source
from app.sft.errors import ConfigError, DataError, DataWarning
from app.sft.tokenized import TokenizedDataset

_D = TypeVar("_D")


def split_train_val(dataset: _D, validation_split: float, seed: int) -> tuple[_D, _D | None]:
    """Split off a random `validation_split` fraction (at least one example) as validation data.

    Identical examples (the same tokens, or the same row) go to the same side, so copies in the data never
    leak into validation: groups of copies are taken in a seeded random order while they fit the fraction
    (without copies, exactly a seeded permutation's first examples). The same seed gives the same split; both
    parts keep the original order. Works on anything with `select` (`datasets.Dataset`, `TokenizedDataset`) or
    on a list. `validation_split` 0 returns `(dataset, None)`.
    """
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split}")
    if validation_split == 0.0:
        return dataset, None
    total = len(dataset)  # type: ignore[arg-type]
    num_val = max(1, round(total * validation_split))
    if num_val >= total:
        raise DataError(
            f"validation_split={validation_split} of {total} examples leaves nothing to train on; "
            "add data or lower validation_split"
        )
    groups = _copies(dataset)
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    picked: list[int] = []
    for group in order:
        if len(picked) + len(groups[group]) <= num_val:
            picked += groups[group]
            if len(picked) == num_val:
                break
    if not picked:  # every group is larger than the fraction: the smallest one
        picked = min((groups[group] for group in order), key=len)
    if len(picked) == total:
        raise DataError(f"validation_split={validation_split}: every example is the same, so none can be held out "
                        "without training on it too; add data or set validation_split: 0")
    held = set(picked)
    return _subset(dataset, [i for i in range(total) if i not in held]), _subset(dataset, sorted(picked))


def _copies(dataset: Any) -> list[list[int]]:
    """The indices of `dataset` grouped by identical content (tokens of a `TokenizedDataset`, else the row),
    groups in the order of their first example."""
    if isinstance(dataset, TokenizedDataset):
        keys: Iterable[Any] = map(tuple, dataset.input_ids)
    else:
        keys = (json.dumps(dataset[i], sort_keys=True, default=str) for i in range(len(dataset)))
    groups: dict[Any, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def _subset(dataset: _D, indices: list[int]) -> _D:
    if hasattr(dataset, "select"):
        return dataset.select(indices)
    return [dataset[i] for i in indices]  # type: ignore[index, return-value]


def build_datasets(
    config: SFTConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """Training and validation data as `config` describes them.

    Training data is `dataset_name`, or the `datasets:` sources mixed by weight. Validation data is
    `eval_dataset_name` when set, else a `validation_split` fraction of the tokenized training examples
    (deterministic for `seed`; for `datasets:`, of each source before weighting, so no example is in both),
    else None. Each tokenized source comes from the tokenized-data cache when `cache_tokenized` allows.
    """
    if config.dataset_name is None and not config.datasets:
        raise ConfigError(
            "dataset_name: required to load training data (or give the trainer a train_dataset)"
        )
    val: TokenizedDataset | None = None
    if config.datasets:
        train, val = _mixed_sources(config, tokenizer)
    else:
        train = tokenized_source(config, tokenizer, config.dataset_name, config.dataset_split)
    if config.eval_dataset_name is not None:
        return train, tokenized_source(config, tokenizer, config.eval_dataset_name, EVAL_SPLITS)
    if config.datasets:
        return train, val
    return _split_named(train, config.validation_split, config.seed, str(config.dataset_name))


def _split_named(
    data: TokenizedDataset, validation_split: float, seed: int, label: str
) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """`split_train_val`, its `DataError` naming the source (`label`) that cannot be split."""
    try:
        return split_train_val(data, validation_split, seed)
    except DataError as error:
        raise DataError(f"{label}: {error}") from None


def _mixed_sources(
    config: SFTConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """The `datasets:` sources tokenized, split (when validation comes from the training data) and mixed:
    each source's training part repeated or subsampled by its weight (seeded), then concatenated in order."""
    trains, vals = [], []
    for index, entry in enumerate(config.datasets):
        data = tokenized_source(config, tokenizer, entry.path, entry.split, entry, index)
        val = None
        if config.eval_dataset_name is None:
            data, val = _split_named(data, config.validation_split, config.seed + index,
                                     f"datasets[{index}] ({entry.path})")
        trains.append(data.select(_weighted_indices(len(data), entry.weight, config.seed + index)))
        if val is not None:
            vals.append(val)
    return _concatenate(trains), _concatenate(_unseen(vals, trains)) if vals else None


def _unseen(vals: list[TokenizedDataset], trains: list[TokenizedDataset]) -> list[TokenizedDataset]:
    """The validation parts without the examples that another source trains on (the same rows in two entries,
    or one file listed twice), with one warning counting them; a `DataError` when none is left."""
    trained = {tuple(ids) for part in trains for ids in part.input_ids}
    kept = [part.select(i for i, ids in enumerate(part.input_ids) if tuple(ids) not in trained) for part in vals]
    left_out = sum(map(len, vals)) - sum(map(len, kept))
    if left_out == sum(map(len, vals)):
        raise DataError("datasets: every validation example is also a training example of another entry (the same "
                        "rows in two sources); give validation data as eval_dataset_name, or set validation_split: 0")
    if left_out:
        warnings.warn(f"datasets: {left_out} validation examples are also training examples of another entry (the "
                      "same rows in two sources); they are left out of validation, which measures unseen data",
                      DataWarning, stacklevel=4)
    return [part for part in kept if len(part)]


def _weighted_indices(count: int, weight: float, seed: int) -> list[int]:
    """Indices for `weight` passes over `count` examples: every index `int(weight)` times, then a seeded random
    `weight % 1` fraction of them once more (in order); at least one example."""
    whole = int(weight)
    extra = round((weight - whole) * count)
    indices = list(range(count)) * whole
    if extra:
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
        indices += sorted(order[:extra])
    return indices or [0]


def _concatenate(parts: list[TokenizedDataset]) -> TokenizedDataset:
    """One dataset holding `parts` in order: every per-example list is joined, the counters are summed."""
    if len(parts) == 1:
        return parts[0]
    joined = TokenizedDataset.__new__(TokenizedDataset)
    for name, first in vars(parts[0]).items():
        values = [vars(part)[name] for part in parts]
        if isinstance(first, list):
            setattr(joined, name, [item for value in values for item in value])
        elif isinstance(first, int) and not isinstance(first, bool):
            setattr(joined, name, sum(values))
        else:
            setattr(joined, name, first)
    return joined
