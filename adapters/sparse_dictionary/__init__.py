"""Sparse dictionary fine-tuning (ΔO = A·σ(X·W_s)·D), laid out like a PEFT tuner.

``config`` (what an adapter is), ``layer`` (its weights), ``plan`` and ``kernels`` (the arithmetic
inside attention), ``processor`` (the attention processor), ``model`` (the host that routes rows)."""

from adapters.sparse_dictionary.config import (
    ACTIVATIONS,
    AdapterConfigError,
    SparseDictionaryConfig,
    base_fingerprint,
    density_to_k,
)
from adapters.sparse_dictionary.layer import SparseDictionaryAdapter
from adapters.sparse_dictionary.model import AdapterHost, RoutingError, SampleRoute
from adapters.sparse_dictionary.processor import SparseDictionaryAttnProcessor

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
