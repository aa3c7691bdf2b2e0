"""A deleted adapter leaves every worker's caches: each pool process listens for the ids that the
catalog publishes when it deletes a record, and drops them from its device and host tiers.

Pub/sub delivers only to those listening at the time, so a notice sent while a process was not
subscribed (starting up, or Redis gone for a while) would be missed. Each time the subscription
is (re)established the process therefore also drops every cached adapter whose record is gone.
"""

import logging
import threading

from redis.exceptions import RedisError

from service.core.redis_db import ADAPTER_DELETIONS_CHANNEL
from worker.context import WorkerContext

log = logging.getLogger(__name__)
RETRY_SECONDS = 1.0
# How long a wait for a notice lasts before the stop flag is looked at again.
POLL_SECONDS = 1.0


def listen_for_deletions(ctx: WorkerContext, stop: threading.Event) -> None:
    """Drops deleted adapters from ``ctx``'s caches until ``stop`` is set; meant for a thread."""
    while not stop.is_set():
        try:
            with ctx.db.pubsub() as pubsub:
                pubsub.subscribe(ADAPTER_DELETIONS_CHANNEL)
                while not stop.is_set():
                    message = pubsub.get_message(timeout=POLL_SECONDS)
                    if message is None:
                        continue
                    # A (re)subscription is confirmed by a message too: the moment to catch up.
                    if message["type"] == "subscribe":
                        ctx.evict_all_deleted()
                    elif message["type"] == "message":
                        ctx.evict(message["data"])
        except RedisError:
            log.warning("listening for deleted adapters failed; retrying", exc_info=True)
            stop.wait(RETRY_SECONDS)
