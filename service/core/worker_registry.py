"""What the workers publish: which are alive (each refreshes its score, a timestamp, in one sorted
set) and the shape of the base model they serve, which the gateway checks requests against."""

import socket
import time
from dataclasses import asdict, dataclass

import redis

from service.core.redis_db import BASE_MODEL_KEY, WORKERS_KEY

# A worker is alive while its last heartbeat is younger than this many heartbeat periods.
_MISSED_BEATS = 3


def node_name(base: str, queue: str) -> str:
    """The Celery node name of the ``queue``'s worker in a group named ``base`` (``name@host``), so
    whoever started the group knows whose heartbeat to retire when it dies."""
    local, _, host = base.partition("@")
    return f"{local}-{queue}@{host or socket.gethostname()}"


def beat(db: redis.Redis, name: str) -> None:
    db.zadd(WORKERS_KEY, {name: time.time()})


def leave(db: redis.Redis, name: str) -> None:
    db.zrem(WORKERS_KEY, name)


def cutoff(heartbeat_seconds: float) -> float:
    """Workers whose last heartbeat is older than this timestamp are taken for dead."""
    return time.time() - _MISSED_BEATS * heartbeat_seconds


def alive(db: redis.Redis, heartbeat_seconds: float) -> list[str]:
    cutoff_time = cutoff(heartbeat_seconds)
    db.zremrangebyscore(WORKERS_KEY, "-inf", f"({cutoff_time}")
    return list(db.zrangebyscore(WORKERS_KEY, cutoff_time, "+inf"))


@dataclass(frozen=True)
class BaseShape:
    """The base model's identity and the dimensions an adapter must match."""

    fingerprint: str
    num_blocks: int
    num_heads: int
    in_features: int
    out_features: int
    sample_size: int | None = None
    """The image side the base was trained at, in pixels; None from a worker that predates it."""
    name: str | None = None
    """What clients call the base (its hub id, or its folder's name), e.g. as an OpenAI ``model``."""


def publish_base(db: redis.Redis, shape: BaseShape) -> None:
    db.hset(BASE_MODEL_KEY, mapping={k: v for k, v in asdict(shape).items() if v is not None})


def base_shape(db: redis.Redis) -> BaseShape | None:
    """The served base, or None until a worker has loaded it."""
    data = db.hgetall(BASE_MODEL_KEY)
    if not data:
        return None
    return BaseShape(
        fingerprint=data["fingerprint"],
        num_blocks=int(data["num_blocks"]),
        num_heads=int(data["num_heads"]),
        in_features=int(data["in_features"]),
        out_features=int(data["out_features"]),
        sample_size=int(data["sample_size"]) if "sample_size" in data else None,
        name=data.get("name"),
    )
