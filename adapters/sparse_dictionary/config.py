"""Configuration of a sparse dictionary adapter (ΔO = A·σ(X·W_s)·D)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

import torch

Activation = Literal["topk", "relu", "soft_threshold"]
ACTIVATIONS: tuple[str, ...] = ("topk", "relu", "soft_threshold")
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
MAX_ATOMS = 4096


class AdapterConfigError(ValueError):
    """A configuration value is out of range; the message names the field and the allowed range."""


@dataclass
class SparseDictionaryConfig:
    """What an adapter is: its dictionary size, sparsity rule, placement and the base it belongs to.

    Every field is JSON-serialisable so the config can live beside the weights in
    ``adapter_config.json``.
    """

    num_atoms: int = 256
    """M, the number of dictionary atoms per adapted block (paper: 256). Must divide evenly
    across the attention heads, because each head mixes its own M/H coefficient channels."""

    density: float = 0.04
    """p = k/M, the share of atoms active per token (paper: 0.02 or 0.04). With ``topk`` the
    k = round(p·M) largest-magnitude coefficients are kept; it is ignored by the threshold rules
    unless a request overrides the density."""

    activation: Activation = "topk"
    """σ_λ: ``topk`` (constant sparsity), ``relu`` (ReLU(x−λ)) or ``soft_threshold``
    (sign(x)·max(|x|−λ, 0))."""

    threshold: float = 0.0
    """λ for ``relu`` and ``soft_threshold``; unused by ``topk``."""

    target_blocks: list[int] | None = None
    """Indices of the transformer blocks whose self-attention (``attn1``) gets an adapter;
    ``None`` means every block."""

    dtype: str = "float32"
    """Storage dtype of the weights: float32, float16 or bfloat16."""

    base_fingerprint: str = ""
    """Hash of the base transformer's config (see ``base_fingerprint``). An adapter only loads
    onto the base it was made for."""

    @property
    def top_k(self) -> int:
        return density_to_k(self.density, self.num_atoms)

    @property
    def torch_dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.dtype]

    def validate(self, num_blocks: int | None = None, num_heads: int | None = None) -> None:
        """Raise ``AdapterConfigError`` naming the first field that is out of range."""
        if not isinstance(self.num_atoms, int) or isinstance(self.num_atoms, bool):
            raise AdapterConfigError(f"num_atoms must be an integer, got {self.num_atoms!r}")
        if not 1 <= self.num_atoms <= MAX_ATOMS:
            raise AdapterConfigError(f"num_atoms must be in [1, {MAX_ATOMS}], got {self.num_atoms}")
        if not isinstance(self.density, int | float) or not 0.0 < float(self.density) <= 1.0:
            raise AdapterConfigError(f"density must be in (0, 1], got {self.density!r}")
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise AdapterConfigError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not isinstance(self.threshold, int | float) or not 0.0 <= float(self.threshold) < 1e4:
            raise AdapterConfigError(f"threshold must be a number in [0, 1e4), got {self.threshold!r}")
        if not isinstance(self.dtype, str) or self.dtype not in STORAGE_DTYPES:
            raise AdapterConfigError(f"dtype must be one of {tuple(STORAGE_DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.base_fingerprint, str):
            raise AdapterConfigError("base_fingerprint must be a string")
        if self.target_blocks is not None:
            if not isinstance(self.target_blocks, list) or not self.target_blocks:
                raise AdapterConfigError("target_blocks must be null or a non-empty list of block indices")
            if any(not isinstance(b, int) or isinstance(b, bool) or b < 0 for b in self.target_blocks):
                raise AdapterConfigError(f"target_blocks must hold non-negative integers, got {self.target_blocks}")
            if len(set(self.target_blocks)) != len(self.target_blocks):
                raise AdapterConfigError(f"target_blocks has duplicates: {self.target_blocks}")
            if num_blocks is not None and max(self.target_blocks) >= num_blocks:
                raise AdapterConfigError(
                    f"target_blocks {self.target_blocks} names a block past the base model's {num_blocks} blocks"
                )
        if num_heads is not None and self.num_atoms % num_heads:
            raise AdapterConfigError(
                f"num_atoms ({self.num_atoms}) must be a multiple of the base model's {num_heads} attention "
                "heads, because each head mixes an equal share of the coefficient channels"
            )

    def blocks(self, num_blocks: int) -> list[int]:
        return list(range(num_blocks)) if self.target_blocks is None else sorted(self.target_blocks)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparseDictionaryConfig:
        """Build from a parsed ``adapter_config.json``; unknown or missing fields are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise AdapterConfigError(f"unknown config fields: {unknown}")
        missing = sorted(names - set(data))
        if missing:
            raise AdapterConfigError(f"missing config fields: {missing}")
        config = cls(**data)
        config.validate()
        return config


def density_to_k(density: float, num_atoms: int) -> int:
    """Atoms kept per token for a density; at least one, so a positive density never means 'off'."""
    return max(1, min(num_atoms, round(density * num_atoms)))


def base_fingerprint(transformer: torch.nn.Module) -> str:
    """A short hash of the base transformer's architecture config.

    Weights are not hashed: reading 600M parameters per load would be slow, and the config is
    what decides whether an adapter's shapes and block indices mean the same thing.
    """
    config = dict(transformer.config)
    relevant = {k: v for k, v in sorted(config.items()) if not k.startswith("_")}
    payload = json.dumps(relevant, sort_keys=True, default=str).encode()
    return "pixart-" + hashlib.sha256(payload).hexdigest()[:16]
