"""Redis connections and the names of every key atomtune keeps there (one place, one prefix)."""

import redis
import redis.asyncio as aioredis

PREFIX = "atomtune"


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)


def connect_async(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, decode_responses=True, health_check_interval=30)


# Event streams and waits each hold a connection in XREAD for seconds at a time, so they draw from
# a pool of their own: however many are open, short commands still find a connection. When this
# pool is exhausted a new stream waits this long for a connection, then fails (503), rather than
# opening connections without bound.
STREAM_CONNECTIONS = 200
STREAM_POOL_TIMEOUT_SECONDS = 5.0
STREAM_READ_MARGIN_SECONDS = 10.0


def connect_streams(url: str, longest_block_seconds: float) -> aioredis.Redis:
    """The pool for blocking XREADs of up to ``longest_block_seconds``. Its reads may take that long
    and a little more: redis-py's default socket timeout (5 s since redis-py 8) would cut every
    longer block short with a TimeoutError."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=STREAM_CONNECTIONS,
        timeout=STREAM_POOL_TIMEOUT_SECONDS,
        socket_timeout=longest_block_seconds + STREAM_READ_MARGIN_SECONDS,
        decode_responses=True,
        health_check_interval=30,
    )
    return aioredis.Redis.from_pool(pool)


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def job_events_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:events"


def tenant_key(tenant_id: str) -> str:
    return f"{PREFIX}:tenant:{tenant_id}"


def tenant_active_jobs_key(tenant_id: str) -> str:
    return f"{PREFIX}:tenant:{tenant_id}:active_jobs"


def tenant_streams_key(tenant_id: str) -> str:
    return f"{PREFIX}:tenant:{tenant_id}:open_streams"


def tenant_adapters_key(tenant_id: str) -> str:
    return f"{PREFIX}:tenant:{tenant_id}:adapters"


TENANTS_KEY = f"{PREFIX}:tenants"
TENANT_NAMES_KEY = f"{PREFIX}:tenant_names"


def api_key_key(key_id: str) -> str:
    return f"{PREFIX}:api_key:{key_id}"


def adapter_key(adapter_id: str) -> str:
    return f"{PREFIX}:adapter:{adapter_id}"


# Pub/sub: the id of every deleted adapter, for the workers to drop it from their caches.
ADAPTER_DELETIONS_CHANNEL = f"{PREFIX}:adapter_deletions"

WORKERS_KEY = f"{PREFIX}:workers"
# Jobs a worker has claimed (running, or put back by a recovery and not yet claimed again): the set a
# worker scans for jobs whose claiming worker's heartbeat has stopped.
CLAIMED_JOBS_KEY = f"{PREFIX}:claimed_jobs"
BASE_MODEL_KEY = f"{PREFIX}:base_model"
