"""A worker's Prometheus metrics (docs/metrics.md lists every one).

Each pool process serves its own ``/metrics``: process ``i`` of a worker (0-based) listens on
``ATOMTUNE_WORKER_METRICS_PORT + i``. The jobs, the model and the adapter cache all live in the
pool processes, not in Celery's parent, so each one's numbers are its own; Prometheus adds them
up. This keeps every metric type (the info metric and per-process gauges included), which
prometheus_client's multiprocess mode does not. The default concurrency of 1 means one port per
worker. The parent runs no job, so it serves nothing; a job it records as killed for running
past the hard time limit appears in no job metric.
"""

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from importlib.metadata import version

import torch
from billiard.process import current_process
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.core.jobs import Job
from service.core.settings import Settings
from worker.cache import CacheHit
from worker.runtime import Runtime

log = logging.getLogger(__name__)
# Prometheus stores each `_created` sample as one more series; nothing here reads them.
disable_created_metrics()
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Label values of the step time's `rows`: batch sizes in powers of two, so the set stays small.
ROW_CLASSES = ("1", "2", "3-4", "5-8", "9-16", "17-32", "33-64", "65+")
JOB_KINDS = ("finetune", "generate")
OUTCOMES = ("succeeded", "failed", "cancelled")
_JOB_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
Progress = Callable[[int, int, float | None], None]


def row_class(rows: int) -> str:
    """The step-time label of a batch of ``rows``: its power-of-two class in ``ROW_CLASSES``."""
    for label in ROW_CLASSES[:-1]:
        if rows <= int(label.split("-")[-1]):
            return label
    return ROW_CLASSES[-1]


class _RuntimeCollector(Collector):
    """Reads adapter residency and device memory at scrape time from the process's runtime."""

    def __init__(self, metrics: "WorkerMetrics") -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        resident = GaugeMetricFamily(
            "atomtune_adapters_resident", "Adapters held by a cache tier now, by tier.", labels=["tier"]
        )
        allocated = GaugeMetricFamily(
            "atomtune_device_memory_allocated_bytes", "Accelerator memory held by tensors (CUDA devices only)."
        )
        adapter_bytes = GaugeMetricFamily(
            "atomtune_adapter_device_bytes",
            "Device bytes the resident adapters hold, everything kept for them counted.",
        )
        reserved = GaugeMetricFamily(
            "atomtune_device_memory_reserved_bytes",
            "Accelerator memory reserved by PyTorch's caching allocator (CUDA devices only).",
        )
        runtime = self.metrics.runtime
        if runtime is not None:
            for tier, count in runtime.cache.resident().items():
                resident.add_metric([tier], count)
            adapter_bytes.add_metric([], runtime.cache.device_bytes())
            if runtime.device.type == "cuda":
                allocated.add_metric([], torch.cuda.memory_allocated(runtime.device))
                reserved.add_metric([], torch.cuda.memory_reserved(runtime.device))
        yield resident
        yield adapter_bytes
        yield allocated
        yield reserved


class WorkerMetrics:
    """One pool process's metrics, in a registry of its own, and the hooks that feed them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.runtime: Runtime | None = None
        # Set for one generation step, so the atom-use observer samples it once.
        self._sample_atoms = False
        self._synchronize = False
        ProcessCollector(registry=self.registry)
        self.registry.register(_RuntimeCollector(self))
        registry = self.registry
        self.job_duration = Histogram(
            "atomtune_job_duration_seconds",
            "Time a job ran on this worker, from its claim to its end, by kind and outcome.",
            ["kind", "outcome"],
            buckets=_JOB_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "atomtune_job_queue_wait_seconds",
            "Time from a job's submission to its (latest) start, by kind and outcome.",
            ["kind", "outcome"],
            buckets=_JOB_BUCKETS,
            registry=registry,
        )
        self.step_duration = Histogram(
            "atomtune_denoising_step_seconds",
            "One denoising forward pass of the generation batch, by the batch's rows.",
            ["rows"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=registry,
        )
        self.batch_size = Histogram(
            "atomtune_batch_size",
            "Rows in one denoising step: every request's images, doubled by classifier-free guidance.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.batch_requests = Histogram(
            "atomtune_batch_requests",
            "Generation requests in one denoising step.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.batch_adapters = Histogram(
            "atomtune_batch_adapters",
            "Distinct adapters in one denoising step (0: only the base model).",
            buckets=(0, *BATCH_BUCKETS),
            registry=registry,
        )
        self.batch_capacity = Gauge(
            "atomtune_batch_capacity_rows",
            "Most rows in one denoising step (ATOMTUNE_MAX_BATCH); occupancy is rows per step over this.",
            registry=registry,
        )
        self.cache_hits = Counter(
            "atomtune_adapter_cache_hits_total",
            "Adapter lookups a cache tier answered, by tier.",
            ["tier"],
            registry=registry,
        )
        self.cache_misses = Counter(
            "atomtune_adapter_cache_misses_total",
            "Adapter lookups a cache tier could not answer, by tier.",
            ["tier"],
            registry=registry,
        )
        self.adapter_load = Histogram(
            "atomtune_adapter_load_seconds",
            "Time to make an adapter resident on the device, by the tier it came from (host or storage).",
            ["tier"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )
        self.atoms_active = Histogram(
            "atomtune_atoms_active_per_token",
            "Mean number of atoms with a non-zero coefficient per token, sampled once per adapted denoising step.",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=registry,
        )
        self.finetune_loss = Gauge(
            "atomtune_finetune_loss", "Training loss of the latest fine-tuning step.", registry=registry
        )
        self.finetune_steps = Counter(
            "atomtune_finetune_steps_total", "Fine-tuning steps completed.", registry=registry
        )
        self.finetune_rate = Gauge(
            "atomtune_finetune_steps_per_second",
            "Steps per second of the running (or latest) fine-tune, averaged since its first step.",
            registry=registry,
        )
        self.worker_info = Info(
            "atomtune_worker", "The worker's base model, device, dtype and atomtune version.", registry=registry
        )
        # Every label set exists from the start, at zero: a ratio such as the cache hit rate would
        # otherwise have no series, and so no value, until its first miss.
        for kind in JOB_KINDS:
            for outcome in OUTCOMES:
                self.job_duration.labels(kind, outcome)
                self.queue_wait.labels(kind, outcome)
        for tier in ("device", "host"):
            self.cache_hits.labels(tier)
            self.cache_misses.labels(tier)
        for tier in ("host", "storage"):
            self.adapter_load.labels(tier)
        for rows in ROW_CLASSES:
            self.step_duration.labels(rows)

    def instrument(self, runtime: Runtime, settings: Settings) -> None:
        """Hooks the process's runtime: atom use, residency, memory, info."""
        self._synchronize = runtime.device.type == "cuda"

        def observe_atoms(_block: int, coefficients: torch.Tensor) -> None:
            # One sample per step: counting forces a device sync, and every adapted block would repeat it.
            if self._sample_atoms:
                self._sample_atoms = False
                self.atoms_active.observe((coefficients != 0).sum(-1).float().mean().item())

        runtime.host.add_observer(observe_atoms)
        self.runtime = runtime
        self.batch_capacity.set(settings.max_batch)
        self.worker_info.info(
            {
                "model": settings.base_model or "",
                "device": str(runtime.device),
                "dtype": settings.dtype,
                "version": version("atomtune"),
            }
        )

    @contextmanager
    def denoising_step(self, rows: int, requests: int, adapters: int) -> Iterator[None]:
        """Times the generation batch's forward pass inside and records its make-up."""
        self._sample_atoms = True
        started = time.perf_counter()
        try:
            yield
        finally:
            self._sample_atoms = False
        if self._synchronize:
            # Kernels run asynchronously; without waiting this would time only their launch.
            torch.cuda.synchronize(self.runtime.device if self.runtime else None)
        self.step_duration.labels(row_class(rows)).observe(time.perf_counter() - started)
        self.batch_size.observe(rows)
        self.batch_requests.observe(requests)
        self.batch_adapters.observe(adapters)

    def adapter_acquired(self, hit: CacheHit) -> None:
        if hit.tier == "device":
            self.cache_hits.labels("device").inc()
            return
        self.cache_misses.labels("device").inc()
        if hit.tier == "host":
            self.cache_hits.labels("host").inc()
        else:
            self.cache_misses.labels("host").inc()
        self.adapter_load.labels(hit.tier).observe(hit.seconds)

    def finetune_progress(self, report: Progress) -> Progress:
        """Wraps a fine-tune's progress callback to record its loss and speed."""
        first: tuple[int, float] | None = None

        def progress(step: int, total: int, loss: float | None = None) -> None:
            nonlocal first
            now = time.perf_counter()
            self.finetune_steps.inc()
            if loss is not None:
                self.finetune_loss.set(loss)
            # Timed from the first step, so loading images and encoding the prompt do not count.
            if first is None:
                first = (step, now)
            elif now > first[1]:
                self.finetune_rate.set((step - first[0]) / (now - first[1]))
            report(step, total, loss)

        return progress

    def job_finished(self, job: Job, outcome: str, started_at: float | None = None) -> None:
        """Records a job this process claimed (``job`` as read after the claim) and ran to ``outcome``.

        ``started_at`` is when it began to make progress, if later than its claim: a generation waits
        for a place in the batch after its claim, and that wait is queue wait too."""
        assert job.started_at is not None
        started = max(started_at or job.started_at, job.started_at)
        self.job_duration.labels(job.kind, outcome).observe(max(time.time() - job.started_at, 0.0))
        self.queue_wait.labels(job.kind, outcome).observe(max(started - job.queued_at, 0.0))

    def serve(self, settings: Settings) -> None:
        """Starts this pool process's metrics server; a port in use is logged, never fatal to the worker."""
        if not settings.worker_metrics_port:
            return
        port = settings.worker_metrics_port + (getattr(current_process(), "index", None) or 0)
        try:
            start_http_server(port, addr=settings.host, registry=self.registry)
        except OSError as exc:
            log.warning("worker metrics not served: %s:%d: %s", settings.host, port, exc)
            return
        log.info("worker metrics at http://%s:%d/metrics", settings.host, port)
