"""The adapter's weights: per adapted block, W_s (coefficients) and D (atoms), plus atom importance.

ΔO = A·σ(X·W_s)·D (paper eq. 9 in its sec. 3.4 form). How the weights are applied inside
attention is in ``processor.py`` and ``kernels.py``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from adapters.sparse_dictionary.config import SparseDictionaryConfig, base_fingerprint


class SparseDictionaryLayer(nn.Module):
    """W_s (C_in × M) produces coefficients; D (M × C_out) holds the atoms."""

    def __init__(self, in_features: int, out_features: int, num_atoms: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.coefficient_proj = nn.Parameter(torch.empty(in_features, num_atoms, dtype=dtype))
        # D starts at zero, so an untrained adapter leaves the base model's output unchanged.
        self.dictionary = nn.Parameter(torch.zeros(num_atoms, out_features, dtype=dtype))

    def reset_parameters(self, generator: torch.Generator, input_rms: float = 1.0) -> None:
        """Random W_s giving unit-variance coefficients for inputs of RMS ``input_rms``; zero D."""
        std = 1.0 / (math.sqrt(self.coefficient_proj.shape[0]) * input_rms)
        with torch.no_grad():
            sample = torch.randn(self.coefficient_proj.shape, generator=generator) * std
            self.coefficient_proj.copy_(sample.to(self.coefficient_proj.dtype))
            self.dictionary.zero_()


class SparseDictionaryAdapter(nn.Module):
    """One tenant's adapter: a dictionary layer per adapted block, plus atom importance.

    ``importance[block]`` (length M) ranks the atoms of that block's layer; it is computed after
    training and used by "keep the K most important atoms" requests.
    """

    def __init__(self, config: SparseDictionaryConfig, in_features: int, out_features: int, num_blocks: int):
        super().__init__()
        config.validate(num_blocks=num_blocks)
        self.config = config
        self.in_features = in_features
        self.out_features = out_features
        self.num_blocks = num_blocks
        self.layers = nn.ModuleDict(
            {
                str(block): SparseDictionaryLayer(in_features, out_features, config.num_atoms, config.torch_dtype)
                for block in config.blocks(num_blocks)
            }
        )
        self.importance: dict[int, torch.Tensor] = {}

    @classmethod
    def create(
        cls,
        config: SparseDictionaryConfig,
        transformer: nn.Module,
        seed: int = 0,
        input_rms: dict[int, float] | None = None,
    ) -> SparseDictionaryAdapter:
        """A fresh adapter for ``transformer``: random W_s, zero D, the base's fingerprint.

        ``input_rms`` (per block, the RMS of its self-attention input, e.g. from
        ``adapters.training.measure_input_rms``) scales W_s so that the coefficients start at unit
        variance; without it the input is taken as unit-RMS.
        """
        num_blocks = len(transformer.transformer_blocks)
        attn = transformer.transformer_blocks[0].attn1
        config.validate(num_blocks=num_blocks, num_heads=attn.heads)
        if not config.base_fingerprint:
            config.base_fingerprint = base_fingerprint(transformer)
        adapter = cls(config, attn.to_q.in_features, attn.to_out[0].out_features, num_blocks)
        generator = torch.Generator().manual_seed(seed)
        for block in adapter.blocks:
            adapter.layers[str(block)].reset_parameters(generator, (input_rms or {}).get(block, 1.0))
        return adapter

    @property
    def blocks(self) -> list[int]:
        return sorted(int(b) for b in self.layers)

    def layer(self, block: int) -> SparseDictionaryLayer | None:
        key = str(block)
        # ModuleDict has no .get()
        return self.layers[key] if key in self.layers else None  # noqa: SIM401

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def importance_scores(self) -> dict[int, list[float]]:
        """Atom importance per block as plain numbers (empty until it is computed)."""
        return {block: scores.float().cpu().tolist() for block, scores in self.importance.items()}
