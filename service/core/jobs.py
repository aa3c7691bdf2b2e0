"""Job state in Redis: one hash per job, an event stream per job, and atomic state transitions.

Every transition is a Lua script so that the gateway (cancel) and a worker (claim, progress,
finish) can never interleave into an impossible state. A job's ``attempts`` counter fences off a
worker whose delivery was superseded by a redelivery: its progress and result are ignored.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import redis
import redis.asyncio as aioredis

from service.core.contract import JobKind, JobParams, JobResult
from service.core.redis_db import (
    CLAIMED_JOBS_KEY,
    ENDED_JOBS_KEY,
    ENDED_OUTPUTS_KEY,
    ENDED_UPLOADS_KEY,
    QUEUED_JOBS_KEY,
    WEBHOOKS_DUE_KEY,
    WORKERS_KEY,
    job_events_key,
    job_key,
    tenant_active_jobs_key,
)

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
EVENTS_MAXLEN = 1000
EVENT_PING_SECONDS = 15.0
"""How long an event stream waits for a change before it sends a keep-alive."""
WAIT_CHECK_SECONDS = 0.5
"""How often a ``wait`` looks at its deadline and asks whether its client is still there."""
FINISHED_EVENTS_TTL_SECONDS = 24 * 3600


@dataclass(frozen=True)
class Job:
    id: str
    tenant_id: str
    kind: JobKind
    status: JobStatus
    params: dict[str, Any]
    """As stored: read it with the kind's message class (``service.core.contract``)."""
    adapter_id: str | None
    step: int
    total: int
    loss: float | None
    queued_at: float
    started_at: float | None
    finished_at: float | None
    error_code: str | None
    error_message: str | None
    result: dict[str, Any] | None
    """As stored: read it with ``contract.parse_result``."""
    attempts: int
    worker_pid: int | None
    worker: str | None
    """The Celery node name of the worker that claimed the job last (or put it back after a crash)."""
    delivery: int
    """Which message may claim the job: a recovery bumps it, so a message sent before is stale."""
    cancel_requested: bool
    webhook_url: str | None = None
    webhook_status: str | None = None
    """``pending`` from the job's end until a delivery succeeds (``delivered``) or gives up (``failed``);
    ``retrying`` between attempts."""
    webhook_attempts: list[dict[str, Any]] = field(default_factory=list)
    """Each attempt: ``at`` (Unix time), ``status_code`` (None without a response) and ``error``."""

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def _opt_float(value: str | None) -> float | None:
    return float(value) if value else None


def parse_job(job_id: str, data: dict[str, str]) -> Job:
    return Job(
        id=job_id,
        tenant_id=data["tenant_id"],
        kind=data["kind"],  # type: ignore[arg-type]
        status=data["status"],  # type: ignore[arg-type]
        params=json.loads(data.get("params") or "{}"),
        adapter_id=data.get("adapter_id") or None,
        step=int(data.get("step") or 0),
        total=int(data.get("total") or 0),
        loss=_opt_float(data.get("loss")),
        queued_at=float(data["queued_at"]),
        started_at=_opt_float(data.get("started_at")),
        finished_at=_opt_float(data.get("finished_at")),
        error_code=data.get("error_code") or None,
        error_message=data.get("error_message") or None,
        result=json.loads(data["result"]) if data.get("result") else None,
        attempts=int(data.get("attempts") or 0),
        worker_pid=int(data["worker_pid"]) if data.get("worker_pid") else None,
        worker=data.get("worker") or None,
        delivery=int(data.get("delivery") or 0),
        cancel_requested=data.get("cancel_requested") == "1",
        webhook_url=data.get("webhook_url") or None,
        webhook_status=data.get("webhook_status") or None,
        webhook_attempts=json.loads(data.get("webhook_attempts") or "[]"),
    )


# KEYS: job hash, events stream, tenant's active-job set, the claimed-jobs set. ARGV[1] = now,
# ARGV[2] = job id. (The retention sets are named inline: one Redis, never a cluster.)
_TERMINATE = f"""
local function terminate(status, code, message)
  redis.call('HSET', KEYS[1], 'status', status, 'finished_at', ARGV[1])
  if code and code ~= '' then
    redis.call('HSET', KEYS[1], 'error_code', code, 'error_message', message)
  end
  redis.call('SREM', KEYS[3], ARGV[2])
  redis.call('SREM', KEYS[4], ARGV[2])
  redis.call('ZREM', '{QUEUED_JOBS_KEY}', ARGV[2])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', {EVENTS_MAXLEN}, '*', 'type', 'status', 'status', status)
  redis.call('EXPIRE', KEYS[2], {FINISHED_EVENTS_TTL_SECONDS})
  -- What retention removes later: the record, and the files the job leaves.
  redis.call('ZADD', '{ENDED_JOBS_KEY}', ARGV[1], ARGV[2])
  local kind = redis.call('HGET', KEYS[1], 'kind')
  local tenant = redis.call('HGET', KEYS[1], 'tenant_id')
  if kind == 'generate' then
    redis.call('ZADD', '{ENDED_OUTPUTS_KEY}', ARGV[1], tenant .. '/' .. ARGV[2])
  elseif kind == 'finetune' then
    redis.call('ZADD', '{ENDED_UPLOADS_KEY}', ARGV[1], tenant .. '/' .. redis.call('HGET', KEYS[1], 'adapter_id'))
  end
  local webhook = redis.call('HGET', KEYS[1], 'webhook_url')
  if webhook and webhook ~= '' then
    redis.call('HSET', KEYS[1], 'webhook_status', 'pending')
    redis.call('ZADD', '{WEBHOOKS_DUE_KEY}', ARGV[1], ARGV[2])
  end
end
"""

# ARGV[3] = worker pid, ARGV[4] = max attempts, ARGV[5] = message when attempts run out, ARGV[6] =
# worker name, ARGV[7] = the message's delivery number. KEYS[5] = the workers' heartbeats.
_CLAIM = (
    _TERMINATE
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', 0} end
if status ~= 'queued' and status ~= 'running' then return {status, 0} end
if tonumber(redis.call('HGET', KEYS[1], 'delivery') or '0') ~= tonumber(ARGV[7]) then
  return {'stale_message', 0}
end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  terminate('cancelled')
  return {'cancelled', 0}
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[4]) then
  terminate('failed', 'worker_lost', ARGV[5])
  return {'failed', attempts}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'worker_pid', ARGV[3],
           'worker', ARGV[6], 'step', 0, 'loss', '')
redis.call('SADD', KEYS[4], ARGV[2])
redis.call('ZREM', '"""
    + QUEUED_JOBS_KEY
    + """', ARGV[2])
-- A claim is a heartbeat too, so no recovery can take the job from a worker before its first beat.
if ARGV[6] ~= '' then redis.call('ZADD', KEYS[5], 'GT', ARGV[1], ARGV[6]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', """
    + str(EVENTS_MAXLEN)
    + """, '*', 'type', 'status', 'status', 'running')
return {'claimed', attempts}
"""
)

# ARGV[3] = attempt, ARGV[4] = step, ARGV[5] = total, ARGV[6] = loss or ''.
_PROGRESS = f"""
if redis.call('HGET', KEYS[1], 'status') ~= 'running'
   or redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[3] then
  return 'stale'
end
redis.call('HSET', KEYS[1], 'step', ARGV[4], 'total', ARGV[5], 'loss', ARGV[6])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', {EVENTS_MAXLEN}, '*', 'type', 'progress',
           'step', ARGV[4], 'total', ARGV[5], 'loss', ARGV[6])
return redis.call('HGET', KEYS[1], 'cancel_requested') or '0'
"""

# ARGV[3] = attempt, ARGV[4] = status, ARGV[5] = result JSON or '', ARGV[6] = error code, ARGV[7] = message.
_FINISH = (
    _TERMINATE
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' or redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[3] then
  return status or 'missing'
end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[5]) end
terminate(ARGV[4], ARGV[6], ARGV[7])
return 'ok'
"""
)

# ARGV[1] = the tenant's most active jobs, ARGV[2] = job id, ARGV[3..] = the job's fields and values.
# The quota check and the insert are one step, so concurrent submissions cannot overshoot it.
_CREATE = f"""
if redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('XADD', KEYS[2], 'MAXLEN', '~', {EVENTS_MAXLEN}, '*', 'type', 'status', 'status', 'queued')
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('ZADD', '{QUEUED_JOBS_KEY}', redis.call('HGET', KEYS[1], 'queued_at'), ARGV[2])
return 1
"""

# ARGV[3] = error code, ARGV[4] = message. Only a job nobody has started can be abandoned.
_ABANDON = (
    _TERMINATE
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' then
  terminate('failed', ARGV[3], ARGV[4])
  return 'failed'
end
return status or 'missing'
"""
)

_CANCEL = (
    _TERMINATE
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' then
  terminate('cancelled')
  return 'cancelled'
end
if status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', 1)
  return 'cancelling'
end
return status or 'missing'
"""
)


# KEYS[5] = the workers' heartbeats. ARGV[3] = the heartbeat cutoff, ARGV[4] = the recovering worker.
# Puts back a claimed job whose worker's heartbeat is older than the cutoff: the next delivery number
# fences off every message sent before, and the recovering worker becomes its holder until a
# message claims it, so if it dies before sending, the next recovery finds the job again.
_RECOVER = f"""
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' and status ~= 'queued' then
  redis.call('SREM', KEYS[4], ARGV[2])
  return -1
end
local holder = redis.call('HGET', KEYS[1], 'worker') or ''
local beat = redis.call('ZSCORE', KEYS[5], holder)
if beat and tonumber(beat) >= tonumber(ARGV[3]) then return -1 end
local delivery = redis.call('HINCRBY', KEYS[1], 'delivery', 1)
redis.call('HSET', KEYS[1], 'status', 'queued', 'worker', ARGV[4], 'step', 0, 'loss', '')
redis.call('ZADD', '{QUEUED_JOBS_KEY}', ARGV[1], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', {EVENTS_MAXLEN}, '*', 'type', 'status', 'status', 'queued')
return delivery
"""

# KEYS[1] = the job hash. ARGV[1] = now, ARGV[2] = job id, ARGV[3] = the delivery number whose
# message was lost. A job still queued under that number gets the next one, so a message sent
# before, should it turn up after all, is refused by the claim.
_REQUEUE = f"""
if redis.call('HGET', KEYS[1], 'status') ~= 'queued'
   or tonumber(redis.call('HGET', KEYS[1], 'delivery') or '0') ~= tonumber(ARGV[3]) then
  return -1
end
local delivery = redis.call('HINCRBY', KEYS[1], 'delivery', 1)
redis.call('ZADD', '{QUEUED_JOBS_KEY}', ARGV[1], ARGV[2])
return delivery
"""


# ARGV[3] = the attempt its worker gave up on. A running attempt whose worker lost Redis goes back
# to the queue under the next delivery number (the reconciler sends its message), still held by
# that worker, so that no recovery takes it meanwhile.
_RELEASE = f"""
if redis.call('HGET', KEYS[1], 'status') ~= 'running' or redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[3] then
  return -1
end
local delivery = redis.call('HINCRBY', KEYS[1], 'delivery', 1)
redis.call('HSET', KEYS[1], 'status', 'queued', 'step', 0, 'loss', '')
redis.call('ZADD', '{QUEUED_JOBS_KEY}', ARGV[1], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', {EVENTS_MAXLEN}, '*', 'type', 'status', 'status', 'queued')
return delivery
"""


class JobStore:
    """Synchronous access, used by the gateway's routes and by the workers."""

    def __init__(self, db: redis.Redis) -> None:
        self.db = db
        self._claim = db.register_script(_CLAIM)
        self._progress = db.register_script(_PROGRESS)
        self._finish = db.register_script(_FINISH)
        self._cancel = db.register_script(_CANCEL)
        self._create = db.register_script(_CREATE)
        self._abandon = db.register_script(_ABANDON)
        self._recover = db.register_script(_RECOVER)
        self._requeue = db.register_script(_REQUEUE)
        self._release = db.register_script(_RELEASE)

    def _keys(self, job_id: str, tenant_id: str) -> list[str]:
        return [job_key(job_id), job_events_key(job_id), tenant_active_jobs_key(tenant_id), CLAIMED_JOBS_KEY]

    def _tenant_of(self, job_id: str) -> str | None:
        return self.db.hget(job_key(job_id), "tenant_id")

    def active_count(self, tenant_id: str) -> int:
        return int(self.db.scard(tenant_active_jobs_key(tenant_id)))

    def create(
        self, job_id: str, tenant_id: str, params: JobParams, max_active: int, webhook_url: str | None = None
    ) -> Job | None:
        """Records a queued job; None if the tenant already has ``max_active`` jobs queued or running.
        ``webhook_url`` (checked by the caller) is called when the job ends."""
        fields = {
            "tenant_id": tenant_id,
            "kind": params.kind,
            "status": "queued",
            "params": params.model_dump_json(),
            "adapter_id": params.adapter_id or "",
            "step": 0,
            "total": params.total_steps,
            "queued_at": time.time(),
            "attempts": 0,
            "webhook_url": webhook_url or "",
        }
        pairs = [item for field in fields.items() for item in field]
        if not self._create(keys=self._keys(job_id, tenant_id), args=[max_active, job_id, *pairs]):
            return None
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        data = self.db.hgetall(job_key(job_id))
        return parse_job(job_id, data) if data else None

    def claim(self, job_id: str, pid: int, max_attempts: int, worker: str = "", delivery: int = 0) -> tuple[str, int]:
        """Marks the job running for this message. Returns ('claimed', attempt) or the reason not to run:
        its status when it already ended, 'missing', or 'stale_message' when a recovery has sent a newer
        message (``delivery`` is the number the message carries)."""
        tenant_id = self._tenant_of(job_id)
        if tenant_id is None:
            return "missing", 0
        message = f"the job stopped its worker {max_attempts} times; it was given up"
        status, attempt = self._claim(
            keys=[*self._keys(job_id, tenant_id), WORKERS_KEY],
            args=[time.time(), job_id, pid, max_attempts, message, worker, delivery],
        )
        return str(status), int(attempt)

    def orphans(self, cutoff: float) -> list[str]:
        """Claimed jobs whose holding worker's last heartbeat is older than ``cutoff`` (a timestamp)."""
        claimed = sorted(self.db.smembers(CLAIMED_JOBS_KEY))
        if not claimed:
            return []
        with self.db.pipeline(transaction=False) as pipe:
            for job_id in claimed:
                pipe.hget(job_key(job_id), "worker")
            holders = pipe.execute()
        with self.db.pipeline(transaction=False) as pipe:
            for holder in holders:
                pipe.zscore(WORKERS_KEY, holder or "")
            beats = pipe.execute()
        return [job_id for job_id, beat in zip(claimed, beats, strict=True) if beat is None or beat < cutoff]

    def recover(self, job_id: str, cutoff: float, worker: str) -> tuple[JobKind, int] | None:
        """Puts back a claimed job whose worker stopped beating before ``cutoff``, held by ``worker`` until
        claimed again. Returns its kind and the delivery number its new message must carry, or None
        when the job ended or its worker is alive after all."""
        tenant_id = self._tenant_of(job_id)
        if tenant_id is None:
            self.db.srem(CLAIMED_JOBS_KEY, job_id)
            return None
        keys = [*self._keys(job_id, tenant_id), WORKERS_KEY]
        delivery = int(self._recover(keys=keys, args=[time.time(), job_id, cutoff, worker]))
        if delivery < 0:
            return None
        return self.db.hget(job_key(job_id), "kind"), delivery  # type: ignore[return-value]

    def queued_before(self, cutoff: float) -> dict[str, tuple[JobKind, int]]:
        """Jobs queued since before ``cutoff`` (a timestamp) and still queued: id → kind and delivery number."""
        job_ids = self.db.zrangebyscore(QUEUED_JOBS_KEY, "-inf", cutoff)
        with self.db.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(job_key(job_id), "status", "kind", "delivery")
            fields = pipe.execute()
        return {
            job_id: (kind, int(delivery or 0))
            for job_id, (status, kind, delivery) in zip(job_ids, fields, strict=True)
            if status == "queued"
        }

    def requeue(self, job_id: str, lost_delivery: int) -> int | None:
        """Gives a queued job whose message under ``lost_delivery`` was lost the next delivery number,
        which its new message must carry; None when the job moved on meanwhile."""
        delivery = int(self._requeue(keys=[job_key(job_id)], args=[time.time(), job_id, lost_delivery]))
        return None if delivery < 0 else delivery

    def release(self, job_id: str, attempt: int) -> int | None:
        """Puts a running ``attempt`` back in the queue under the next delivery number; None when
        the job moved on meanwhile (ended, or recovered by another worker)."""
        keys = [job_key(job_id), job_events_key(job_id)]
        delivery = int(self._release(keys=keys, args=[time.time(), job_id, attempt]))
        return None if delivery < 0 else delivery

    def progress(self, job_id: str, attempt: int, step: int, total: int, loss: float | None = None) -> str:
        """Records progress. Returns '1' if cancellation was requested, 'stale' if this run was superseded."""
        tenant_id = self._tenant_of(job_id) or ""
        return str(
            self._progress(
                keys=self._keys(job_id, tenant_id),
                args=[time.time(), job_id, attempt, step, total, "" if loss is None else repr(loss)],
            )
        )

    def progress_many(self, updates: list[tuple[str, str, int, int, int]]) -> list[str]:
        """``progress`` for several jobs, given as (job id, tenant id, attempt, step, total), in one round
        trip; the replies in the same order."""
        now = time.time()
        with self.db.pipeline(transaction=False) as pipe:
            for job_id, tenant_id, attempt, step, total in updates:
                args = [now, job_id, attempt, step, total, ""]
                self._progress(keys=self._keys(job_id, tenant_id), args=args, client=pipe)
            return [str(reply) for reply in pipe.execute()]

    def cancel_requested(self, job_id: str) -> bool:
        return self.db.hget(job_key(job_id), "cancel_requested") == "1"

    def finish(
        self,
        job_id: str,
        attempt: int,
        status: JobStatus,
        result: JobResult | None = None,
        error_code: str = "",
        error_message: str = "",
    ) -> str:
        tenant_id = self._tenant_of(job_id) or ""
        return str(
            self._finish(
                keys=self._keys(job_id, tenant_id),
                args=[
                    time.time(),
                    job_id,
                    attempt,
                    status,
                    result.model_dump_json() if result is not None else "",
                    error_code,
                    error_message,
                ],
            )
        )

    def abandon(self, job_id: str, error_code: str, error_message: str) -> str:
        """Fails a job that is still queued (it could not be sent to the workers); else its status."""
        tenant_id = self._tenant_of(job_id) or ""
        return str(
            self._abandon(keys=self._keys(job_id, tenant_id), args=[time.time(), job_id, error_code, error_message])
        )

    def cancel(self, job_id: str) -> str:
        """'cancelled' (it was queued), 'cancelling' (it stops at its next step), or its terminal status."""
        tenant_id = self._tenant_of(job_id) or ""
        return str(self._cancel(keys=self._keys(job_id, tenant_id), args=[time.time(), job_id]))


@dataclass(frozen=True)
class JobEvent:
    kind: Literal["status", "progress", "ping"]
    job: Job | None = None
    progress: dict[str, Any] | None = None


class JobWatcher:
    """Asynchronous reads for the event stream and ``wait``: they block on Redis, not on a thread.

    ``streams`` serves only the blocking XREADs, from a pool of its own (``connect_streams``).
    """

    def __init__(self, db: aioredis.Redis, streams: aioredis.Redis) -> None:
        self.db = db
        self.streams = streams

    async def get(self, job_id: str) -> Job | None:
        data = await self.db.hgetall(job_key(job_id))
        return parse_job(job_id, data) if data else None

    async def events(self, job_id: str, ping_seconds: float = EVENT_PING_SECONDS) -> AsyncIterator[JobEvent]:
        """The current state, then every change, until the job ends."""
        stream = job_events_key(job_id)
        cursor, job = await self._snapshot(job_id)
        if job is None:
            return
        yield JobEvent("status", job=job)
        while not job.terminal:
            reply = await self.streams.xread({stream: cursor}, block=int(ping_seconds * 1000), count=100)
            if not reply:
                yield JobEvent("ping")
                continue
            for entry_id, fields in reply[0][1]:
                cursor = entry_id
                if fields.get("type") == "progress":
                    loss = fields.get("loss")
                    yield JobEvent(
                        "progress",
                        progress={
                            "step": int(fields["step"]),
                            "total": int(fields["total"]),
                            "loss": float(loss) if loss else None,
                        },
                    )
                    continue
                refreshed = await self.get(job_id)
                if refreshed is None:
                    return
                job = refreshed
                yield JobEvent("status", job=job)
                if job.terminal:
                    return

    async def wait(
        self, job_id: str, timeout: float, client_gone: Callable[[], Awaitable[bool]] | None = None
    ) -> Job | None:
        """The job once it has ended, or None if it is still going after ``timeout`` seconds or
        ``client_gone`` says the caller left.

        The deadline is checked by this loop between bounded reads rather than by cancelling a
        read in flight: a blocking XREAD can absorb a cancellation and run on to the job's end.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        stream = job_events_key(job_id)
        cursor, job = await self._snapshot(job_id)
        while job is not None and not job.terminal:
            remaining = deadline - loop.time()
            if remaining <= 0 or (client_gone is not None and await client_gone()):
                return None
            # XREAD's block=0 means forever: a read blocks for at least one millisecond.
            block = max(1, int(min(remaining, WAIT_CHECK_SECONDS) * 1000))
            reply = await self.streams.xread({stream: cursor}, block=block, count=100)
            if not reply:
                continue
            entries = reply[0][1]
            cursor = entries[-1][0]
            if any(fields.get("type") != "progress" for _, fields in entries):
                job = await self.get(job_id)
        return job

    async def _snapshot(self, job_id: str) -> tuple[str, Job | None]:
        """The job's event stream position, then the job: no change between the two is missed."""
        latest = await self.db.xrevrange(job_events_key(job_id), count=1)
        return (latest[0][0] if latest else "0-0"), await self.get(job_id)
        return None
