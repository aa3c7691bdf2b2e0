"""The queue contract: the Celery application that the gateway sends with and the workers run, its
task names and queues.

The settings are the ones that keep jobs: a message is acknowledged only after its task returns
(so tasks must be idempotent), a lost worker process puts it back, each process reserves one
message at a time, and Redis waits longer than the longest job before handing an unacknowledged
message to someone else. Messages carry only a job id; everything else is read from the job's
record (``service.core.contract`` types it). Each message's task id names its job and delivery
number (``message_id``), so what the broker holds can be read back (``messages_held``).
"""

import json

import redis
from celery import Celery
from kombu.transport.redis import PRIORITY_STEPS, Channel

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


def message_id(job_id: str, delivery: int) -> str:
    return f"{job_id}.{delivery}"


def enqueue(app: Celery, kind: JobKind, job_id: str, delivery: int = 0) -> None:
    """Sends the job's message; ``delivery`` is the job's delivery number (0 until a recovery resends it)."""
    app.send_task(TASKS[kind], args=[job_id, delivery], queue=QUEUES[kind], task_id=message_id(job_id, delivery))


def messages_held(db: redis.Redis, delivered_since: float) -> set[str]:
    """The task ids of the messages the broker holds for someone to run: waiting in a queue (at
    any priority), or delivered to a worker since ``delivered_since`` (a timestamp) and not yet
    acknowledged. One transaction, so a message moving from its queue to the unacknowledged ones
    is seen in one place or the other.

    A message delivered longer ago whose job was never claimed is counted out: it went to a
    consumer whose connection broke before it ran, and kombu puts such a message back only when
    that consumer's channel closes cleanly, or after the visibility timeout. This reads kombu's
    Redis layout (a list per queue and priority, a hash and an index of unacknowledged messages),
    which ``tests/service/test_reconciler.py`` checks against real deliveries."""
    lists = [
        queue if not step else f"{queue}{Channel.sep}{step}" for queue in QUEUES.values() for step in PRIORITY_STEPS
    ]
    with db.pipeline(transaction=True) as pipe:
        for key in lists:
            pipe.lrange(key, 0, -1)
        pipe.hgetall(Channel.unacked_key)
        pipe.zrangebyscore(Channel.unacked_index_key, delivered_since, "+inf")
        *waiting, unacked, recent = pipe.execute()
    held = {_task_id(json.loads(raw)) for queue in waiting for raw in queue}
    return held | {_task_id(json.loads(unacked[tag])[0]) for tag in recent if tag in unacked}


def _task_id(message: object) -> str:
    # A message not of Celery's protocol (another producer's) holds no job of ours.
    try:
        return str(message["headers"]["id"])  # type: ignore[index]
    except (KeyError, TypeError):
        return ""
