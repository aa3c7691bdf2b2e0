"""The Celery application of the workers: ``celery -A worker.app worker`` (or ``atomtune worker``).

It registers the task bodies of ``worker.tasks`` under the queue contract's names, and wires in
through signals what Celery does not do by itself: a heartbeat the gateway's ``/readyz`` reads,
and with it the recovery of jobs whose worker died; beside it, housekeeping: the reconciler of
lost messages and the retention sweep (``service.core.retention``); the delivery of webhooks
(``worker.webhooks``); in each process that runs jobs (a prefork pool process, or the worker
itself with the thread pool of a generation worker), the metrics server, loading the base model
as soon as it starts, and listening for deleted adapters; and recording a hard time limit in the
job (the process that ran it is gone, so only the parent can).

Recovery: a thread pool runs its tasks in the worker's own process, so a SIGKILL leaves no parent
to put their messages back, and Redis returns an unacknowledged message only after the visibility
timeout (longer than the longest job). So every worker, at each heartbeat, looks for claimed jobs
whose holder's heartbeat has stopped, and puts each back with a new message under the next
delivery number (``JobStore.recover``); a claim refuses any message with an older number, so the
dead worker's own message, when Redis finally returns it, never runs the job a second time. A
job whose message the broker lost altogether (or whose recovery could not send one) is sent again
by the reconciler (``service.core.reconciler``), once per heartbeat period.
"""

import logging
import threading
from typing import Any

from celery.concurrency import get_implementation
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.exceptions import TimeLimitExceeded
from celery.signals import (
    task_failure,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)
from redis.exceptions import RedisError

from service.core import worker_registry
from service.core.jobs import JobStore
from service.core.queue import TASKS, enqueue, make_celery
from service.core.reconciler import resend_lost
from service.core.redis_db import WORKER_RESTART_RETRIES, connect
from service.core.retention import sweep_if_due
from service.core.settings import get_settings
from service.core.storage import Storage
from worker import tasks
from worker.context import context
from worker.eviction import listen_for_deletions
from worker.runtime import BaseModelMissing
from worker.webhooks import deliver_webhooks

log = logging.getLogger(__name__)
settings = get_settings()
app = make_celery(settings)
app.task(name=TASKS["finetune"])(tasks.finetune_task)
app.task(name=TASKS["generate"])(tasks.generate_task)

_stop_heartbeat = threading.Event()
_stop_listening = threading.Event()


def _heartbeat(name: str) -> None:
    db = connect(settings.redis_url, WORKER_RESTART_RETRIES)
    jobs = JobStore(db)
    while True:
        try:
            worker_registry.beat(db, name)
            recover_orphans(jobs, name)
        except Exception:
            log.warning("heartbeat to Redis failed; retrying", exc_info=True)
        if _stop_heartbeat.wait(settings.worker_heartbeat_seconds):
            break
    worker_registry.leave(db, name)


def _housekeeping(name: str) -> None:
    """The reconciler and the retention sweep, in a thread of their own: however long they take
    (a long queue to read, many files to remove), the heartbeat keeps its beat."""
    jobs = JobStore(connect(settings.redis_url, WORKER_RESTART_RETRIES))
    storage = Storage(settings.data_dir)
    while not _stop_heartbeat.wait(settings.worker_heartbeat_seconds):
        try:
            for job_id in resend_lost(app, jobs, settings, name):
                log.warning("job %s was queued but its message was lost; sent it again", job_id)
        except Exception:
            log.warning("looking for lost messages failed; retrying", exc_info=True)
        try:
            swept = sweep_if_due(jobs.db, storage, settings, name)
            if swept is not None and any(vars(swept).values()):
                log.info("retention removed %s", swept)
        except Exception:
            log.warning("the retention sweep failed; retrying", exc_info=True)


def recover_orphans(jobs: JobStore, name: str) -> None:
    """Puts back every claimed job whose worker's heartbeat has stopped, each with a fresh message.

    A recovered job is held by this worker until a message claims it, so nobody else recovers it
    while this worker lives; a message it could not send (the broker down) is the reconciler's to
    send again.
    """
    cutoff = worker_registry.cutoff(settings.worker_heartbeat_seconds)
    for job_id in jobs.orphans(cutoff):
        try:
            recovered = jobs.recover(job_id, cutoff, name)
        except RedisError:
            log.warning("recovering job %s failed; retrying at the next heartbeat", job_id, exc_info=True)
            continue
        if recovered is None:
            continue
        kind, delivery = recovered
        try:
            enqueue(app, kind, job_id, delivery)
        except Exception:
            log.warning("queueing recovered job %s failed; the reconciler sends it later", job_id, exc_info=True)
            continue
        log.warning("job %s lost its worker; queued it again (delivery %d)", job_id, delivery)


@worker_ready.connect
def _start_heartbeat(sender: Any, **_: Any) -> None:
    threading.Thread(target=_heartbeat, args=(sender.hostname,), name="heartbeat", daemon=True).start()
    threading.Thread(target=_housekeeping, args=(sender.hostname,), name="housekeeping", daemon=True).start()
    webhooks = (connect(settings.redis_url, WORKER_RESTART_RETRIES), settings, _stop_heartbeat)
    threading.Thread(target=deliver_webhooks, args=webhooks, name="webhooks", daemon=True).start()


@worker_shutdown.connect
def _leave(**_: Any) -> None:
    _stop_heartbeat.set()
    _stop_listening.set()


@worker_init.connect
def _start_thread_pool_worker(sender: Any, **_: Any) -> None:
    # Prefork pool processes start their own (below); the thread pool runs jobs in this process.
    pool = get_implementation(sender.pool_cls)
    if not (isinstance(pool, type) and issubclass(pool, PreforkPool)):
        _start_pool_process()


@worker_process_init.connect
def _start_pool_process(**_: Any) -> None:
    ctx = context()
    ctx.metrics.serve(settings)

    # In a thread: this signal must return within seconds, a base model can take minutes.
    def load() -> None:
        try:
            ctx.runtime()
        except BaseModelMissing as exc:
            log.error("%s", exc)
        except Exception:
            log.exception("loading the base model failed; the next job retries it")

    threading.Thread(target=load, name="preload", daemon=True).start()
    threading.Thread(target=listen_for_deletions, args=(ctx, _stop_listening), name="evictions", daemon=True).start()


@worker_process_shutdown.connect
def _stop_pool_process(**_: Any) -> None:
    _stop_listening.set()


@task_failure.connect
def _record_hard_time_limit(exception: BaseException | None = None, args: Any = None, **_: Any) -> None:
    if not isinstance(exception, TimeLimitExceeded) or not args:
        return
    # This runs in the parent, which holds no pool process's context.
    jobs = JobStore(connect(settings.redis_url))
    job = jobs.get(args[0])
    if job is not None:
        message = f"the job ran past its {settings.job_time_limit_seconds} s hard limit and was stopped"
        jobs.finish(job.id, job.attempts, "failed", error_code="time_limit", error_message=message)
