"""Delivers the webhooks of ended jobs (``service.core.webhooks`` has the rules): every worker polls
the due deliveries; one is taken with a lease, so a worker that dies mid-attempt leaves it to be
taken again, and each attempt is recorded on the job. Failed attempts are retried with
exponential backoff (``webhook_backoff_seconds``, doubling) up to ``webhook_max_attempts``.
"""

import json
import logging
import threading
import time
from typing import Any

import httpx
import redis

from service.core.jobs import Job, JobStore
from service.core.redis_db import WEBHOOKS_DUE_KEY, job_key
from service.core.settings import Settings
from service.core.webhooks import WebhookRefused, check_url, payload, pinned, secret_of, sign

log = logging.getLogger(__name__)
LEASE_SECONDS = 60.0
"""How long a taken delivery is left to its worker before another may take it."""
POLL_SECONDS = 0.5

# Takes the first due delivery, leasing it; returns its job id or nil.
_TAKE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
if #due == 0 then return nil end
redis.call('ZADD', KEYS[1], ARGV[1] + ARGV[2], due[1])
return due[1]
"""


class WebhookSender:
    """Takes due deliveries and makes one attempt at each; a worker's thread runs ``send_due``."""

    def __init__(self, db: redis.Redis, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.jobs = JobStore(db)
        self._take = db.register_script(_TAKE_DUE)
        # No keep-alive: a pooled connection is keyed by the address it was pinned to (see ``pinned``).
        limits = httpx.Limits(max_keepalive_connections=0)
        self.client = httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False, limits=limits)

    def send_due(self) -> int:
        """Attempts every delivery due now; returns how many were attempted."""
        attempted = 0
        while (job_id := self._take(keys=[WEBHOOKS_DUE_KEY], args=[time.time(), LEASE_SECONDS])) is not None:
            self.attempt(job_id)
            attempted += 1
        return attempted

    def attempt(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is None or not job.webhook_url:
            self.db.zrem(WEBHOOKS_DUE_KEY, job_id)
            return
        url = job.webhook_url
        status_code, error = None, None
        try:
            addresses = check_url(url, self.settings)
            body = json.dumps(payload(job), separators=(",", ":")).encode()
            timestamp = int(time.time())
            message_id = f"msg_{job.id}"
            headers = {
                "content-type": "application/json",
                "user-agent": "atomtune-webhooks",
                "webhook-id": message_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(secret_of(self.db, job.tenant_id), message_id, timestamp, body),
            }
            status_code = self._post(url, addresses, body, headers).status_code
            if 300 <= status_code < 400:
                error = "the receiver redirected; redirects are not followed"
            elif status_code >= 400:
                error = f"the receiver answered {status_code}"
        except WebhookRefused as exc:
            error = str(exc)
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            # Recorded like a failed attempt, or the delivery would be retaken forever, never recorded.
            log.exception("webhook attempt for job %s failed", job_id)
            error = f"{type(exc).__name__}: {exc}"
        attempt = {"at": time.time(), "status_code": status_code, "error": error}
        self._record(job, attempt, delivered=error is None)

    def _post(self, url: str, addresses: list[str] | None, body: bytes, headers: dict[str, str]) -> httpx.Response:
        """POSTs to each checked address in turn until one connects (to the name, for an allowed host)."""
        refused: httpx.ConnectError | None = None
        for address in addresses or [None]:
            target, host, extensions = pinned(url, address)
            try:
                return self.client.post(target, content=body, headers={**headers, **host}, extensions=extensions)
            except httpx.ConnectError as exc:
                refused = exc
        assert refused is not None
        raise refused

    def _record(self, job: Job, attempt: dict[str, Any], delivered: bool) -> None:
        job_id = job.id
        attempts = [*job.webhook_attempts, attempt]
        final = delivered or len(attempts) >= self.settings.webhook_max_attempts
        status = "delivered" if delivered else ("failed" if final else "retrying")
        with self.db.pipeline(transaction=True) as pipe:
            pipe.hset(
                job_key(job_id),
                mapping={"webhook_attempts": json.dumps(attempts), "webhook_status": status},
            )
            if final:
                pipe.zrem(WEBHOOKS_DUE_KEY, job_id)
            else:
                backoff = self.settings.webhook_backoff_seconds * 2 ** (len(attempts) - 1)
                pipe.zadd(WEBHOOKS_DUE_KEY, {job_id: time.time() + backoff})
            pipe.execute()


def deliver_webhooks(db: redis.Redis, settings: Settings, stop: threading.Event) -> None:
    """A worker thread's loop: sends what is due until ``stop`` is set."""
    sender = WebhookSender(db, settings)
    while not stop.wait(POLL_SECONDS):
        try:
            sender.send_due()
        except Exception:
            log.warning("delivering webhooks failed; retrying", exc_info=True)
