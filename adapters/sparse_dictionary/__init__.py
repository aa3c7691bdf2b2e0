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
from adapters.sparse_dictionary.model import (
    GUIDANCE_BRANCHES,
    MAX_COMPOSED,
    AdapterHost,
    GuidanceBranch,
    RoutingError,
    SampleRoute,
    guided_routes,
)
from adapters.sparse_dictionary.processor import SparseDictionaryAttnProcessor

__all__ = [
    "ACTIVATIONS",
    "GUIDANCE_BRANCHES",
    "MAX_COMPOSED",
    "AdapterConfigError",
    "AdapterHost",
    "GuidanceBranch",
    "RoutingError",
    "SampleRoute",
    "SparseDictionaryAdapter",
    "SparseDictionaryAttnProcessor",
    "SparseDictionaryConfig",
    "base_fingerprint",
    "density_to_k",
    "guided_routes",
]
