"""The Celery application of the workers: ``celery -A worker.app worker`` (or ``atomtune worker``).

It registers the task bodies of ``worker.tasks`` under the queue contract's names, and wires in
through signals what Celery does not do by itself: a heartbeat the gateway's ``/readyz`` reads;
in each pool process, the metrics server, loading the base model as soon as it starts, and
listening for deleted adapters; and recording a hard time limit in the job (the process that ran
it is gone, so only the parent can).
"""

import logging
import threading
from typing import Any

from celery.exceptions import TimeLimitExceeded
from celery.signals import (
    task_failure,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from service.core import worker_registry
from service.core.jobs import JobStore
from service.core.queue import TASKS, make_celery
from service.core.redis_db import connect
from service.core.settings import get_settings
from worker import tasks
from worker.context import context
from worker.eviction import listen_for_deletions
from worker.runtime import BaseModelMissing

log = logging.getLogger(__name__)
settings = get_settings()
app = make_celery(settings)
app.task(name=TASKS["finetune"])(tasks.finetune_task)
app.task(name=TASKS["generate"])(tasks.generate_task)

_stop_heartbeat = threading.Event()
_stop_listening = threading.Event()


def _heartbeat(name: str) -> None:
    db = connect(settings.redis_url)
    while True:
        try:
            worker_registry.beat(db, name)
        except Exception:
            log.warning("heartbeat to Redis failed; retrying", exc_info=True)
        if _stop_heartbeat.wait(settings.worker_heartbeat_seconds):
            break
    worker_registry.leave(db, name)


@worker_ready.connect
def _start_heartbeat(sender: Any, **_: Any) -> None:
    threading.Thread(target=_heartbeat, args=(sender.hostname,), name="heartbeat", daemon=True).start()


@worker_shutdown.connect
def _leave(**_: Any) -> None:
    _stop_heartbeat.set()


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
