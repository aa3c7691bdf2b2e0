"""The queue contract: the Celery application that the gateway sends with and the workers run, its
task names and queues.

The settings are the ones that keep jobs: a message is acknowledged only after its task returns
(so tasks must be idempotent), a lost worker process puts it back, each process reserves one
message at a time, and Redis waits longer than the longest job before handing an unacknowledged
message to someone else. Messages carry only a job id; everything else is read from the job's
record (``service.core.contract`` types it).
"""

from celery import Celery

from service.core.contract import JobKind
from service.core.settings import Settings

FINETUNE_QUEUE = "atomtune.finetune"
GENERATE_QUEUE = "atomtune.generate"
QUEUES: dict[JobKind, str] = {"finetune": FINETUNE_QUEUE, "generate": GENERATE_QUEUE}
TASKS: dict[JobKind, str] = {"finetune": "atomtune.finetune", "generate": "atomtune.generate"}


def make_celery(settings: Settings) -> Celery:
    app = Celery("atomtune", broker=settings.redis_url)
    transport = {"visibility_timeout": settings.visibility_timeout_seconds}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_time_limit=settings.job_time_limit_seconds,
        task_soft_time_limit=settings.job_soft_time_limit_seconds,
        # Job state lives in our own records; Celery's result backend would be a second copy.
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_routes={TASKS[kind]: {"queue": QUEUES[kind]} for kind in TASKS},
        task_default_queue=GENERATE_QUEUE,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # On a cold shutdown (SIGQUIT), running tasks get this long, then go back to the queue.
        worker_soft_shutdown_timeout=10.0,
    )
    return app


def enqueue(app: Celery, kind: JobKind, job_id: str, delivery: int = 0) -> None:
    """Sends the job's message; ``delivery`` is the job's delivery number (0 until a recovery resends it)."""
    app.send_task(TASKS[kind], args=[job_id, delivery], queue=QUEUES[kind])
