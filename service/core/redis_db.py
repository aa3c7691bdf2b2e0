"""Redis connections and the names of every key atomtune keeps there (one place, one prefix)."""

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

PREFIX = "atomtune"
# A call that finds Redis gone retries for about 3 s (0.1, 0.2, 0.4, then 0.5 s apart), which rides
# through a restart, before it fails (the gateway answers 503). A worker waits about 30 s: a job
# whose claim or end it cannot record must put its message back, which needs Redis too.
RESTART_RETRIES = 8
WORKER_RESTART_RETRIES = 64
RESTART_BACKOFF_CAP_SECONDS = 0.5
RESTART_BACKOFF_BASE_SECONDS = 0.1


def _backoff() -> ExponentialBackoff:
    return ExponentialBackoff(cap=RESTART_BACKOFF_CAP_SECONDS, base=RESTART_BACKOFF_BASE_SECONDS)


def connect(url: str, retries: int = RESTART_RETRIES) -> redis.Redis:
    """``retries=0`` for a quick yes or no (is anything listening?)."""
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30, retry=Retry(_backoff(), retries))


def connect_async(url: str) -> aioredis.Redis:
    retries = AsyncRetry(_backoff(), RESTART_RETRIES)
    return aioredis.Redis.from_url(url, decode_responses=True, health_check_interval=30, retry=retries)


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
        retry=AsyncRetry(_backoff(), RESTART_RETRIES),
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
# Jobs waiting for a worker (status queued), scored by when they were last queued (submitted, put
# back by a recovery or sent again): where the reconciler looks for jobs whose message the broker
# lost (``service.core.reconciler``). The job's own ``queued_at`` stays its submission time.
QUEUED_JOBS_KEY = f"{PREFIX}:queued_jobs"
MISSING_MESSAGES_KEY = f"{PREFIX}:reconciler:missing"
"""Queued jobs one check found no message for: job id → the delivery number that was missing."""
RECONCILER_LOCK_KEY = f"{PREFIX}:reconciler:lock"
BASE_MODEL_KEY = f"{PREFIX}:base_model"
# Retention: what ended when (sorted sets scored by the end time), for the sweep to remove when due:
# job ids, "<tenant>/<job>" of generations' images, "<tenant>/<adapter>" of fine-tunes' uploads.
ENDED_JOBS_KEY = f"{PREFIX}:retention:jobs"
ENDED_OUTPUTS_KEY = f"{PREFIX}:retention:outputs"
ENDED_UPLOADS_KEY = f"{PREFIX}:retention:uploads"
RETENTION_REMOVED_KEY = f"{PREFIX}:retention:removed"
"""Counts of what the sweeps removed, by kind (a hash), for the gateway's metrics."""
RETENTION_LOCK_KEY = f"{PREFIX}:retention:lock"
WEBHOOKS_DUE_KEY = f"{PREFIX}:webhooks:due"
"""Ended jobs with a webhook to deliver, scored by when the next attempt is due."""
