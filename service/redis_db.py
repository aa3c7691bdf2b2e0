"""Redis connections and the names of every key atomtune keeps there (one place, one prefix)."""

import redis
import redis.asyncio as aioredis

PREFIX = "atomtune"


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)


def connect_async(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, decode_responses=True, health_check_interval=30)


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def job_events_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:events"


def tenant_key(tenant_id: str) -> str:
    return f"{PREFIX}:tenant:{tenant_id}"


def tenant_active_jobs_key(tenant_id: str) -> str:
    return f"{PREFIX}:tenant:{tenant_id}:active_jobs"


def tenant_adapters_key(tenant_id: str) -> str:
    return f"{PREFIX}:tenant:{tenant_id}:adapters"


TENANTS_KEY = f"{PREFIX}:tenants"
TENANT_NAMES_KEY = f"{PREFIX}:tenant_names"


def api_key_key(key_id: str) -> str:
    return f"{PREFIX}:api_key:{key_id}"


def adapter_key(adapter_id: str) -> str:
    return f"{PREFIX}:adapter:{adapter_id}"


WORKERS_KEY = f"{PREFIX}:workers"
BASE_FINGERPRINT_KEY = f"{PREFIX}:base_fingerprint"
