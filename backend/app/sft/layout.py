"""The run's sample order, and how each optimizer step's share of it is spread over processes and micro-batches.

The order belongs to the run, not to a process: an epoch is a sequence of *units*, the micro-batches of
`data.epoch_batches` at the run's `unit_size` (`batch_size` examples, or a pack of up to `batch_size ×
max_seq_length` tokens with `packing`), and optimizer step s of the epoch trains on units [s·U, (s+1)·U), U
being the run's `units_per_step`. A `Layout` cuts each unit into `split` pieces and deals piece t of the step to
process t % processes as its micro-batch t // processes. On any number of processes a step therefore sees the
same examples, and its loss (a token-weighted mean over all of them) and gradient are the same up to the order
of floating-point sums: that is what lets a run resume on another number of processes.

A process with fewer pieces than the others in a step (an epoch's short last step, an empty piece) trains on a
*masked copy* of an example instead, written as index -1-i: it adds no token, so it changes nothing, and every
process runs the same number of forward passes (which DDP and FSDP need).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.sft.config import SFTConfig

_LARGEST = 2**31 - 1
"""The largest count a saved layout may hold (a crafted one can't make the search for a cut take long)."""


@dataclass(frozen=True)
class Layout:
    """How one optimizer step's `units_per_step` units of `unit_size` are spread over `processes` processes."""

    processes: int
    units_per_step: int
    unit_size: int
    split: int = 1
    packed: bool = False

    @classmethod
    def from_config(cls, config: SFTConfig, processes: int) -> Layout:
        """The layout a config asks for on `processes` processes: one unit per micro-batch."""
        return cls(processes, config.gradient_accumulation_steps * processes, config.batch_size,
                   packed=config.packing)

    @classmethod
    def from_dict(cls, data: Any) -> Layout:
        """The layout saved in a checkpoint; `ValueError` naming the field when it is not one."""
        if not isinstance(data, dict):
            raise ValueError(f"field 'layout' must be an object, got {data!r}")
        for name in ("processes", "units_per_step", "unit_size", "split"):
            value = data.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= _LARGEST:
                raise ValueError(f"field 'layout.{name}' must be an integer from 1 to {_LARGEST}, got {value!r}")
        if not isinstance(data.get("packed"), bool):
            raise ValueError(f"field 'layout.packed' must be true or false, got {data.get('packed')!r}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"field 'layout' has unknown keys: {', '.join(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step on each process (in a full step)."""
        return math.ceil(self.units_per_step * self.split / self.processes)

    @property
    def micro_batch_size(self) -> int:
        """Examples per micro-batch, at most (with packing: the `batch_size` that sets its token budget)."""
        return math.ceil(self.unit_size / self.split)

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step over all processes (with packing: budgets of `max_seq_length` tokens)."""
        return self.units_per_step * self.unit_size

    def per_step(self) -> str:
        """What a step trains on: `16 examples`, or `2 packs of up to 4 × max_seq_length tokens`."""
        if self.packed:
            return f"{self.units_per_step} packs of up to {self.unit_size} × max_seq_length tokens"
        return f"{self.global_batch} examples"

    def describe(self) -> str:
        """`2 processes × batch_size 4 × gradient_accumulation_steps 2 = 16 examples per step`."""
        size = f"batch_size {self.micro_batch_size}"
        if self.split > 1:
            size += f" (micro-batches of {self.unit_size} cut in {self.split})"
        return (f"{count_processes(self.processes)} × {size} × gradient_accumulation_steps {self.accumulation} = "
                f"{self.per_step()} per step")

    def steps(self, units: Sequence, start: int = 0) -> list[tuple[int, int]]:
        """`(first, end)` unit ranges of the optimizer steps that train on `units[start:]` (the last may be short)."""
        return [(first, min(first + self.units_per_step, len(units)))
                for first in range(start, len(units), self.units_per_step)]

    def share(self, units: Sequence[Sequence[int]], rank: int) -> list[list[int]]:
        """Process `rank`'s micro-batches (example indices; -1-i: a masked copy of example i) of one step's units.

        Every process gets the same number of micro-batches for the same units.
        """
        pieces = [piece for unit in units for piece in _split(list(unit), self.split)]
        return deal(pieces, rank, self.processes)


def deal(batches: Sequence[list[int]], rank: int, processes: int) -> list[list[int]]:
    """Process `rank`'s share of `batches` dealt to `processes` processes in turn, topped up so that every process
    gets as many; an empty batch and a top-up are a masked copy of the first batch's first example (no token)."""
    filler = [-1 - batches[0][0]]
    mine = list(batches[rank::processes])
    mine += [[]] * (math.ceil(len(batches) / processes) - len(mine))
    return [batch or filler for batch in mine]


def keeping_global_batch(then: Layout, config: SFTConfig, processes: int) -> Layout | None:
    """The layout on `processes` processes that trains on the same units per step as `then`, with whole equal
    micro-batches of at most `config.batch_size` and the fewest cuts, or None when no integer choice does: the
    cut must divide the unit (`batch_size` examples, or the pack's token budget) and spread the step's pieces
    evenly over the processes."""
    step = processes // math.gcd(then.units_per_step, processes)  # cuts must be a multiple of this
    smallest = math.ceil(then.unit_size / config.batch_size)  # ... and give pieces no larger than batch_size
    cuts = sorted(d for i in range(1, math.isqrt(then.unit_size) + 1) if then.unit_size % i == 0
                  for d in (i, then.unit_size // i))
    split = next((cut for cut in cuts if cut % step == 0 and cut >= smallest), None)
    return dataclasses.replace(then, processes=processes, split=split) if split is not None else None


def count_processes(count: int) -> str:
    """`1 process`, `2 processes`."""
    return f"{count} process{'es' if count != 1 else ''}"


def _split(items: list[int], parts: int) -> list[list[int]]:
    """`items` cut into `parts` consecutive pieces whose sizes differ by at most one (some may be empty)."""
    size, extra = divmod(len(items), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(parts)]
