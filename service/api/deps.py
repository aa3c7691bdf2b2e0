"""Dependencies of the routes: the process's services, the calling tenant, and owned objects."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.context import Services
from service.core.catalog import AdapterRecord
from service.core.ids import is_valid_id
from service.core.jobs import Job
from service.core.tenants import Tenant
from service.errors import ApiError, not_found


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]

_bearer = HTTPBearer(auto_error=False, description="An API key from `atomtune tenant create`")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def current_tenant(
    request: Request,
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    """The caller's tenant; every authenticated request counts against its rate, and every key that
    fails against its address's."""
    # Behind a proxy, uvicorn takes the client from X-Forwarded-For of trusted proxies (FORWARDED_ALLOW_IPS).
    address = request.client.host if request.client else "unknown"
    if credentials is None:
        # Guesses nothing, so it costs nothing to refuse and counts against no one.
        raise ApiError(401, "unauthenticated", "send your API key as 'Authorization: Bearer <key>'", headers=_CHALLENGE)
    services.rate_limits.check_address(address)
    tenant = services.tenants.authenticate(credentials.credentials)
    if tenant is None:
        services.rate_limits.count_auth_failure(address)
        raise ApiError(401, "unauthenticated", "the API key is unknown or revoked", headers=_CHALLENGE)
    services.rate_limits.count_request(tenant.id)
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


def submission_rate(tenant: TenantDep, services: ServicesDep) -> None:
    """Counts a job submission (or an import) against the tenant's rate of them."""
    services.rate_limits.count_submission(tenant.id)


SubmissionRateDep = Depends(submission_rate)
JobDep = Annotated[Job, Depends(owned_job)]
AdapterDep = Annotated[AdapterRecord, Depends(owned_adapter)]


async def stream_slot(tenant: TenantDep, services: ServicesDep) -> AsyncIterator[None]:
    """Holds one of the tenant's stream slots until the response (the whole stream) is sent."""
    async with services.stream_slots.hold(tenant.id):
        yield


StreamSlotDep = Annotated[None, Depends(stream_slot)]
