"""A deleted adapter leaves every worker's caches: each pool process listens for the ids that the
catalog publishes when it deletes a record, and drops them from its device and host tiers.

Pub/sub delivers only to those listening at the time, so a notice sent while a process was not
subscribed (starting up, or Redis gone for a while) would be missed. Each time the subscription
is (re)established the process therefore also drops every cached adapter whose record is gone.
"""

import logging
import time

from redis.exceptions import RedisError

from service.core.redis_db import ADAPTER_DELETIONS_CHANNEL
from worker.context import WorkerContext

log = logging.getLogger(__name__)
RETRY_SECONDS = 1.0


def listen_for_deletions(ctx: WorkerContext) -> None:
    """Runs for the life of the process; meant for a daemon thread."""
    while True:
        try:
            with ctx.db.pubsub() as pubsub:
                pubsub.subscribe(ADAPTER_DELETIONS_CHANNEL)
                for message in pubsub.listen():
                    if message["type"] == "subscribe":
                        ctx.evict_all_deleted()
                    elif message["type"] == "message":
                        ctx.evict(message["data"])
        except RedisError:
            log.warning("listening for deleted adapters failed; retrying", exc_info=True)
            time.sleep(RETRY_SECONDS)
