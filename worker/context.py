"""What a worker pool process holds: its Redis stores, the storage, its metrics and, loaded once on
first use, the runtime (the model)."""

import logging
import threading
from collections.abc import Iterable
from functools import cache

import redis

from service.core.catalog import AdapterCatalog
from service.core.jobs import JobStore
from service.core.redis_db import WORKER_RESTART_RETRIES, connect
from service.core.settings import Settings, get_settings
from service.core.storage import Storage
from service.core.worker_registry import publish_base
from worker.metrics import WorkerMetrics
from worker.runtime import Runtime
from worker.scheduler import GenerationScheduler

log = logging.getLogger(__name__)


class WorkerContext:
    def __init__(self, settings: Settings, db: redis.Redis, storage: Storage | None = None) -> None:
        self.settings = settings
        self.db = db
        self.jobs = JobStore(db)
        self.catalog = AdapterCatalog(db)
        self.storage = storage or Storage(settings.data_dir)
        self.metrics = WorkerMetrics()
        self._runtime: Runtime | None = None
        self._scheduler: GenerationScheduler | None = None
        self._runtime_lock = threading.Lock()

    def runtime(self) -> Runtime:
        """The runtime, loaded on first use; a failed load is retried by the next caller.

        Once loaded, the base's shape is published for the gateway to check requests against, and
        the metrics hook the model. Raises ``BaseModelMissing`` without ``ATOMTUNE_BASE_MODEL``.
        """
        with self._runtime_lock:
            if self._runtime is None:
                runtime = Runtime(self.settings)
                publish_base(self.db, runtime.shape)
                self.metrics.instrument(runtime, self.settings)
                self._runtime = runtime
            return self._runtime

    def scheduler(self) -> GenerationScheduler:
        """The process's generation scheduler (its loop thread starts with it), over the runtime."""
        runtime = self.runtime()
        with self._runtime_lock:
            if self._scheduler is None:
                self._scheduler = GenerationScheduler(runtime, self.settings, self.jobs, self.metrics)
            return self._scheduler

    @property
    def loaded_runtime(self) -> Runtime | None:
        """The runtime if it has loaded, without waiting for or starting a load."""
        return self._runtime

    def evict(self, adapter_id: str) -> None:
        """Drops a deleted adapter from the device and host tiers (once no running request uses it)."""
        runtime = self._runtime
        if runtime is None:
            return
        with runtime.lock:
            _discard(runtime, [adapter_id])

    def evict_all_deleted(self) -> None:
        """Drops every cached adapter whose record is gone, whatever deletion notices were missed."""
        runtime = self._runtime
        if runtime is None:
            return
        with runtime.lock:
            cached = runtime.cache.names()
            _discard(runtime, sorted(set(cached) - self.catalog.existing(cached)))


def _discard(runtime: Runtime, adapter_ids: Iterable[str]) -> None:
    for adapter_id in adapter_ids:
        if runtime.cache.discard(adapter_id):
            log.info("adapter %s was deleted; dropped it from the caches", adapter_id)


@cache
def context() -> WorkerContext:
    """The pool process's context, built on first use."""
    settings = get_settings()
    return WorkerContext(settings, connect(settings.redis_url, WORKER_RESTART_RETRIES))
