"""What the host tells each attention processor per forward pass: which rows each adapter serves
in a block, with what k and keep-mask, and the fused output matrix to project them with."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from adapters.sparse_dictionary.config import SparseDictionaryConfig
from adapters.sparse_dictionary.layer import SparseDictionaryLayer

Observer = Callable[[int, torch.Tensor], None]
"""Called with (block, coefficients laid out (B, N, M)) on every adapted forward pass."""


@dataclass
class GroupPlan:
    """The rows of a batch that one adapter serves in one block, and what each row asked for."""

    layer: SparseDictionaryLayer
    config: SparseDictionaryConfig
    rows: torch.Tensor | slice | None
    """Row indices into the attention batch; a slice where they are consecutive, so reading and
    writing them are views rather than a gather and a scatter; ``None`` means every row."""
    k_per_row: tuple[int, ...] | None
    """Atoms kept per token for each row, or ``None`` where no row applies top-k."""
    keep: torch.Tensor | None
    """Per-row atom keep mask, shape (rows, M), or ``None`` where no row masks atoms."""
    output_weight: FusedOutputWeight | None = None
    """The output projection and D as one matrix (see ``fused_output_weight``), or ``None``: then
    A·V goes through ``to_out`` and (A·S)·D is added after."""
    offset: int = 0
    """Where, per head, this group's M/H coefficient channels start: after those of the adapters
    its rows compose before this one."""
    scales: torch.Tensor | None = None
    """Per-row scale of the update, shape (rows,), or ``None`` where every row's is 1."""


@dataclass(frozen=True)
class FusedOutputWeight:
    weight: torch.Tensor
    dictionary_state: tuple[int, int]
    """``dictionary_state(D)`` when ``weight`` was built; a D changed since must not use it."""

    def is_current(self, dictionary: torch.Tensor) -> bool:
        return dictionary_state(dictionary) == self.dictionary_state


def dictionary_state(dictionary: torch.Tensor) -> tuple[int, int]:
    """Changes whenever D's values may have: an in-place update bumps the version counter, and
    a move or cast gives it new storage."""
    return dictionary.data_ptr(), dictionary._version



class LayerPlanner(Protocol):
    """What a processor asks of the host (``AdapterHost``)."""

    @property
    def reference(self) -> bool:
        """Write the attention map out (the slow path the fused one is tested against)."""
        ...

    @property
    def observers(self) -> Sequence[Observer]:
        """Called on every adapted forward pass, e.g. to measure atom use."""
        ...

    def plan(self, block: int, batch_size: int, device: torch.device) -> list[GroupPlan]:
        """The row groups of this block for a batch of ``batch_size``; empty when no adapter is routed."""
        ...
