"""Tenants and their API keys. Keys are stored only as SHA-256 hashes and compared in constant time."""

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import redis

from service.core.ids import new_id
from service.core.redis_db import TENANT_NAMES_KEY, TENANTS_KEY, api_key_key, tenant_key

KEY_PREFIX = "atk"
# Compared against when a key id is unknown, so a miss costs the same as a wrong secret.
_DUMMY_HASH = hashlib.sha256(b"atomtune-unknown-key").hexdigest()


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    created_at: float
    revoked: bool


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _split_key(key: str) -> tuple[str, str] | None:
    # Format atk_<key id>_<secret>: the id finds the record, the secret is what is checked.
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


class TenantStore:
    def __init__(self, db: redis.Redis) -> None:
        self.db = db

    def create(self, name: str) -> tuple[Tenant, str]:
        """Creates a tenant and its first key; the key is returned here and never again."""
        name = name.strip()
        if not name or len(name) > 64:
            raise ValueError("a tenant name must be 1-64 characters")
        tenant = Tenant(id=new_id(), name=name, created_at=time.time(), revoked=False)
        if not self.db.hsetnx(TENANT_NAMES_KEY, name, tenant.id):
            raise ValueError(f"a tenant named '{name}' already exists")
        self.db.hset(tenant_key(tenant.id), mapping={"name": name, "created_at": tenant.created_at, "revoked": 0})
        self.db.zadd(TENANTS_KEY, {tenant.id: 0})
        return tenant, self.issue_key(tenant.id)

    def issue_key(self, tenant_id: str) -> str:
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        self.db.hset(api_key_key(key_id), mapping={"tenant_id": tenant_id, "sha256": _hash(secret)})
        self.db.sadd(f"{tenant_key(tenant_id)}:keys", key_id)
        return f"{KEY_PREFIX}_{key_id}_{secret}"

    def revoke_keys(self, tenant_id: str) -> None:
        keys_set = f"{tenant_key(tenant_id)}:keys"
        key_ids = self.db.smembers(keys_set)
        if key_ids:
            self.db.delete(*(api_key_key(k) for k in key_ids))
        self.db.delete(keys_set)

    def revoke(self, tenant_id: str) -> bool:
        """Revokes the tenant and every key it holds; its data stays until deleted by an operator."""
        if not self.db.exists(tenant_key(tenant_id)):
            return False
        self.revoke_keys(tenant_id)
        self.db.hset(tenant_key(tenant_id), "revoked", 1)
        return True

    def get(self, tenant_id: str) -> Tenant | None:
        data = self.db.hgetall(tenant_key(tenant_id))
        if not data:
            return None
        return Tenant(
            id=tenant_id,
            name=data["name"],
            created_at=float(data["created_at"]),
            revoked=data.get("revoked") == "1",
        )

    def find_by_name(self, name: str) -> Tenant | None:
        tenant_id = self.db.hget(TENANT_NAMES_KEY, name)
        return self.get(tenant_id) if tenant_id else None

    def list(self) -> list[Tenant]:
        return [t for t in (self.get(i) for i in self.db.zrange(TENANTS_KEY, 0, -1)) if t]

    def authenticate(self, key: str) -> Tenant | None:
        parts = _split_key(key)
        record = self.db.hgetall(api_key_key(parts[0])) if parts else {}
        stored = record.get("sha256", _DUMMY_HASH)
        candidate = _hash(parts[1] if parts else key)
        if not hmac.compare_digest(stored, candidate) or not record:
            return None
        tenant = self.get(record["tenant_id"])
        return tenant if tenant and not tenant.revoked else None
