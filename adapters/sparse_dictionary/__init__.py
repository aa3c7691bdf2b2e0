"""Sparse dictionary fine-tuning (ΔO = A·σ(X·W_s)·D), laid out like a PEFT tuner: config, layer, model."""

from adapters.sparse_dictionary.config import (
    ACTIVATIONS,
    AdapterConfigError,
    SparseDictionaryConfig,
    base_fingerprint,
    density_to_k,
)
from adapters.sparse_dictionary.layer import SparseDictionaryAdapter, SparseDictionaryAttnProcessor
from adapters.sparse_dictionary.model import AdapterHost, RoutingError, SampleRoute

__all__ = [
    "ACTIVATIONS",
    "AdapterConfigError",
    "AdapterHost",
    "RoutingError",
    "SampleRoute",
    "SparseDictionaryAdapter",
    "SparseDictionaryAttnProcessor",
    "SparseDictionaryConfig",
    "base_fingerprint",
    "density_to_k",
]
