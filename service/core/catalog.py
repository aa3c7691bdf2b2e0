"""Adapter records in Redis, listed per tenant in creation order (ULIDs sort by time).

Deleting a record also publishes its id on ``ADAPTER_DELETIONS_CHANNEL``, in the same transaction,
so that every worker drops the adapter from its caches (``worker/eviction.py``).
"""

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

import redis

from service.core.jobs import Job
from service.core.redis_db import ADAPTER_DELETIONS_CHANNEL, adapter_key, tenant_adapters_key

AdapterSource = Literal["trained", "imported"]
AdapterStatus = Literal["queued", "training", "ready", "failed", "cancelled"]

_STATUS_FROM_JOB: dict[str, AdapterStatus] = {
    "queued": "queued",
    "running": "training",
    "failed": "failed",
    "cancelled": "cancelled",
    # The worker marks the adapter ready before it marks the job succeeded.
    "succeeded": "ready",
}


@dataclass(frozen=True)
class AdapterRecord:
    id: str
    tenant_id: str
    prompt: str
    source: AdapterSource
    job_id: str | None
    config: dict[str, Any]
    training: dict[str, Any] | None
    created_at: float
    ready_at: float | None
    metrics: dict[str, Any] | None
    blocks: list[int] | None
    """The transformer blocks the adapter modifies, once it is ready."""

    def status(self, job: Job | None) -> AdapterStatus:
        if self.ready_at is not None:
            return "ready"
        if job is None:
            return "failed"
        return _STATUS_FROM_JOB[job.status]


def _json_or_none(value: str | None) -> Any:
    return json.loads(value) if value else None


# One step: a separate existence check would let a delete in between leave a partial record.
_MARK_READY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


class AdapterCatalog:
    def __init__(self, db: redis.Redis) -> None:
        self.db = db
        self._mark_ready = db.register_script(_MARK_READY)

    def create(
        self,
        adapter_id: str,
        tenant_id: str,
        prompt: str,
        source: AdapterSource,
        config: dict[str, Any],
        training: dict[str, Any] | None = None,
        job_id: str | None = None,
    ) -> None:
        fields = {
            "tenant_id": tenant_id,
            "prompt": prompt,
            "source": source,
            "job_id": job_id or "",
            "config": json.dumps(config),
            "training": json.dumps(training) if training is not None else "",
            "created_at": time.time(),
        }
        with self.db.pipeline(transaction=True) as pipe:
            pipe.hset(adapter_key(adapter_id), mapping=fields)
            pipe.zadd(tenant_adapters_key(tenant_id), {adapter_id: 0})
            pipe.execute()

    def get(self, adapter_id: str) -> AdapterRecord | None:
        data = self.db.hgetall(adapter_key(adapter_id))
        if not data:
            return None
        return AdapterRecord(
            id=adapter_id,
            tenant_id=data["tenant_id"],
            prompt=data["prompt"],
            source=data["source"],  # type: ignore[arg-type]
            job_id=data.get("job_id") or None,
            config=json.loads(data["config"]),
            training=_json_or_none(data.get("training")),
            created_at=float(data["created_at"]),
            ready_at=float(data["ready_at"]) if data.get("ready_at") else None,
            metrics=_json_or_none(data.get("metrics")),
            blocks=_json_or_none(data.get("blocks")),
        )

    def mark_ready(self, adapter_id: str, config: dict[str, Any], blocks: list[int], metrics: dict[str, Any]) -> bool:
        """Returns False if the adapter was deleted meanwhile (the caller then discards its files)."""
        fields = {
            "config": json.dumps(config),
            "blocks": json.dumps(blocks),
            "metrics": json.dumps(metrics),
            "ready_at": time.time(),
        }
        pairs = [item for field in fields.items() for item in field]
        return bool(self._mark_ready(keys=[adapter_key(adapter_id)], args=pairs))

    def page(self, tenant_id: str, limit: int, before: str | None) -> list[str]:
        """Ids, newest first, strictly older than ``before`` when given."""
        upper = f"({before}" if before else "+"
        return list(self.db.zrevrangebylex(tenant_adapters_key(tenant_id), upper, "-", start=0, num=limit))

    def delete(self, adapter_id: str, tenant_id: str) -> None:
        with self.db.pipeline(transaction=True) as pipe:
            pipe.delete(adapter_key(adapter_id))
            pipe.zrem(tenant_adapters_key(tenant_id), adapter_id)
            pipe.publish(ADAPTER_DELETIONS_CHANNEL, adapter_id)
            pipe.execute()

    def existing(self, adapter_ids: list[str]) -> set[str]:
        """Which of the ids still have a record."""
        with self.db.pipeline(transaction=False) as pipe:
            for adapter_id in adapter_ids:
                pipe.exists(adapter_key(adapter_id))
            found = pipe.execute()
        return {adapter_id for adapter_id, exists in zip(adapter_ids, found, strict=True) if exists}
