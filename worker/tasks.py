"""The task bodies. A message carries a job id only; the job's record holds the typed parameters
(``service.core.contract``), which the gateway checked before it wrote them, so the bodies trust
them; the engine still refuses what it cannot do, with its own errors.

Tasks are idempotent: ``claim`` refuses a job that already ended (a redelivery after success), and
a redelivered half-done job starts over, writing its files into fresh temporary folders that only
replace the final ones when complete.
"""

import json
import logging
import os
import time
from collections.abc import Callable
from functools import partial

from celery import current_task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from PIL import Image
from redis.exceptions import RedisError

from adapters import (
    AdapterConfigError,
    AdapterFormatError,
    RoutingError,
    SparseDictionaryConfig,
    TrainingCancelled,
    TrainingConfig,
    load_adapter,
    save_adapter,
    train_adapter,
)
from service.core.catalog import AdapterRecord
from service.core.contract import (
    CACHE_TIERS,
    AppliedAdapter,
    FinetuneParams,
    FinetuneResult,
    GenerateParams,
    GenerateResult,
    JobError,
    JobResult,
)
from service.core.jobs import Job, JobStore
from service.core.storage import ADAPTER_SUBDIR, ATTRIBUTION_FILE, write_atoms
from worker.context import WorkerContext, context
from worker.runtime import BaseModelMissing, Runtime
from worker.scheduler import AdapterLoader, JobCancelled, Superseded, Ticket

log = logging.getLogger(__name__)
LOSS_CURVE_POINTS = 100
HAND_BACK_SECONDS = 600.0
"""How long a job whose worker lost Redis waits for it to come back before its message goes back instead."""


def _runtime(ctx: WorkerContext) -> Runtime:
    try:
        return ctx.runtime()
    except BaseModelMissing as exc:
        raise JobError("no_base_model", str(exc)) from None


class Reporter:
    """Progress goes to the job record; the reply carries the cancel flag, so checking is free."""

    def __init__(self, jobs: JobStore, job_id: str, attempt: int) -> None:
        self.jobs = jobs
        self.job_id = job_id
        self.attempt = attempt
        self.cancel = jobs.cancel_requested(job_id)
        self.progressing_since: float | None = None
        """When the job began to make progress, where that is later than its claim (a generation
        waits for its place in the batch)."""

    def progress(self, step: int, total: int, loss: float | None = None) -> None:
        try:
            reply = self.jobs.progress(self.job_id, self.attempt, step, total, loss)
        except RedisError:
            # Advisory, and reported again at the next step: a Redis restart must not fail the job.
            log.warning("job %s: reporting progress failed; it goes on", self.job_id, exc_info=True)
            return
        if reply == "stale":
            raise Superseded
        self.cancel = reply == "1"

    def should_stop(self) -> bool:
        return self.cancel


Body = Callable[[WorkerContext, Job, Reporter], JobResult]


def run_job(ctx: WorkerContext, job_id: str, body: Body, worker: str = "", delivery: int = 0) -> None:
    """Runs the job's body between its claim and its finish.

    ``worker`` (the Celery node name) is recorded as the job's holder, whose heartbeat recovery
    watches; ``delivery`` is the message's delivery number, which fences off stale messages.
    Celery acknowledges a task that raises, which would drop the job's only message. So if Redis
    fails the claim, the message is put back instead: its redelivery claims the job (or finds it
    ended). If Redis fails the run or the finish, the job is claimed and this worker alive, so no
    recovery would take it, and kombu cannot put a message back while Redis is away (it would
    wait out the visibility timeout): the job is handed back itself once Redis answers
    (``_hand_back``), and the reconciler sends it again.
    """
    try:
        outcome, attempt = ctx.jobs.claim(job_id, os.getpid(), ctx.settings.max_job_attempts, worker, delivery)
        job = ctx.jobs.get(job_id) if outcome == "claimed" else None
    except RedisError as exc:
        raise Reject(f"claiming job {job_id} failed: {exc}", requeue=True) from exc
    if job is None:
        log.info("job %s not run: %s", job_id, outcome)
        return
    status, result, code, message = "failed", None, "", ""
    reporter = Reporter(ctx.jobs, job_id, attempt)
    try:
        result = body(ctx, job, reporter)
        status = "succeeded"
    except (TrainingCancelled, JobCancelled):
        status = "cancelled"
    except Superseded:
        log.warning("job %s attempt %d was superseded by a redelivery", job_id, attempt)
        return
    except SoftTimeLimitExceeded:
        code = "time_limit"
        message = (
            f"the job ran past its {ctx.settings.job_soft_time_limit_seconds} s limit; "
            "use fewer steps or a smaller size"
        )
    except JobError as exc:
        code, message = exc.code, exc.message
    except (AdapterConfigError, AdapterFormatError, RoutingError) as exc:
        code, message = "invalid_job", str(exc)
    except RedisError as exc:
        # Not the job's fault: it runs again, as a further attempt.
        raise _hand_back(ctx, job_id, attempt, f"job {job_id} lost Redis while running: {exc}") from exc
    except Exception:
        log.exception("job %s failed", job_id)
        code, message = "internal", "the worker failed while running the job; its log has the details"
    try:
        ctx.jobs.finish(job_id, attempt, status, result=result, error_code=code, error_message=message)  # type: ignore[arg-type]
    except RedisError as exc:
        raise _hand_back(ctx, job_id, attempt, f"recording the end of job {job_id} failed: {exc}") from exc
    ctx.metrics.job_finished(job, status, reporter.progressing_since)


def _hand_back(ctx: WorkerContext, job_id: str, attempt: int, reason: str) -> Reject:
    """Waits for Redis (each call already retries for about 30 s), then puts the job back in the
    queue under the next delivery number and drops this message, which that number fences off.
    Should Redis stay away past ``HAND_BACK_SECONDS``, the message itself goes back, as a last resort."""
    log.warning("%s; handing the job back once Redis answers", reason)
    deadline = time.monotonic() + HAND_BACK_SECONDS
    while True:
        try:
            ctx.jobs.release(job_id, attempt)
            return Reject(reason, requeue=False)
        except RedisError:
            if time.monotonic() > deadline:
                return Reject(reason, requeue=True)
            time.sleep(1.0)


def _adapter_of(ctx: WorkerContext, job: Job, adapter_id: str) -> AdapterRecord:
    record = ctx.catalog.get(adapter_id)
    if record is None or record.tenant_id != job.tenant_id:
        raise JobError("adapter_deleted", f"adapter '{adapter_id}' was deleted")
    return record


def _loss_curve(losses: list[float]) -> list[float]:
    if len(losses) <= LOSS_CURVE_POINTS:
        return losses
    size = len(losses) / LOSS_CURVE_POINTS
    chunks = [losses[round(i * size) : round((i + 1) * size)] for i in range(LOSS_CURVE_POINTS)]
    return [sum(chunk) / len(chunk) for chunk in chunks]


def train(ctx: WorkerContext, job: Job, reporter: Reporter) -> FinetuneResult:
    params = FinetuneParams.parse(job.params)
    try:
        record = _adapter_of(ctx, job, params.adapter_id)
        uploads = ctx.storage.uploads_dir(job.tenant_id, record.id)
        images = [Image.open(uploads / name).convert("RGB") for name in params.images]
    except (JobError, FileNotFoundError):
        # Deleting the adapter cancels its job, then removes its record and uploads; a training
        # that starts meanwhile finds them gone, which is that cancel, not a fault.
        if ctx.jobs.cancel_requested(job.id) or ctx.catalog.get(params.adapter_id) is None:
            raise JobCancelled from None
        raise
    runtime = _runtime(ctx)
    config = SparseDictionaryConfig(**params.adapter.model_dump(), base_fingerprint=runtime.fingerprint)
    training = params.training
    training_config = TrainingConfig(
        steps=training.steps,
        learning_rate=training.learning_rate,
        batch_size=training.batch_size,
        seed=training.seed,
        resolution=training.resolution,
        max_sequence_length=runtime.max_sequence_length,
    )
    with runtime.lock:
        result = train_adapter(
            runtime.pipeline,
            runtime.host,
            images,
            params.captions or params.prompt,
            config,
            training_config,
            on_progress=ctx.metrics.finetune_progress(reporter.progress),
            should_stop=reporter.should_stop,
        )
        adapter = result.adapter
        target = ctx.storage.adapter_dir(job.tenant_id, record.id)
        with ctx.storage.replacing(target) as tmp:
            save_adapter(adapter, tmp / ADAPTER_SUBDIR)
            write_atoms(tmp, adapter.importance_scores())
        metrics = {
            "final_loss": result.losses[-1],
            "loss_curve": _loss_curve(result.losses),
            "seconds": result.seconds,
            "steps": len(result.losses),
        }
        if not ctx.catalog.mark_ready(record.id, adapter.config.to_dict(), adapter.blocks, metrics):
            # Its owner deleted it while it trained, which also asked the job to stop.
            ctx.storage.remove_adapter(job.tenant_id, record.id)
            raise JobCancelled
    # Generations run on the generation worker, which loads the adapter on its first use.
    return FinetuneResult(adapter_id=record.id)


def generate(ctx: WorkerContext, job: Job, reporter: Reporter) -> GenerateResult:
    """Hands the generation to the process's scheduler, waits for its last step, stores its images."""
    params = GenerateParams.parse(job.params)
    runtime = _runtime(ctx)
    scheduler = ctx.scheduler()
    loads: dict[str, AdapterLoader] = {}
    for use in params.adapters:
        record = _adapter_of(ctx, job, use.adapter_id)
        folder = ctx.storage.adapter_dir(job.tenant_id, record.id) / ADAPTER_SUBDIR
        limit = ctx.settings.max_adapter_bytes
        loads[use.adapter_id] = partial(load_adapter, folder, expected_fingerprint=runtime.fingerprint, max_bytes=limit)
    # Threads have no soft time limit of Celery's; the scheduler checks this one at every step.
    deadline = time.monotonic() + ctx.settings.job_soft_time_limit_seconds
    ticket = Ticket(job.id, job.tenant_id, reporter.attempt, deadline)
    finished = scheduler.run(scheduler.prepare(params, loads, ticket))
    reporter.progressing_since = finished.admitted_at
    images = scheduler.decode(finished.latents)
    with ctx.storage.replacing(ctx.storage.outputs_dir(job.tenant_id, job.id)) as tmp:
        for index, image in enumerate(images):
            image.save(tmp / f"{index}.png")
        if finished.attribution is not None:
            (tmp / ATTRIBUTION_FILE).write_text(json.dumps(finished.attribution))
    applied = [
        AppliedAdapter(adapter_id=use.adapter_id, scale=use.scale, tier=finished.tiers[use.adapter_id])
        for use in params.adapters
    ]
    return GenerateResult(
        image_count=len(images),
        seed=params.seed,
        adapter_tier=max((a.tier for a in applied), key=CACHE_TIERS.index, default=None),
        adapters=applied,
        batch_size=finished.batch_size,
        attribution=finished.attribution is not None,
    )


def _node() -> str:
    """The Celery node name of the worker running the current task."""
    return str(current_task.request.hostname or "")


def finetune_task(job_id: str, delivery: int = 0) -> None:
    run_job(context(), job_id, train, _node(), delivery)


def generate_task(job_id: str, delivery: int = 0) -> None:
    run_job(context(), job_id, generate, _node(), delivery)
