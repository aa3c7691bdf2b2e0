"""The model a worker process holds: the one frozen base pipeline, its adapter host and cache.

Loaded once per process (never per job), from ``ATOMTUNE_BASE_MODEL`` with the configured
device and dtype. Loading touches neither Redis nor the metrics; ``worker.context`` does both
once the model is in memory.
"""

import logging
import threading
import time
from pathlib import Path

import torch
from diffusers import PixArtSigmaPipeline

from adapters import AdapterHost
from service.core.settings import Settings
from service.core.worker_registry import BaseShape
from worker.cache import AdapterCache

log = logging.getLogger(__name__)


class BaseModelMissing(RuntimeError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def base_model_name(base_model: str) -> str:
    """A hub id as it is; a local folder by its name only (its path is the server's business)."""
    folder = Path(base_model)
    return folder.name if folder.is_dir() else base_model


class Runtime:
    def __init__(self, settings: Settings) -> None:
        if not settings.base_model:
            raise BaseModelMissing("the worker has no base model; set ATOMTUNE_BASE_MODEL")
        started = time.perf_counter()
        self.device = resolve_device(settings.device)
        dtype = getattr(torch, settings.dtype)
        pipeline = PixArtSigmaPipeline.from_pretrained(settings.base_model, torch_dtype=dtype)
        pipeline.to(self.device)
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline
        self.host = AdapterHost(pipeline.transformer)
        self.fingerprint = self.host.fingerprint
        self.cache = AdapterCache(self.host, settings.device_cache_slots, settings.host_cache_bytes)
        # Prompts are padded to this length; the tokenizer's own limit caps it for small models.
        self.max_sequence_length = min(settings.max_sequence_length, pipeline.tokenizer.model_max_length)
        # One pipeline, one job at a time, even if a thread pool were configured; evictions wait
        # for it too, because a running job's forward passes read the host's tables.
        self.lock = threading.Lock()
        # The gateway checks imports and training requests against the base the workers serve.
        attention = pipeline.transformer.transformer_blocks[0].attn1
        self.shape = BaseShape(
            fingerprint=self.fingerprint,
            num_blocks=self.host.num_blocks,
            num_heads=self.host.num_heads,
            in_features=attention.to_q.in_features,
            out_features=attention.to_out[0].out_features,
            sample_size=pipeline.transformer.config.sample_size * pipeline.vae_scale_factor,
            name=base_model_name(settings.base_model),
        )
        log.info(
            "loaded base model %s on %s/%s in %.1f s (fingerprint %s)",
            settings.base_model,
            self.device,
            settings.dtype,
            time.perf_counter() - started,
            self.fingerprint,
        )
