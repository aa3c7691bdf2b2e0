from contextlib import nullcontext
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from service.api.deps import ServicesDep, SubmissionRateDep, TenantDep
from service.api.jobs import job_links
from service.api.schemas import ErrorResponse, GenerationAccepted, GenerationRequest, JobOut
from service.errors import invalid
from service.submission import submit_generation

router = APIRouter(prefix="/v1/generations", tags=["generations"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 422, 429, 503)}


@router.post(
    "",
    status_code=202,
    response_model=GenerationAccepted,
    responses={
        **ERRORS,
        200: {
            "model": GenerationAccepted,
            "description": "Finished within `wait`",
            "links": job_links("/job_id", generation=True),
        },
        202: {"links": job_links("/job_id", generation=True)},
    },
    dependencies=[SubmissionRateDep],
)
async def create_generation(
    request: GenerationRequest,
    tenant: TenantDep,
    services: ServicesDep,
    response: Response,
    connection: Request,
    wait: Annotated[
        float,
        Query(ge=0, description="Seconds to wait for the result (at most ATOMTUNE_MAX_WAIT_SECONDS, 60 by default)"),
    ] = 0,
) -> GenerationAccepted:
    """Generate images, optionally through an adapter with a density, an atom mask or its top atoms."""
    if wait > services.settings.max_wait_seconds:
        raise invalid(f"wait must be at most {services.settings.max_wait_seconds:g} seconds")
    # The slot is taken before the job is submitted, so a refusal leaves no job behind.
    slot = services.stream_slots.hold(tenant.id) if wait > 0 else nullcontext()
    async with slot:
        job_id = await run_in_threadpool(submit_generation, services, tenant, request)
        job = await services.watcher.wait(job_id, wait, connection.is_disconnected) if wait > 0 else None
    if job is not None:
        response.status_code = 200
    return GenerationAccepted(job_id=job_id, job=JobOut.of(job) if job is not None else None)
