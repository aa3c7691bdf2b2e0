"""Adapter folders as zip files: what download sends and what import accepts.

An import is unpacked only after its listing passes: the engine's two files at the top level, no
other entries, sizes within the limit, so no path or size comes from the upload unchecked. Then
the engine loads it and checks it against the base the workers serve, as a worker published it.
"""

import io
import tempfile
import zipfile
import zlib
from pathlib import Path

from service.context import Services
from service.core.catalog import AdapterRecord
from service.core.ids import new_id
from service.core.storage import ADAPTER_SUBDIR, write_atoms
from service.core.tenants import Tenant
from service.core.worker_registry import base_shape
from service.errors import ApiError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# What /download writes (stored) and what common zip tools write (deflated); nothing else is read.
COMPRESSIONS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
# What reading a damaged entry raises: a bad header or CRC, a bad deflate stream, a truncated one.
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError)


def zip_folder(folder: Path) -> Path:
    """A temporary zip of the folder's files (the caller deletes it)."""
    handle = tempfile.NamedTemporaryFile(suffix=".zip", delete=False)  # noqa: SIM115 - outlives this call
    # Weights do not compress; storing them keeps download fast.
    with handle, zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                archive.write(path, arcname=path.name)
    return Path(handle.name)


def unpack_adapter_zip(data: bytes, dest: Path, max_bytes: int) -> None:
    def bad(message: str) -> ApiError:
        return ApiError(422, "invalid_adapter", message)

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise bad("the upload is not a zip file; send the zip that /download returns") from None
    with archive:
        infos = archive.infolist()
        names = sorted(info.filename for info in infos)
        if names != sorted(ADAPTER_FILES):
            raise bad(
                f"the zip must hold exactly {', '.join(ADAPTER_FILES)} at its top level; it holds "
                f"{', '.join(names) or 'nothing'}"
            )
        total = sum(info.file_size for info in infos)
        if total > max_bytes:
            raise bad(f"the adapter unpacks to {total} bytes; the limit is {max_bytes} bytes")
        for info in infos:
            if info.flag_bits & 1:
                raise bad(f"'{info.filename}' in the zip is encrypted; send the zip unencrypted")
            if info.compress_type not in COMPRESSIONS:
                raise bad(
                    f"'{info.filename}' in the zip uses compression method {info.compress_type}; "
                    f"store or deflate it (as /download does)"
                )
            # file_size is the archive's claim; read at most that much, so a lying header cannot fill the disk.
            try:
                with archive.open(info) as src:
                    content = src.read(info.file_size + 1)
            except _READ_ERRORS:
                content = None
            if content is None or len(content) != info.file_size:
                raise bad(f"'{info.filename}' in the zip is corrupt; send the zip that /download returns")
            (dest / info.filename).write_bytes(content)


def import_adapter_zip(services: Services, tenant: Tenant, data: bytes, prompt: str) -> AdapterRecord:
    """Unpacks, checks and stores an uploaded adapter zip as a ready adapter of the tenant."""
    # The engine (and torch) load only here, so a gateway that never imports stays light.
    from adapters import AdapterFormatError, load_adapter_for_base

    adapter_id = new_id()
    limit = services.settings.max_adapter_bytes
    with services.storage.replacing(services.storage.adapter_dir(tenant.id, adapter_id)) as tmp:
        folder = tmp / ADAPTER_SUBDIR
        folder.mkdir()
        unpack_adapter_zip(data, folder, limit)
        base = base_shape(services.db)
        if base is None:
            raise ApiError(
                503,
                "no_base_model",
                "no worker has loaded the base model yet, so the adapter cannot be checked against it; "
                "start a worker (atomtune worker) or wait for it to load, and retry",
            )
        try:
            adapter = load_adapter_for_base(
                folder,
                fingerprint=base.fingerprint,
                num_blocks=base.num_blocks,
                num_heads=base.num_heads,
                in_features=base.in_features,
                out_features=base.out_features,
                max_bytes=limit,
            )
        except AdapterFormatError as exc:
            raise ApiError(422, "invalid_adapter", str(exc)) from None
        write_atoms(tmp, adapter.importance_scores())
    config = adapter.config.to_dict()
    services.catalog.create(adapter_id, tenant.id, prompt, "imported", config)
    services.catalog.mark_ready(adapter_id, config, adapter.blocks, metrics={})
    record = services.catalog.get(adapter_id)
    assert record is not None
    return record
