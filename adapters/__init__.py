"""The sparse dictionary adapter engine: knows PyTorch and diffusers, nothing of HTTP or Celery."""

from adapters.persistence import AdapterFormatError, load_adapter, save_adapter
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
    "AdapterFormatError",
    "AdapterHost",
    "RoutingError",
    "SampleRoute",
    "SparseDictionaryAdapter",
    "SparseDictionaryConfig",
    "base_fingerprint",
    "load_adapter",
    "save_adapter",
]
