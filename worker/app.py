"""The Celery application of the workers: ``celery -A worker.app worker`` (or ``atomtune worker``).

Signals wire in what Celery does not do by itself: a heartbeat the gateway's ``/readyz`` reads,
loading the base model as soon as a pool process starts, and recording a hard time limit in
the job (the process that ran it is gone, so only the parent can).
"""

import logging
import threading
from typing import Any

from celery.exceptions import TimeLimitExceeded
from celery.signals import task_failure, worker_process_init, worker_ready, worker_shutdown

from service import workers_registry
from service.queue import make_celery
from service.redis_db import connect
from service.settings import get_settings
from worker import metrics

log = logging.getLogger(__name__)
settings = get_settings()
app = make_celery(settings, include=["worker.tasks"])

_stop_heartbeat = threading.Event()


def _heartbeat(name: str) -> None:
    db = connect(settings.redis_url)
    while True:
        try:
            workers_registry.beat(db, name)
        except Exception:
            log.warning("heartbeat to Redis failed; retrying", exc_info=True)
        if _stop_heartbeat.wait(settings.worker_heartbeat_seconds):
            break
    workers_registry.leave(db, name)


@worker_ready.connect
def _start_heartbeat(sender: Any, **_: Any) -> None:
    threading.Thread(target=_heartbeat, args=(sender.hostname,), name="heartbeat", daemon=True).start()


@worker_shutdown.connect
def _leave(**_: Any) -> None:
    _stop_heartbeat.set()


@worker_process_init.connect
def _preload(**_: Any) -> None:
    metrics.serve(settings)
    # In a thread: this signal must return within seconds, a base model can take minutes.
    from worker.runtime import BaseModelMissing, get_runtime

    def load() -> None:
        try:
            get_runtime(settings)
        except BaseModelMissing as exc:
            log.error("%s", exc)
        except Exception:
            log.exception("loading the base model failed; the next job retries it")

    threading.Thread(target=load, name="preload", daemon=True).start()


@task_failure.connect
def _record_hard_time_limit(exception: BaseException | None = None, args: Any = None, **_: Any) -> None:
    if not isinstance(exception, TimeLimitExceeded) or not args:
        return
    from worker.tasks import context

    jobs = context().jobs
    job = jobs.get(args[0])
    if job is not None:
        message = f"the job ran past its {settings.job_time_limit_seconds} s hard limit and was stopped"
        jobs.finish(job.id, job.attempts, "failed", error_code="time_limit", error_message=message)
