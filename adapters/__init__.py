"""The sparse dictionary adapter engine: knows PyTorch and diffusers, nothing of HTTP or Celery."""

from adapters.persistence import AdapterFormatError, load_adapter, load_adapter_for_base, save_adapter
from adapters.sparse_dictionary import (
    MAX_COMPOSED,
    AdapterConfigError,
    AdapterHost,
    GuidanceBranch,
    RoutingError,
    SampleRoute,
    SparseDictionaryAdapter,
    SparseDictionaryConfig,
    base_fingerprint,
    guided_routes,
)
from adapters.tiny import TINY_MAX_SEQUENCE_LENGTH, build_tiny_pipeline, save_tiny_pipeline
from adapters.training import (
    BASELINE_METHODS,
    TrainingCancelled,
    TrainingConfig,
    TrainingResult,
    train_adapter,
    train_baseline,
)

__all__ = [
    "BASELINE_METHODS",
    "MAX_COMPOSED",
    "TINY_MAX_SEQUENCE_LENGTH",
    "AdapterConfigError",
    "AdapterFormatError",
    "AdapterHost",
    "GuidanceBranch",
    "RoutingError",
    "SampleRoute",
    "SparseDictionaryAdapter",
    "SparseDictionaryConfig",
    "TrainingCancelled",
    "TrainingConfig",
    "TrainingResult",
    "base_fingerprint",
    "build_tiny_pipeline",
    "guided_routes",
    "load_adapter",
    "load_adapter_for_base",
    "save_adapter",
    "save_tiny_pipeline",
    "train_adapter",
    "train_baseline",
]
