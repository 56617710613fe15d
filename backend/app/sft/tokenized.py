"""Tokenized data as plain values: the examples (`TokenizedDataset`) and what tokenization saw of every source
row (`DataFacts`), which the data pipeline makes, the tokenized-data cache stores and the audit reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset as TorchDataset

from app.sft.loss import IGNORE_INDEX


@dataclass
class BoundaryToken:
    """A token whose characters are partly trained text and partly untrained text (a prompt/response seam).

    The mask cannot be right for it: trained, it teaches a prompt character; untrained, it skips a reply
    character. Typical cause: a template marker without a trailing newline or space that the tokenizer joins to
    the first word of the reply.
    """

    position: int
    """The token's index in the example."""
    token_id: int
    text: str
    """The characters of the rendered text the token covers."""
    trained: bool
    """How the mask labelled it."""


_FACT_ARRAYS = {"length": np.int64, "response": np.int64, "trained": np.int64, "untrained_end": bool,
                "double_bos": bool, "replies": np.int64, "empty_replies": np.int64}
"""DataFacts' array fields and their dtypes."""


@dataclass
class DataFacts:
    """What tokenization saw of every source row (dropped ones too), for the data audit (`app.sft.audit`).

    Arrays have one entry per source row, in order. Lengths are counted before truncation to
    `max_seq_length`; trained tokens, like the loss, leave out each row's first position.
    """

    source: str
    max_seq_length: int
    length: np.ndarray
    """Tokens of the whole rendered row (0 for a conversation with no assistant reply)."""
    response: np.ndarray
    """Trained tokens of the whole row."""
    trained: np.ndarray
    """Trained tokens kept within `max_seq_length`."""
    dropped: list[str]
    """"" (kept), "no_reply" (no assistant reply) or "nothing_to_train" (no trained token left)."""
    untrained_end: np.ndarray
    """The token that ends a reply (EOS / end of turn) carries no label, or no reply ends with one."""
    double_bos: np.ndarray
    """The row starts with two BOS tokens."""
    boundary: dict[int, BoundaryToken]
    """Rows (0-based) with a token spanning trained and untrained text: the first such token."""
    replies: np.ndarray
    """Assistant replies of the row (1 for a completion row's text; 0 when pre-tokenized)."""
    empty_replies: np.ndarray
    """Of those, replies that are empty or only whitespace."""
    special_text: dict[int, str]
    """Rows (0-based) whose text holds a special token of the tokenizer typed as text: the first one."""
    templated: bool = False
    """Some row was rendered by a prompt template (not pre-tokenized, not plain text): the saved tokenizer's chat
    template must then match that template."""

    def __eq__(self, other: object) -> bool:  # numpy arrays compare element-wise: compare the JSON forms
        return isinstance(other, DataFacts) and self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]

    def to_json(self) -> dict[str, Any]:
        """The facts as JSON types (the tokenized-data cache stores them so)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in _FACT_ARRAYS:
            data[name] = data[name].tolist()
        data["boundary"] = {str(row): dataclasses.asdict(token) for row, token in self.boundary.items()}
        data["special_text"] = {str(row): text for row, text in self.special_text.items()}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DataFacts:
        """The facts `to_json` returned."""
        values = dict(data)
        for name, dtype in _FACT_ARRAYS.items():
            values[name] = np.array(values[name], dtype=dtype)
        values["boundary"] = {int(row): BoundaryToken(**token) for row, token in values["boundary"].items()}
        values["special_text"] = {int(row): text for row, text in values["special_text"].items()}
        return cls(**values)

    @classmethod
    def of_examples(
        cls, input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], source: str = "dataset"
    ) -> DataFacts:
        """Facts of already tokenized examples (nothing known about truncation or templates)."""
        trained = np.array([sum(label != IGNORE_INDEX for label in row[1:]) for row in labels], dtype=np.int64)
        count = len(input_ids)
        return cls(
            source=source,
            max_seq_length=max((len(ids) for ids in input_ids), default=0),
            length=np.array([len(ids) for ids in input_ids], dtype=np.int64),
            response=trained,
            trained=trained.copy(),
            dropped=[""] * count,
            untrained_end=np.zeros(count, dtype=bool),
            double_bos=np.zeros(count, dtype=bool),
            boundary={},
            replies=np.zeros(count, dtype=np.int64),
            empty_replies=np.zeros(count, dtype=np.int64),
            special_text={},
        )


class TokenizedDataset(TorchDataset):
    """Tokenized examples, `{"input_ids": [...], "labels": [...]}`, with their lengths and data stats.

    `num_dropped`/`num_truncated` count the examples of the source data that were dropped (nothing left to
    train on) or truncated when it was tokenized; subsets made with `select` keep the source's counts, and
    its `facts` (per source row, see `DataFacts`); `rows` gives each example's source row (0-based).
    """

    def __init__(
        self,
        input_ids: list[list[int]],
        labels: list[list[int]],
        *,
        num_dropped: int = 0,
        num_truncated: int = 0,
        facts: DataFacts | None = None,
        rows: list[int] | None = None,
    ) -> None:
        if len(input_ids) != len(labels):
            raise ValueError(f"{len(input_ids)} input_ids lists but {len(labels)} labels lists")
        self.input_ids = input_ids
        self.labels = labels
        self.lengths: list[int] = [len(ids) for ids in input_ids]
        self.num_dropped = num_dropped
        self.num_truncated = num_truncated
        self.facts = facts if facts is not None else DataFacts.of_examples(input_ids, labels)
        self.rows = rows if rows is not None else list(range(len(input_ids)))

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}

    def select(self, indices: Iterable[int]) -> TokenizedDataset:
        """The examples at `indices`, in that order."""
        picked = list(indices)
        return TokenizedDataset(
            [self.input_ids[i] for i in picked],
            [self.labels[i] for i in picked],
            num_dropped=self.num_dropped,
            num_truncated=self.num_truncated,
            facts=self.facts,
            rows=[self.rows[i] for i in picked],
        )
