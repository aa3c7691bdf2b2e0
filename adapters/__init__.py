"""The sparse dictionary adapter engine: knows PyTorch and diffusers, nothing of HTTP or Celery."""

from adapters.sparse_dictionary import (
    AdapterConfigError,
    AdapterHost,
    RoutingError,
    SampleRoute,
    SparseDictionaryAdapter,
    SparseDictionaryConfig,
    base_fingerprint,
)

__all__ = [
    "AdapterConfigError",
    "AdapterHost",
    "RoutingError",
    "SampleRoute",
    "SparseDictionaryAdapter",
    "SparseDictionaryConfig",
    "base_fingerprint",
]
