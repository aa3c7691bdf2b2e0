"""An adapter on disk: the engine's folder plus the ranked atom importance the API serves.

Used by the workers after training and by the gateway when it validates an import.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters import SparseDictionaryAdapter, load_adapter, save_adapter
from service.storage import ADAPTER_SUBDIR, write_atoms


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


def inspect_adapter_folder(folder: Path, fingerprint: str | None, max_bytes: int) -> AdapterSummary:
    """Loads the folder with the engine's checks (``AdapterFormatError`` says what is wrong)."""
    return summarize(load_adapter(folder, expected_fingerprint=fingerprint, max_bytes=max_bytes))
