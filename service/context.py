"""What a gateway process holds for its lifetime, built once from the settings."""

from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
from celery import Celery

from service.core.catalog import AdapterCatalog
from service.core.jobs import EVENT_PING_SECONDS, JobStore, JobWatcher
from service.core.queue import make_celery
from service.core.redis_db import connect, connect_async, connect_streams
from service.core.settings import Settings
from service.core.storage import Storage
from service.core.tenants import TenantStore
from service.rate_limits import RateLimits
from service.stream_slots import StreamSlots


@dataclass
class Services:
    settings: Settings
    db: redis.Redis
    adb: aioredis.Redis
    streams: aioredis.Redis
    tenants: TenantStore
    jobs: JobStore
    watcher: JobWatcher
    stream_slots: StreamSlots
    catalog: AdapterCatalog
    storage: Storage
    celery: Celery
    rate_limits: RateLimits

    @classmethod
    def build(cls, settings: Settings) -> "Services":
        db = connect(settings.redis_url)
        adb = connect_async(settings.redis_url)
        streams = connect_streams(settings.redis_url, max(settings.max_wait_seconds, EVENT_PING_SECONDS))
        return cls(
            settings=settings,
            db=db,
            adb=adb,
            streams=streams,
            tenants=TenantStore(db),
            jobs=JobStore(db),
            watcher=JobWatcher(adb, streams),
            stream_slots=StreamSlots(adb, settings.max_streams_per_tenant),
            catalog=AdapterCatalog(db),
            storage=Storage(settings.data_dir),
            celery=make_celery(settings),
            rate_limits=RateLimits(settings),
        )

    async def close(self) -> None:
        await self.streams.aclose()
        await self.adb.aclose()
        self.db.close()
