"""Which workers are alive: each worker refreshes its score (a timestamp) in one sorted set."""

import time

import redis

from service.redis_db import WORKERS_KEY

# A worker is alive while its last heartbeat is younger than this many heartbeat periods.
_MISSED_BEATS = 3


def beat(db: redis.Redis, name: str) -> None:
    db.zadd(WORKERS_KEY, {name: time.time()})


def leave(db: redis.Redis, name: str) -> None:
    db.zrem(WORKERS_KEY, name)


def alive(db: redis.Redis, heartbeat_seconds: float) -> list[str]:
    cutoff = time.time() - _MISSED_BEATS * heartbeat_seconds
    db.zremrangebyscore(WORKERS_KEY, "-inf", f"({cutoff}")
    return list(db.zrangebyscore(WORKERS_KEY, cutoff, "+inf"))
