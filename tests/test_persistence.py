"""save_adapter / load_adapter: bit-exact round trips, and every malformed folder refused with a clear message."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from safetensors.torch import load_file, save_file

from adapters import (
    AdapterFormatError,
    AdapterHost,
    SampleRoute,
    SparseDictionaryAdapter,
    SparseDictionaryConfig,
    base_fingerprint,
    load_adapter,
    save_adapter,
)
from adapters.persistence import CONFIG_NAME, WEIGHTS_NAME
from adapters.tiny import build_tiny_transformer


@pytest.fixture(scope="module")
def transformer() -> PixArtTransformer2DModel:
    return build_tiny_transformer()


def make_adapter(
    transformer: PixArtTransformer2DModel,
    dtype: str = "float32",
    target_blocks: list[int] | None = None,
    importance: bool = True,
) -> SparseDictionaryAdapter:
    config = SparseDictionaryConfig(num_atoms=8, density=0.5, dtype=dtype, target_blocks=target_blocks)
    adapter = SparseDictionaryAdapter.create(config, transformer, seed=1)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in adapter.layers.values():
            # create() leaves D at zero; random atoms make the round trip and the host test meaningful.
            layer.dictionary.copy_(torch.randn(layer.dictionary.shape, generator=generator).to(layer.dictionary.dtype))
    if importance:
        adapter.importance = {b: torch.rand(config.num_atoms, generator=generator) for b in adapter.blocks}
    return adapter


def assert_same(original: SparseDictionaryAdapter, loaded: SparseDictionaryAdapter) -> None:
    assert loaded.config == original.config
    assert (loaded.in_features, loaded.out_features) == (original.in_features, original.out_features)
    original_state, loaded_state = original.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for name, tensor in original_state.items():
        assert loaded_state[name].dtype == tensor.dtype, name
        assert torch.equal(loaded_state[name], tensor), name
    assert loaded.importance.keys() == original.importance.keys()
    for block, values in original.importance.items():
        assert torch.equal(loaded.importance[block], values), block


@pytest.mark.parametrize(
    ("dtype", "target_blocks", "importance"),
    [("float32", None, True), ("bfloat16", None, True), ("float16", [1], False)],
)
def test_round_trip_is_bit_exact(
    transformer: PixArtTransformer2DModel,
    tmp_path: Path,
    dtype: str,
    target_blocks: list[int] | None,
    importance: bool,
) -> None:
    adapter = make_adapter(transformer, dtype, target_blocks, importance)
    assert save_adapter(adapter, tmp_path / "a") == tmp_path / "a"
    loaded = load_adapter(tmp_path / "a", expected_fingerprint=base_fingerprint(transformer))
    assert_same(adapter, loaded)


def test_on_disk_layout(transformer: PixArtTransformer2DModel, tmp_path: Path) -> None:
    adapter = make_adapter(transformer, "bfloat16")
    save_adapter(adapter, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config == {
        **adapter.config.to_dict(),
        "atomtune_format": "sparse_dictionary",
        "format_version": 1,
        "in_features": 32,
        "out_features": 32,
        "num_blocks": 2,
    }
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert sorted(tensors) == sorted(
        f"transformer_blocks.{b}.attn1.{kind}"
        for b in (0, 1)
        for kind in ("coefficient_proj", "dictionary", "importance")
    )
    assert tensors["transformer_blocks.0.attn1.dictionary"].dtype == torch.bfloat16
    assert tensors["transformer_blocks.0.attn1.importance"].dtype == torch.float32


def test_save_replaces_an_existing_adapter_without_leftovers(
    transformer: PixArtTransformer2DModel, tmp_path: Path
) -> None:
    save_adapter(make_adapter(transformer, "float32"), tmp_path)
    newer = make_adapter(transformer, "bfloat16", importance=False)
    save_adapter(newer, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert_same(newer, load_adapter(tmp_path))


def test_save_refuses_what_load_would_refuse(transformer: PixArtTransformer2DModel, tmp_path: Path) -> None:
    partial = make_adapter(transformer)
    del partial.importance[1]
    with pytest.raises(AdapterFormatError, match=r"importance covers blocks \[0\] but not \[1\]"):
        save_adapter(partial, tmp_path)
    diverged = make_adapter(transformer)
    with torch.no_grad():
        diverged.layers["0"].dictionary[0, 0] = float("nan")
    with pytest.raises(AdapterFormatError, match="NaN or Inf"):
        save_adapter(diverged, tmp_path)
    assert not any(tmp_path.iterdir())


# -- malformed folders -------------------------------------------------------------------------------

Mutation = Callable[[Path], None]


def edit_config(change: Callable[[dict], object]) -> Mutation:
    def mutate(folder: Path) -> None:
        config = json.loads((folder / CONFIG_NAME).read_text())
        change(config)
        (folder / CONFIG_NAME).write_text(json.dumps(config))

    return mutate


def edit_tensors(change: Callable[[dict[str, torch.Tensor]], object]) -> Mutation:
    def mutate(folder: Path) -> None:
        tensors = load_file(folder / WEIGHTS_NAME)
        change(tensors)
        save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})

    return mutate


def write_bytes(name: str, data: Callable[[bytes], bytes]) -> Mutation:
    def mutate(folder: Path) -> None:
        path = folder / name
        path.write_bytes(data(path.read_bytes()))

    return mutate


def pickle_as_safetensors(folder: Path) -> None:
    torch.save({"transformer_blocks.0.attn1.dictionary": torch.zeros(8, 32)}, folder / WEIGHTS_NAME)


def set_value(name: str, index: tuple[int, ...], value: float) -> Mutation:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name][index] = value

    return edit_tensors(change)


D0 = "transformer_blocks.0.attn1.dictionary"
W1 = "transformer_blocks.1.attn1.coefficient_proj"
I1 = "transformer_blocks.1.attn1.importance"

MALFORMED: dict[str, tuple[Mutation, str]] = {
    "pickle renamed": (pickle_as_safetensors, r"not a safetensors file \(a pickle"),
    "truncated in header": (write_bytes(WEIGHTS_NAME, lambda b: b[:100]), r"truncated or not safetensors"),
    "truncated in data": (write_bytes(WEIGHTS_NAME, lambda b: b[:-10]), r"not a valid safetensors file"),
    "shorter than length": (write_bytes(WEIGHTS_NAME, lambda b: b[:5]), r"too short to be a safetensors"),
    "header longer than file": (
        write_bytes(WEIGHTS_NAME, lambda b: (1000).to_bytes(8, "little") + b"{}"),
        r"declares a 1000-byte header but has only 2 bytes",
    ),
    "header not json": (
        write_bytes(WEIGHTS_NAME, lambda b: (4).to_bytes(8, "little") + b"nope"),
        r"not a valid safetensors file",
    ),
    "wrong shape": (
        edit_tensors(lambda t: t.update({D0: t[D0][:, :16].contiguous()})),
        r"'transformer_blocks\.0\.attn1\.dictionary' has shape \[8, 16\], expected \[8, 32\]",
    ),
    "nan": (set_value(D0, (0, 0), float("nan")), r"'transformer_blocks\.0\.attn1\.dictionary' contains NaN or Inf"),
    "inf": (
        set_value(W1, (3, 1), float("-inf")),
        r"'transformer_blocks\.1\.attn1\.coefficient_proj' contains NaN or Inf",
    ),
    "negative importance": (set_value(I1, (2,), -1.0), r"importance' has negative values"),
    "missing tensor": (
        edit_tensors(lambda t: t.pop(W1)),
        r"lacks the tensors \['transformer_blocks\.1\.attn1\.coefficient_proj'\]",
    ),
    "unknown tensor": (
        edit_tensors(lambda t: t.update({"transformer_blocks.0.attn2.dictionary": torch.zeros(2)})),
        r"unknown tensors \['transformer_blocks\.0\.attn2\.dictionary'\]",
    ),
    "partial importance": (edit_tensors(lambda t: t.pop(I1)), r"importance for only some blocks"),
    "wrong dtype": (
        edit_tensors(lambda t: t.update({D0: t[D0].half()})),
        r"'transformer_blocks\.0\.attn1\.dictionary' has dtype F16, expected F32 \(the config's dtype 'float32'\)",
    ),
    "importance not float32": (
        edit_tensors(lambda t: t.update({I1: t[I1].double()})),
        r"importance' has dtype F64, expected F32$",
    ),
    "other base": (
        edit_config(lambda c: c.update(base_fingerprint="pixart-0123456789abcdef")),
        r"made for base 'pixart-0123456789abcdef', but this base is 'pixart-",
    ),
    "missing config": (lambda f: (f / CONFIG_NAME).unlink(), r"has no adapter_config\.json"),
    "missing weights": (lambda f: (f / WEIGHTS_NAME).unlink(), r"has no adapter_model\.safetensors"),
    "invalid json": (write_bytes(CONFIG_NAME, lambda b: b[:-3]), r"not valid UTF-8 JSON"),
    "json not an object": (write_bytes(CONFIG_NAME, lambda b: b"[1, 2]"), r"must hold a JSON object, got list"),
    "config too large": (write_bytes(CONFIG_NAME, lambda b: b + b" " * 70000), r"larger than 65536 bytes"),
    "peft config": (
        edit_config(lambda c: c.pop("atomtune_format")),
        r"atomtune_format None, expected 'sparse_dictionary'",
    ),
    "future version": (
        edit_config(lambda c: c.update(format_version=2)),
        r"format_version 2; this atomtune reads version 1",
    ),
    "unknown field": (edit_config(lambda c: c.update(rank=4)), r"unknown config fields: \['rank'\]"),
    "missing field": (edit_config(lambda c: c.pop("density")), r"missing config fields: \['density'\]"),
    "missing shape field": (edit_config(lambda c: c.pop("num_blocks")), r"lacks the fields \['num_blocks'\]"),
    "density out of range": (edit_config(lambda c: c.update(density=1.5)), r"density must be in \(0, 1\], got 1\.5"),
    "wrong value type": (edit_config(lambda c: c.update(dtype=["float32"])), r"dtype must be one of"),
    "zero features": (
        edit_config(lambda c: c.update(in_features=0)),
        r"in_features must be an integer in \[1, 65536\]",
    ),
    "absurd block count": (edit_config(lambda c: c.update(num_blocks=10**9)), r"num_blocks must be an integer in"),
    "target past base": (edit_config(lambda c: c.update(target_blocks=[5])), r"names a block past the base model's 2"),
}


@pytest.mark.parametrize(("mutate", "message"), list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_adapter_is_rejected(
    transformer: PixArtTransformer2DModel, tmp_path: Path, mutate: Mutation, message: str
) -> None:
    save_adapter(make_adapter(transformer), tmp_path)
    mutate(tmp_path)
    with pytest.raises(AdapterFormatError, match=message):
        load_adapter(tmp_path, expected_fingerprint=base_fingerprint(transformer))


def test_file_over_max_bytes_is_rejected(transformer: PixArtTransformer2DModel, tmp_path: Path) -> None:
    save_adapter(make_adapter(transformer), tmp_path)
    size = (tmp_path / WEIGHTS_NAME).stat().st_size
    with pytest.raises(AdapterFormatError, match=re.escape(f"is {size} bytes, over the 1024-byte limit")):
        load_adapter(tmp_path, max_bytes=1024)


def test_missing_folder_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(AdapterFormatError, match="does not exist or is not a directory"):
        load_adapter(tmp_path / "nowhere")


# -- serving ----------------------------------------------------------------------------------------


def test_loaded_adapter_serves_like_the_original(transformer: PixArtTransformer2DModel, tmp_path: Path) -> None:
    adapter = make_adapter(transformer, "float32")
    save_adapter(adapter, tmp_path)
    host = AdapterHost(transformer)
    try:
        host.add("original", adapter)
        host.add("loaded", load_adapter(tmp_path, expected_fingerprint=host.fingerprint))
        generator = torch.Generator().manual_seed(3)
        inputs = {
            "hidden_states": torch.randn(1, 4, 8, 8, generator=generator),
            "encoder_hidden_states": torch.randn(1, 5, 32, generator=generator),
            "timestep": torch.tensor([500]),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
        outputs = {}
        with torch.no_grad():
            for name in (None, "original", "loaded"):
                with host.route([SampleRoute(adapter=name, top_atoms=None if name is None else 4)]):
                    outputs[name] = transformer(**inputs).sample
    finally:
        host.detach()
    assert not torch.equal(outputs["original"], outputs[None])
    assert torch.equal(outputs["loaded"], outputs["original"])
