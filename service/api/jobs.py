import json
from collections.abc import AsyncIterator
from http import HTTPStatus
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response
from fastapi.responses import FileResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from PIL import Image

from service.api.deps import JobDep, ServicesDep, StreamSlotDep
from service.api.schemas import AttributionOut, ErrorResponse, JobOut, Progress
from service.context import Services
from service.core.contract import GenerateResult, parse_result
from service.core.jobs import Job
from service.errors import ApiError, not_found
from service.images import overlay

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 409, 429, 503)}
ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorResponse"}


def job_links(pointer: str, generation: bool) -> dict[str, Any]:
    """OpenAPI links from a response naming a job (at the JSON ``pointer`` of its body) to the job's
    routes (a generation's images and maps too), so clients and schemathesis's stateful tests can
    follow them."""
    job = {"job_id": f"$response.body#{pointer}"}
    links: dict[str, Any] = {
        route: {"operationId": route, "parameters": job} for route in ("get_job", "cancel_job", "job_events")
    }
    if generation:
        links["get_image"] = {"operationId": "get_image", "parameters": {**job, "index": 0}}
        links["get_attribution"] = {"operationId": "get_attribution", "parameters": job}
    return links


@router.get("/{job_id}", response_model=JobOut, responses=ERRORS)
def get_job(job: JobDep) -> JobOut:
    """Status, progress, timestamps, error and result of a job."""
    return JobOut.of(job)


@router.delete("/{job_id}", status_code=202, response_model=JobOut, responses=ERRORS)
def cancel_job(job: JobDep, services: ServicesDep) -> JobOut:
    """Cancel: a queued job never runs; a running one stops at its next step."""
    # The script reports the job's own status when it ended before (or while) we asked.
    outcome = job.status if job.terminal else services.jobs.cancel(job.id)
    if job.terminal or outcome not in ("cancelled", "cancelling"):
        raise ApiError(409, "job_finished", f"job '{job.id}' already {outcome}; there is nothing to cancel")
    current = services.jobs.get(job.id)
    assert current is not None
    return JobOut.of(current)


# The stream's errors are JSON, not events: documented under that media type alone.
EVENT_ERRORS = {
    code: {"description": HTTPStatus(code).phrase, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
    for code in ERRORS
}


@router.get("/{job_id}/events", response_class=EventSourceResponse, responses=EVENT_ERRORS)
async def job_events(job: JobDep, services: ServicesDep, _slot: StreamSlotDep) -> AsyncIterator[ServerSentEvent]:
    """Server-Sent Events: `status` (the whole job) on every change, `progress` on every step; ends with the job."""
    async for event in services.watcher.events(job.id):
        if event.kind == "status" and event.job is not None:
            yield ServerSentEvent(event="status", data=JobOut.of(event.job).model_dump(mode="json"))
        elif event.kind == "progress" and event.progress is not None:
            yield ServerSentEvent(event="progress", data=Progress(**event.progress).model_dump())
        else:
            yield ServerSentEvent(comment="keep-alive")


@router.get(
    "/{job_id}/images/{index}",
    response_class=FileResponse,
    responses={**ERRORS, 410: {"model": ErrorResponse}, 200: {"content": {"image/png": {}}}},
)
def get_image(job: JobDep, services: ServicesDep, index: Annotated[int, Path(ge=0)]) -> FileResponse:
    """One generated PNG (only the job's owner sees it)."""
    result = parse_result(job.kind, job.result) if job.result is not None else None
    if not isinstance(result, GenerateResult) or job.status != "succeeded" or index >= result.image_count:
        raise not_found("image", f"{job.id}/images/{index}")
    image = _kept(services.storage.output_image(job.tenant_id, job.id, index), job, services)
    return FileResponse(image, media_type="image/png")


def _kept(path: FilePath, job: Job, services: Services) -> FilePath:
    """A file of the job's outputs; 410 once retention removed them."""
    if not path.exists():
        hours = services.settings.output_retention_seconds / 3600
        raise ApiError(410, "expired", f"the outputs of job '{job.id}' were removed {hours:g} h after it ended")
    return path


def _attribution(job: Job, services: Services) -> dict[str, Any]:
    result = parse_result(job.kind, job.result) if job.result is not None else None
    if not isinstance(result, GenerateResult) or not result.attribution:
        raise not_found("attribution", job.id)
    return json.loads(_kept(services.storage.attribution(job.tenant_id, job.id), job, services).read_text())


@router.get("/{job_id}/attribution", response_model=AttributionOut, responses={**ERRORS, 410: {"model": ErrorResponse}})
def get_attribution(job: JobDep, services: ServicesDep) -> AttributionOut:
    """Where the most important atoms of each adapted block act: per image, |s_j|·‖D_j‖ per latent
    patch averaged over the steps, and the adapter's whole effect (`total`); overlays as PNGs."""
    maps = _attribution(job, services)
    return AttributionOut(**maps, overlay=f"/v1/jobs/{job.id}/attribution/{{image}}/{{block}}/{{atom}}.png")


@router.get(
    "/{job_id}/attribution/{index}/{block}/{atom}.png",
    response_class=Response,
    responses={**ERRORS, 410: {"model": ErrorResponse}, 200: {"content": {"image/png": {}}}},
)
def get_attribution_overlay(
    job: JobDep,
    services: ServicesDep,
    index: Annotated[int, Path(ge=0)],
    block: Annotated[int, Path(ge=0)],
    atom: Annotated[str, Path(pattern=r"^(total|\d{1,5})$", description="An atom's index, or `total`")],
) -> Response:
    """The image with one atom's map (or the adapter's whole effect) laid over it as a heat map."""
    maps = _attribution(job, services)
    found = next((entry for entry in maps["blocks"] if entry["block"] == block), None)
    if found is None:
        raise not_found("attribution block", f"{job.id}/{block}")
    if atom == "total":
        grids = found["total"]
    else:
        grids = next((entry["maps"] for entry in found["atoms"] if entry["atom"] == int(atom)), None)
        if grids is None:
            raise not_found("attribution atom", f"{job.id}/{block}/{atom}")
    if index >= len(grids):
        raise not_found("image", f"{job.id}/images/{index}")
    image = Image.open(_kept(services.storage.output_image(job.tenant_id, job.id, index), job, services))
    return Response(overlay(image, grids[index]), media_type="image/png")
