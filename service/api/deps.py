"""Dependencies of the routes: the process's services, the calling tenant, and owned objects."""

import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.catalog import AdapterRecord
from service.context import Services
from service.errors import ApiError, invalid, not_found
from service.ids import is_valid_id
from service.jobs import Job, JobKind
from service.queue import enqueue
from service.tenants import Tenant

log = logging.getLogger(__name__)


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]

_bearer = HTTPBearer(auto_error=False, description="An API key from `atomtune tenant create`")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def current_tenant(
    services: ServicesDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Tenant:
    if credentials is None:
        raise ApiError(401, "unauthenticated", "send your API key as 'Authorization: Bearer <key>'", headers=_CHALLENGE)
    tenant = services.tenants.authenticate(credentials.credentials)
    if tenant is None:
        raise ApiError(401, "unauthenticated", "the API key is unknown or revoked", headers=_CHALLENGE)
    return tenant


TenantDep = Annotated[Tenant, Depends(current_tenant)]


def owned_job(job_id: str, tenant: TenantDep, services: ServicesDep) -> Job:
    job = services.jobs.get(job_id) if is_valid_id(job_id) else None
    if job is None or job.tenant_id != tenant.id:
        raise not_found("job", job_id)
    return job


def owned_adapter(adapter_id: str, tenant: TenantDep, services: ServicesDep) -> AdapterRecord:
    record = services.catalog.get(adapter_id) if is_valid_id(adapter_id) else None
    if record is None or record.tenant_id != tenant.id:
        raise not_found("adapter", adapter_id)
    return record


JobDep = Annotated[Job, Depends(owned_job)]
AdapterDep = Annotated[AdapterRecord, Depends(owned_adapter)]


async def stream_slot(tenant: TenantDep, services: ServicesDep) -> AsyncIterator[None]:
    """Holds one of the tenant's stream slots until the response (the whole stream) is sent."""
    async with services.stream_slots.hold(tenant.id):
        yield


StreamSlotDep = Annotated[None, Depends(stream_slot)]


def create_job(
    services: Services,
    tenant: Tenant,
    job_id: str,
    kind: JobKind,
    params: dict[str, Any],
    total: int,
    adapter_id: str | None = None,
) -> None:
    """Records the job as queued, or answers 429 if the tenant has its limit of active jobs."""
    limit = services.settings.max_active_jobs_per_tenant
    if services.jobs.create(job_id, tenant.id, kind, params, total, max_active=limit, adapter_id=adapter_id) is None:
        raise ApiError(
            429, "too_many_jobs", f"you have {limit} jobs queued or running; wait for some to finish or cancel them"
        )


def send_job(services: Services, job_id: str, kind: JobKind, undo: Callable[[], None] | None = None) -> None:
    """Queues a created job. If that fails, the job is failed (so it holds no slot of the tenant's
    quota), ``undo`` removes what was written for it, and the error propagates (503)."""
    try:
        enqueue(services.celery, kind, job_id)
    except Exception:
        try:
            services.jobs.abandon(job_id, "unavailable", "the job could not be queued; submit it again")
            if undo is not None:
                undo()
        except Exception:
            log.exception("cleaning up job %s, which could not be queued, failed", job_id)
        raise


# PixArt's VAE downsamples by 8 and its transformer patches latents by 2.
SIDE_MULTIPLE = 16


def check_side(name: str, value: int | None, max_side: int) -> None:
    if value is not None and (value > max_side or value % SIDE_MULTIPLE):
        raise invalid(f"{name} must be a multiple of {SIDE_MULTIPLE} and at most {max_side}")
