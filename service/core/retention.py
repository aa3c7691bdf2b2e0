"""Retention: ended jobs' records, generated images and training uploads are removed once their
time is up (settings: ``job_retention_seconds``, ``output_retention_seconds``,
``upload_retention_seconds``); adapters stay until their owner deletes them.

A job's end (the one Lua ``terminate``) files it in three sorted sets scored by its end time; a
sweep takes what is due from each, removes it and counts it. Workers sweep (they see the data
dir), one at a time: the first to take the lock sweeps, once per ``retention_sweep_seconds``.
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass

import redis

from service.core.redis_db import (
    ENDED_JOBS_KEY,
    ENDED_OUTPUTS_KEY,
    ENDED_UPLOADS_KEY,
    RETENTION_LOCK_KEY,
    RETENTION_REMOVED_KEY,
    job_events_key,
    job_key,
)
from service.core.settings import Settings
from service.core.storage import Storage

SWEEP_BATCH = 500
"""Entries taken from a set per round trip: a sweep removes everything due, a batch at a time."""


@dataclass(frozen=True)
class Swept:
    jobs: int = 0
    outputs: int = 0
    uploads: int = 0


def _due(db: redis.Redis, key: str, cutoff: float) -> Iterator[list[str]]:
    while batch := db.zrangebyscore(key, "-inf", cutoff, start=0, num=SWEEP_BATCH):
        yield batch
        db.zrem(key, *batch)


def sweep(db: redis.Redis, storage: Storage, settings: Settings, now: float | None = None) -> Swept:
    """Removes everything whose retention has run out at ``now``; returns what it removed."""
    now = time.time() if now is None else now
    outputs = uploads = jobs = 0
    for batch in _due(db, ENDED_OUTPUTS_KEY, now - settings.output_retention_seconds):
        for member in batch:
            tenant_id, job_id = member.split("/", 1)
            outputs += storage.remove(storage.outputs_dir(tenant_id, job_id))
    for batch in _due(db, ENDED_UPLOADS_KEY, now - settings.upload_retention_seconds):
        for member in batch:
            # A fine-tune reads its uploads only while its one job runs.
            tenant_id, adapter_id = member.split("/", 1)
            uploads += storage.remove(storage.uploads_dir(tenant_id, adapter_id))
    for batch in _due(db, ENDED_JOBS_KEY, now - settings.job_retention_seconds):
        with db.pipeline(transaction=False) as pipe:
            for job_id in batch:
                pipe.delete(job_key(job_id), job_events_key(job_id))
            jobs += sum(1 for removed in pipe.execute() if removed)
    swept = Swept(jobs=jobs, outputs=outputs, uploads=uploads)
    with db.pipeline(transaction=False) as pipe:
        for kind, count in vars(swept).items():
            pipe.hincrby(RETENTION_REMOVED_KEY, kind, count)
        pipe.execute()
    return swept


def sweep_if_due(db: redis.Redis, storage: Storage, settings: Settings, sweeper: str) -> Swept | None:
    """Sweeps unless another worker did within the sweep period; None when it did not sweep."""
    period = max(1, round(settings.retention_sweep_seconds))
    if not db.set(RETENTION_LOCK_KEY, sweeper, nx=True, ex=period):
        return None
    return sweep(db, storage, settings)


def removed_counts(db: redis.Redis) -> dict[str, int]:
    """What every sweep so far removed, by kind."""
    counts = db.hgetall(RETENTION_REMOVED_KEY)
    return {kind: int(counts.get(kind, 0)) for kind in vars(Swept())}
