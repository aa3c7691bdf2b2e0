"""Finds queued jobs whose message the broker lost, and sends each a new one.

A job's record can say queued while no message for it exists: Redis restarted from an append-only
file that missed its last second of writes, a worker's connection dropped between taking a
message from its queue and recording it as unacknowledged (two steps in kombu), a message was
delivered to a consumer whose connection broke before it ran the task (kombu leaves it
unacknowledged until the visibility timeout), or a recovery's message could not be sent. Nothing
would run such a job for an hour or ever. So once per heartbeat period one worker (a lock)
checks every job queued for longer than ``lost_message_seconds`` against the messages the broker
holds for someone to run (waiting, or delivered within that time: a delivered message is claimed
within moments); a job whose message is missing at two checks in a row (one check may fall
between kombu's two steps) gets the next delivery number and a new message. The claim
refuses the old number, so should the old message turn up after all, the job still runs once.
"""

import time

import redis
from celery import Celery

from service.core.jobs import JobStore
from service.core.queue import enqueue, message_id, messages_held
from service.core.redis_db import MISSING_MESSAGES_KEY, RECONCILER_LOCK_KEY
from service.core.settings import Settings


def resend_lost(app: Celery, jobs: JobStore, settings: Settings, reconciler: str) -> list[str]:
    """Sends a new message for every job that lost its own; returns their ids. Does nothing when
    another worker checked within the heartbeat period."""
    db: redis.Redis = jobs.db
    period_ms = max(1, round(settings.worker_heartbeat_seconds * 1000))
    if not db.set(RECONCILER_LOCK_KEY, reconciler, nx=True, px=period_ms):
        return []
    cutoff = time.time() - settings.lost_message_seconds
    queued = jobs.queued_before(cutoff)
    missing_before = db.hgetall(MISSING_MESSAGES_KEY) if queued else {}
    held = messages_held(db, delivered_since=cutoff) if queued else set()
    missing = {job_id: entry for job_id, entry in queued.items() if message_id(job_id, entry[1]) not in held}
    resent = []
    for job_id, (kind, delivery) in missing.items():
        if missing_before.get(job_id) != str(delivery):
            continue
        new_delivery = jobs.requeue(job_id, delivery)
        if new_delivery is not None:
            # Should sending fail, the job is queued under a number no message carries: found again.
            enqueue(app, kind, job_id, new_delivery)
            resent.append(job_id)
    with db.pipeline(transaction=True) as pipe:
        pipe.delete(MISSING_MESSAGES_KEY)
        still_missing = {job_id: delivery for job_id, (_, delivery) in missing.items() if job_id not in resent}
        if still_missing:
            pipe.hset(MISSING_MESSAGES_KEY, mapping=still_missing)
        pipe.execute()
    return resent
