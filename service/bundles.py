"""Adapter folders as zip files: what download sends and what import accepts.

An import is unpacked only after its listing passes: the engine's two files at the top level, no
other entries, sizes within the limit, so no path or size comes from the upload unchecked.
"""

import io
import tempfile
import zipfile
import zlib
from pathlib import Path

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
