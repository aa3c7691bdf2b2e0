"""An adapter on disk: the engine's folder plus the ranked atom importance the API serves.

Used by the workers after training and by the gateway when it validates an import.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters import AdapterFormatError, SparseDictionaryAdapter, load_adapter, save_adapter
from service.storage import ADAPTER_SUBDIR, write_atoms
from service.workers_registry import BaseShape


@dataclass(frozen=True)
class AdapterSummary:
    config: dict[str, Any]
    layers: list[int]
    importance: dict[int, list[float]]


def summarize(adapter: SparseDictionaryAdapter) -> AdapterSummary:
    return AdapterSummary(
        config=adapter.config.to_dict(),
        layers=adapter.blocks,
        importance={block: scores.float().cpu().tolist() for block, scores in adapter.importance.items()},
    )


def write_extras(adapter_dir: Path, summary: AdapterSummary) -> None:
    if summary.importance:
        write_atoms(adapter_dir, summary.importance)


def save_adapter_dir(adapter_dir: Path, adapter: SparseDictionaryAdapter) -> AdapterSummary:
    save_adapter(adapter, adapter_dir / ADAPTER_SUBDIR)
    summary = summarize(adapter)
    write_extras(adapter_dir, summary)
    return summary


def inspect_adapter_folder(folder: Path, base: BaseShape, max_bytes: int) -> AdapterSummary:
    """Loads the folder with the engine's checks and checks it fits ``base``.

    Raises ``AdapterFormatError`` or ``AdapterConfigError``, whose message says what is wrong.
    """
    adapter = load_adapter(folder, expected_fingerprint=base.fingerprint, max_bytes=max_bytes)
    # The fingerprint is only what the file claims; the tensors must fit the base all the same.
    for field in ("num_blocks", "in_features", "out_features"):
        ours, theirs = getattr(adapter, field), getattr(base, field)
        if ours != theirs:
            raise AdapterFormatError(f"the adapter has {field}={ours}, but the served base model has {theirs}")
    adapter.config.validate(num_blocks=base.num_blocks, num_heads=base.num_heads)
    return summarize(adapter)
