"""The data directory, namespaced by tenant: ``tenants/<tenant>/{uploads,adapters,outputs}/<id>``.

Only validated ids are joined onto paths; nothing a user sends becomes part of one. Writers build
into a temporary sibling and rename it into place, so a crashed job never leaves a half-written
folder that looks finished.
"""

import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.core.ids import is_valid_id, new_id

ADAPTER_SUBDIR = "adapter"
ATOMS_FILE = "atoms.json"
ATTRIBUTION_FILE = "attribution.json"
"""Beside a generation's images, when it asked for attribution maps."""


class Storage:
    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir).resolve()

    def _tenant_dir(self, tenant_id: str, area: str, object_id: str) -> Path:
        if not (is_valid_id(tenant_id) and is_valid_id(object_id)):
            raise ValueError("storage paths are built from generated ids only")
        return self.root / "tenants" / tenant_id / area / object_id

    def uploads_dir(self, tenant_id: str, adapter_id: str) -> Path:
        return self._tenant_dir(tenant_id, "uploads", adapter_id)

    def adapter_dir(self, tenant_id: str, adapter_id: str) -> Path:
        """Holds ``adapter/`` (the engine's folder, what download zips) and ``atoms.json``."""
        return self._tenant_dir(tenant_id, "adapters", adapter_id)

    def outputs_dir(self, tenant_id: str, job_id: str) -> Path:
        return self._tenant_dir(tenant_id, "outputs", job_id)

    def output_image(self, tenant_id: str, job_id: str, index: int) -> Path:
        return self.outputs_dir(tenant_id, job_id) / f"{index}.png"

    def attribution(self, tenant_id: str, job_id: str) -> Path:
        return self.outputs_dir(tenant_id, job_id) / ATTRIBUTION_FILE

    @contextmanager
    def replacing(self, target: Path) -> Iterator[Path]:
        """A fresh temporary folder that replaces ``target`` when the block succeeds."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".tmp-{target.name}-{new_id()}"
        tmp.mkdir()
        try:
            yield tmp
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def remove(self, path: Path) -> bool:
        """Removes a folder; whether there was one."""
        existed = path.exists()
        shutil.rmtree(path, ignore_errors=True)
        return existed

    def remove_adapter(self, tenant_id: str, adapter_id: str) -> None:
        self.remove(self.adapter_dir(tenant_id, adapter_id))
        self.remove(self.uploads_dir(tenant_id, adapter_id))


def rank_atoms(importance: Mapping[int, Sequence[float]]) -> list[dict[str, Any]]:
    """Per block, atoms ordered from most to least important."""
    return [
        {
            "block": int(block),
            "atoms": [
                {"atom": atom, "importance": float(score)}
                for atom, score in sorted(enumerate(scores), key=lambda pair: -pair[1])
            ],
        }
        for block, scores in sorted(importance.items())
    ]


def write_atoms(adapter_dir: Path, importance: Mapping[int, Sequence[float]]) -> None:
    """Writes the ranking the atoms route serves; an adapter without importance gets no file."""
    if importance:
        (adapter_dir / ATOMS_FILE).write_text(json.dumps(rank_atoms(importance)))


def read_atoms(adapter_dir: Path) -> list[dict[str, Any]] | None:
    path = adapter_dir / ATOMS_FILE
    return json.loads(path.read_text()) if path.exists() else None
