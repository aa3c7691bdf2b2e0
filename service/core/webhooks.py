"""Webhooks: when a job that names a ``webhook_url`` ends, a signed POST of the job to it.

Signed as the Standard Webhooks spec says (https://www.standardwebhooks.com): headers
``webhook-id`` (the same for every attempt of one delivery), ``webhook-timestamp`` (Unix seconds)
and ``webhook-signature`` = ``v1,`` + base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}")),
with the tenant's secret (``whsec_`` + base64 of its bytes), which the tenant reads and rotates.

Where a webhook may go is checked twice, at submission and again before every attempt (a name
can resolve elsewhere by then): HTTPS only, and every address the host resolves to must be
public, never loopback, private, link-local (cloud metadata among them), shared or reserved,
unless the host is in ``webhook_allowed_hosts``; ``webhook_allow_http`` lets plain HTTP through.
An attempt connects to an address that was checked (``pinned``, each in turn until one
connects), not to whatever the name resolves to a moment later, so DNS rebinding cannot slip a
private address in between; TLS still verifies the certificate for the name, and no connection
is kept alive (a pooled one is keyed by address, so another name at that address would reuse a
connection whose certificate was checked for the first). Redirects are not followed (they would
lead past the check): a 3xx is a failed attempt.

Delivery is durable: a job's end (the one Lua ``terminate``) puts it in a sorted set scored by
when its next attempt is due, which the workers serve (``worker.webhooks``).
"""

import base64
import hashlib
import hmac
import ipaddress
import secrets
import socket
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis

from service.core.jobs import Job
from service.core.redis_db import tenant_key
from service.core.settings import Settings

SECRET_PREFIX = "whsec_"
SECRET_FIELD = "webhook_secret"
MAX_URL_LENGTH = 2048


class WebhookRefused(ValueError):
    """A webhook URL that must not be called; the message says why."""


def check_url(url: str, settings: Settings) -> list[str] | None:
    """Refuses a URL a webhook must not go to (see the module's docstring). Returns the checked
    addresses to connect to, or None for a host of ``webhook_allowed_hosts`` (reached by its name)."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookRefused(f"webhook_url is longer than {MAX_URL_LENGTH} characters")
    parts = urlsplit(url)
    allowed = ("https", "http") if settings.webhook_allow_http else ("https",)
    if parts.scheme not in allowed:
        raise WebhookRefused(f"webhook_url must be an {' or '.join(allowed)} URL, got {url!r}")
    if not parts.hostname:
        raise WebhookRefused(f"webhook_url names no host: {url!r}")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused("webhook_url may not carry credentials; the signature authenticates atomtune")
    if parts.hostname in settings.webhook_allowed_hosts:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        raise WebhookRefused(f"webhook_url's host {parts.hostname!r} does not resolve") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        mapped = getattr(address, "ipv4_mapped", None)
        if not (mapped or address).is_global:
            raise WebhookRefused(
                f"webhook_url's host {parts.hostname!r} resolves to {address}, which is not a public address "
                "(loopback, private, link-local and metadata addresses are refused)"
            )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def pinned(url: str, address: str | None) -> tuple[str, dict[str, str], dict[str, str]]:
    """The URL that reaches ``url``'s host at ``address`` (None: by its name), with the ``Host``
    header and, over HTTPS, the TLS server name (httpx's ``sni_hostname`` extension) of the name,
    both in their ASCII (IDNA) form."""
    if address is None:
        return url, {}, {}
    parts = httpx.URL(url)
    extensions = {"sni_hostname": parts.raw_host.decode("ascii")} if parts.scheme == "https" else {}
    return str(parts.copy_with(host=address)), {"host": parts.netloc.decode("ascii")}, extensions


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def secret_of(db: redis.Redis, tenant_id: str) -> str:
    """The tenant's signing secret, made on first use."""
    db.hsetnx(tenant_key(tenant_id), SECRET_FIELD, new_secret())
    return str(db.hget(tenant_key(tenant_id), SECRET_FIELD))


def rotate_secret(db: redis.Redis, tenant_id: str) -> str:
    """A new signing secret; deliveries from now on are signed with it."""
    secret = new_secret()
    db.hset(tenant_key(tenant_id), SECRET_FIELD, secret)
    return secret


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    content = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()


def payload(job: Job) -> dict[str, Any]:
    """What a delivery carries: the job's record as it ended."""
    error = {"code": job.error_code, "message": job.error_message} if job.error_code else None
    result = {k: v for k, v in (job.result or {}).items() if k != "schema_version"} or None
    return {
        "type": f"job.{job.status}",
        "timestamp": job.finished_at,
        "data": {
            "id": job.id,
            "kind": job.kind,
            "status": job.status,
            "adapter_id": job.adapter_id,
            "queued_at": job.queued_at,
            "finished_at": job.finished_at,
            "attempts": job.attempts,
            "error": error,
            "result": result,
        },
    }
