"""A per-tenant bound on open event streams and waits: each holds a Redis connection for long.

The count lives in Redis so that the bound holds across gateway processes. Its expiry is the
safety net for a gateway that dies while holding slots: every open holder renews it, so it lapses
(and the count starts over) only once no holder is left to renew it.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.core.redis_db import tenant_streams_key
from service.errors import ApiError

log = logging.getLogger(__name__)
SLOT_TTL_SECONDS = 60
_RENEW_SECONDS = SLOT_TTL_SECONDS / 3

# KEYS[1] = the tenant's counter. ARGV[1] = limit, ARGV[2] = TTL. 1 if a slot was taken, else 0.
_ACQUIRE = """
local open = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
if open > tonumber(ARGV[1]) then
  redis.call('DECR', KEYS[1])
  return 0
end
return 1
"""

# Never below zero: after the counter lapsed, a holder from before it has no slot to give back.
_RELEASE = """
if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then
  redis.call('DECR', KEYS[1])
end
return 0
"""


class StreamSlots:
    def __init__(self, db: aioredis.Redis, limit: int) -> None:
        self.db = db
        self.limit = limit
        self._acquire = db.register_script(_ACQUIRE)
        self._release = db.register_script(_RELEASE)

    @contextlib.asynccontextmanager
    async def hold(self, tenant_id: str) -> AsyncIterator[None]:
        """One slot for the block's duration, or 429 if the tenant has none left."""
        key = tenant_streams_key(tenant_id)
        if not await self._acquire(keys=[key], args=[self.limit, SLOT_TTL_SECONDS]):
            raise ApiError(
                429,
                "too_many_streams",
                f"you have {self.limit} event streams or waits open, the most allowed; close one "
                "(or poll GET /v1/jobs/{id} instead) and retry",
                headers={"Retry-After": "1"},
            )
        renewal = asyncio.create_task(self._renew(key))
        try:
            yield
        finally:
            renewal.cancel()
            # A client that goes away cancels the request; the slot must be given back all the same.
            with anyio.CancelScope(shield=True):
                await self._release(keys=[key])

    async def _renew(self, key: str) -> None:
        while True:
            await asyncio.sleep(_RENEW_SECONDS)
            try:
                await self.db.expire(key, SLOT_TTL_SECONDS)
            except RedisError:
                log.warning("renewing %s failed; retrying", key, exc_info=True)
