"""Saving and loading sparse dictionary adapters in PEFT's folder layout.

A folder holds ``adapter_config.json`` (every ``SparseDictionaryConfig`` field, flat, plus the
format marker and the shapes needed to rebuild the module) and ``adapter_model.safetensors``
with, per adapted block ``i``::

    transformer_blocks.{i}.attn1.coefficient_proj   [in_features, num_atoms]   config dtype
    transformer_blocks.{i}.attn1.dictionary         [num_atoms, out_features]  config dtype
    transformer_blocks.{i}.attn1.importance         [num_atoms]                float32, optional

Adapter folders come from tenants, so ``load_adapter`` treats them as hostile: sizes are bounded
before anything is parsed, weights are read only through safetensors (never pickle), and every
name, shape, dtype and value is checked before the adapter is built.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize_tensors

from adapters.sparse_dictionary.config import AdapterConfigError, SparseDictionaryConfig
from adapters.sparse_dictionary.layer import SparseDictionaryAdapter

__all__ = [
    "CONFIG_NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "AdapterFormatError",
    "load_adapter",
    "load_adapter_for_base",
    "save_adapter",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_NAME = "sparse_dictionary"
FORMAT_VERSION = 1

MAX_CONFIG_BYTES = 64 * 1024
MAX_HEADER_BYTES = 1024 * 1024
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
# Far above PixArt-Σ (1152 features, 28 blocks); they only stop absurd values before allocation.
MAX_FEATURES = 65536
MAX_BLOCKS = 1024

_SHAPE_FIELDS = ("in_features", "out_features", "num_blocks")
_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class AdapterFormatError(ValueError):
    """An adapter folder cannot be saved or loaded; the message says what is wrong and how to fix it."""


def _tensor_name(block: int, kind: str) -> str:
    return f"transformer_blocks.{block}.attn1.{kind}"


def _check_values(name: str, tensor: torch.Tensor, non_negative: bool = False) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise AdapterFormatError(f"tensor {name!r} contains NaN or Inf values; the adapter's training diverged")
    if non_negative and bool((tensor < 0).any()):
        raise AdapterFormatError(f"tensor {name!r} has negative values; atom importance must be >= 0")


def _adapter_tensors(adapter: SparseDictionaryAdapter) -> dict[str, torch.Tensor]:
    config = adapter.config
    blocks = adapter.blocks
    with_importance = [b for b in blocks if b in adapter.importance]
    if with_importance and len(with_importance) != len(blocks):
        missing = sorted(set(blocks) - set(with_importance))
        raise AdapterFormatError(
            f"importance covers blocks {with_importance} but not {missing}; compute it for every block or clear it"
        )
    tensors: dict[str, torch.Tensor] = {}
    for block in blocks:
        layer = adapter.layers[str(block)]
        for kind in ("coefficient_proj", "dictionary"):
            param: torch.Tensor = getattr(layer, kind)
            if param.dtype != config.torch_dtype:
                raise AdapterFormatError(
                    f"block {block} {kind} is {param.dtype}, but the config stores {config.dtype}; "
                    "cast the adapter back or change config.dtype"
                )
            tensors[_tensor_name(block, kind)] = param.detach().cpu().contiguous()
        if with_importance:
            importance = adapter.importance[block]
            if importance.dtype != torch.float32 or tuple(importance.shape) != (config.num_atoms,):
                raise AdapterFormatError(
                    f"importance[{block}] must be float32 of shape ({config.num_atoms},), "
                    f"got {importance.dtype} {tuple(importance.shape)}"
                )
            tensors[_tensor_name(block, "importance")] = importance.detach().cpu().contiguous()
    for name, tensor in tensors.items():
        _check_values(name, tensor, non_negative=name.endswith(".importance"))
    return tensors


def _write_temp(folder: Path, name: str, data: bytes) -> Path:
    fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        os.unlink(temp)
        raise
    return Path(temp)


def save_adapter(adapter: SparseDictionaryAdapter, folder: str | Path) -> Path:
    """Write ``adapter`` to ``folder`` (created if needed) and return the folder.

    Both files are written to temporary names first. The old config is removed before either
    file is renamed into place and the new config goes last, so a crash leaves either the old
    adapter, a folder without a config (which ``load_adapter`` reports as incomplete), or the new
    adapter, never a new weights file beside an old config.
    """
    folder = Path(folder)
    config_dict: dict[str, Any] = {
        **adapter.config.to_dict(),
        "atomtune_format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "in_features": adapter.in_features,
        "out_features": adapter.out_features,
        "num_blocks": adapter.num_blocks,
    }
    tensors = _adapter_tensors(adapter)
    folder.mkdir(parents=True, exist_ok=True)
    temps: list[Path] = []
    try:
        temps.append(_write_temp(folder, WEIGHTS_NAME, serialize_tensors(tensors, metadata={"format": "pt"})))
        temps.append(_write_temp(folder, CONFIG_NAME, (json.dumps(config_dict, indent=2) + "\n").encode()))
        (folder / CONFIG_NAME).unlink(missing_ok=True)
        os.replace(temps[0], folder / WEIGHTS_NAME)
        os.replace(temps[1], folder / CONFIG_NAME)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return folder


def _read_config(path: Path) -> tuple[SparseDictionaryConfig, dict[str, int]]:
    with path.open("rb") as handle:
        raw = handle.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterFormatError(
            f"{path.name} is larger than {MAX_CONFIG_BYTES} bytes; an adapter config is a few hundred bytes"
        )
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise AdapterFormatError(f"{path.name} is not valid UTF-8 JSON ({error}); re-save the adapter") from error
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path.name} must hold a JSON object, got {type(data).__name__}")
    if data.get("atomtune_format") != FORMAT_NAME:
        raise AdapterFormatError(
            f"{path.name} has atomtune_format {data.get('atomtune_format')!r}, expected {FORMAT_NAME!r}; "
            "this is not an atomtune sparse dictionary adapter"
        )
    version = data.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise AdapterFormatError(
            f"{path.name} has format_version {version!r}; this atomtune reads version {FORMAT_VERSION} only"
        )
    missing = [field for field in _SHAPE_FIELDS if field not in data]
    if missing:
        raise AdapterFormatError(f"{path.name} lacks the fields {missing}; re-save the adapter with save_adapter")
    shapes: dict[str, int] = {}
    for field in _SHAPE_FIELDS:
        value = data.pop(field)
        limit = MAX_BLOCKS if field == "num_blocks" else MAX_FEATURES
        if type(value) is not int or not 1 <= value <= limit:
            raise AdapterFormatError(f"{path.name}: {field} must be an integer in [1, {limit}], got {value!r}")
        shapes[field] = value
    del data["atomtune_format"], data["format_version"]
    try:
        config = SparseDictionaryConfig.from_dict(data)
        config.validate(num_blocks=shapes["num_blocks"])
    except AdapterConfigError as error:
        raise AdapterFormatError(f"{path.name}: {error}") from error
    return config, shapes


def _check_header(path: Path, max_bytes: int) -> None:
    """Bound the file and its header before safetensors parses anything.

    The first 8 bytes of a safetensors file are the little-endian length of its JSON header;
    checking it here turns a pickle renamed to ``.safetensors`` or a cut-off download into a
    clear message instead of a parser error or a huge allocation.
    """
    size = path.stat().st_size
    if size > max_bytes:
        raise AdapterFormatError(f"{path.name} is {size} bytes, over the {max_bytes}-byte limit for an adapter")
    with path.open("rb") as handle:
        prefix = handle.read(8)
    if len(prefix) < 8:
        raise AdapterFormatError(f"{path.name} is {size} bytes, too short to be a safetensors file; re-upload it")
    header_length = int.from_bytes(prefix, "little")
    if header_length > MAX_HEADER_BYTES:
        raise AdapterFormatError(
            f"{path.name} declares a {header_length}-byte header (limit {MAX_HEADER_BYTES}); it is not a safetensors "
            "file (a pickle or torch.save checkpoint renamed?). Save the weights with safetensors"
        )
    if header_length > size - 8:
        raise AdapterFormatError(
            f"{path.name} declares a {header_length}-byte header but has only {size - 8} bytes after the length; "
            "the file is truncated or not safetensors"
        )


def _expected_tensors(config: SparseDictionaryConfig, shapes: dict[str, int]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Required tensor name -> (shape, safetensors dtype)."""
    weight_dtype = _SAFETENSORS_DTYPES[config.torch_dtype]
    expected: dict[str, tuple[tuple[int, ...], str]] = {}
    for block in config.blocks(shapes["num_blocks"]):
        expected[_tensor_name(block, "coefficient_proj")] = ((shapes["in_features"], config.num_atoms), weight_dtype)
        expected[_tensor_name(block, "dictionary")] = ((config.num_atoms, shapes["out_features"]), weight_dtype)
    return expected


def load_adapter(
    folder: str | Path,
    expected_fingerprint: str | None = None,
    device: str | torch.device = "cpu",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> SparseDictionaryAdapter:
    """Read an adapter folder written by ``save_adapter`` onto ``device``, checking everything.

    ``expected_fingerprint`` (the serving base's ``base_fingerprint``) rejects adapters made for
    another base. Every problem raises ``AdapterFormatError``.
    """
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not folder.is_dir():
        raise AdapterFormatError(f"adapter folder {folder} does not exist or is not a directory")
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterFormatError(
                f"the adapter has no {path.name}; an adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
    config, shapes = _read_config(config_path)
    if expected_fingerprint is not None and config.base_fingerprint != expected_fingerprint:
        raise AdapterFormatError(
            f"adapter was made for base {config.base_fingerprint!r}, but this base is {expected_fingerprint!r}; "
            "load it on the base it was trained on, or retrain it"
        )

    _check_header(weights_path, max_bytes)
    expected = _expected_tensors(config, shapes)
    importance_names = {_tensor_name(block, "importance") for block in config.blocks(shapes["num_blocks"])}
    importance_spec = ((config.num_atoms,), _SAFETENSORS_DTYPES[torch.float32])
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(weights_path, framework="pt", device="cpu") as handle:
            present = set(handle.keys())
            missing = sorted(set(expected) - present)
            if missing:
                raise AdapterFormatError(f"{weights_path.name} lacks the tensors {missing}")
            unknown = sorted(present - set(expected) - importance_names)
            if unknown:
                raise AdapterFormatError(f"{weights_path.name} has unknown tensors {unknown}; remove them")
            found_importance = present & importance_names
            if found_importance and found_importance != importance_names:
                raise AdapterFormatError(
                    f"{weights_path.name} has importance for only some blocks (missing "
                    f"{sorted(importance_names - found_importance)}); store it for every block or none"
                )
            specs = {**expected, **dict.fromkeys(found_importance, importance_spec)}
            # Shapes and dtypes come from the header, so a wrong file is refused before reading its data.
            for name in sorted(specs):
                shape, dtype = specs[name]
                tensor_slice = handle.get_slice(name)
                got_shape, got_dtype = tuple(tensor_slice.get_shape()), tensor_slice.get_dtype()
                if got_shape != shape:
                    raise AdapterFormatError(f"tensor {name!r} has shape {list(got_shape)}, expected {list(shape)}")
                if got_dtype != dtype:
                    raise AdapterFormatError(
                        f"tensor {name!r} has dtype {got_dtype}, expected {dtype}"
                        + ("" if name in found_importance else f" (the config's dtype {config.dtype!r})")
                    )
            for name in sorted(specs):
                tensors[name] = handle.get_tensor(name)
    except SafetensorError as error:
        raise AdapterFormatError(
            f"{weights_path.name} is not a valid safetensors file ({error}); re-save it"
        ) from error
    for name, tensor in tensors.items():
        _check_values(name, tensor, non_negative=name in found_importance)

    adapter = SparseDictionaryAdapter(config, shapes["in_features"], shapes["out_features"], shapes["num_blocks"])
    with torch.no_grad():
        for block in adapter.blocks:
            layer = adapter.layers[str(block)]
            layer.coefficient_proj.copy_(tensors[_tensor_name(block, "coefficient_proj")])
            layer.dictionary.copy_(tensors[_tensor_name(block, "dictionary")])
    adapter.to(device)
    if found_importance:
        adapter.importance = {block: tensors[_tensor_name(block, "importance")].to(device) for block in adapter.blocks}
    return adapter


def load_adapter_for_base(
    folder: str | Path,
    *,
    fingerprint: str,
    num_blocks: int,
    num_heads: int,
    in_features: int,
    out_features: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> SparseDictionaryAdapter:
    """``load_adapter`` for a base known by its fingerprint and dimensions rather than a transformer
    at hand (a service checking an upload against the base its workers serve).

    The fingerprint is only what the file claims, so the tensors must fit the dimensions as well.
    Every problem raises ``AdapterFormatError``.
    """
    adapter = load_adapter(folder, expected_fingerprint=fingerprint, max_bytes=max_bytes)
    for field, expected in (("num_blocks", num_blocks), ("in_features", in_features), ("out_features", out_features)):
        found = getattr(adapter, field)
        if found != expected:
            raise AdapterFormatError(f"the adapter has {field}={found}, but the served base model has {expected}")
    try:
        adapter.config.validate(num_blocks=num_blocks, num_heads=num_heads)
    except AdapterConfigError as error:
        raise AdapterFormatError(str(error)) from error
    return adapter
