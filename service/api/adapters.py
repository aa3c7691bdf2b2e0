from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from service.api.deps import AdapterDep, ServicesDep, SubmissionRateDep, TenantDep
from service.api.jobs import job_links
from service.api.schemas import (
    AdapterCreated,
    AdapterOut,
    AdapterPage,
    AtomsOut,
    ErrorResponse,
    PlainText,
    TrainingForm,
)
from service.bundles import import_adapter_zip, zip_folder
from service.context import Services
from service.core.catalog import AdapterRecord
from service.core.ids import is_valid_id
from service.core.storage import ADAPTER_SUBDIR, read_atoms
from service.errors import ApiError, invalid
from service.submission import read_upload, submit_finetune

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 415, 422, 429, 503)}


def adapter_links(pointer: str) -> dict[str, Any]:
    """OpenAPI links from a response naming an adapter (at the JSON ``pointer`` of its body) to its routes."""
    routes = ("get_adapter", "delete_adapter", "get_atoms", "download_adapter")
    parameters = {"adapter_id": f"$response.body#{pointer}"}
    return {route: {"operationId": route, "parameters": parameters} for route in routes}


def _require_ready(record: AdapterRecord, services: Services) -> None:
    job = services.jobs.get(record.job_id) if record.job_id else None
    status = record.status(job)
    if status != "ready":
        raise ApiError(409, "adapter_not_ready", f"adapter '{record.id}' is {status}, not ready")


def _render(record: AdapterRecord, services: Services) -> AdapterOut:
    return AdapterOut.of(record, services.jobs.get(record.job_id) if record.job_id else None)


@router.post(
    "",
    status_code=202,
    response_model=AdapterCreated,
    responses={**ERRORS, 202: {"links": {**adapter_links("/adapter_id"), **job_links("/job_id", generation=False)}}},
    dependencies=[SubmissionRateDep],
)
def create_adapter(
    tenant: TenantDep,
    services: ServicesDep,
    form: Annotated[TrainingForm, Form()],
) -> AdapterCreated:
    """Fine-tune a new adapter on the images; the job's progress is at `/v1/jobs/{job_id}`."""
    adapter_id, job_id = submit_finetune(services, tenant, form)
    return AdapterCreated(adapter_id=adapter_id, job_id=job_id)


@router.get("", response_model=AdapterPage, responses={**ERRORS, 200: {"links": adapter_links("/items/0/id")}})
def list_adapters(
    tenant: TenantDep,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
) -> AdapterPage:
    """Your adapters, newest first."""
    cursor = cursor or None  # an empty cursor= is the first page, as no cursor is
    if cursor is not None and not is_valid_id(cursor):
        raise invalid("cursor must be the next_cursor of a previous page")
    ids = services.catalog.page(tenant.id, limit + 1, cursor)
    records = [r for r in (services.catalog.get(i) for i in ids[:limit]) if r is not None]
    return AdapterPage(
        items=[_render(r, services) for r in records],
        next_cursor=ids[limit - 1] if len(ids) > limit else None,
    )


@router.get("/{adapter_id}", response_model=AdapterOut, responses=ERRORS)
def get_adapter(record: AdapterDep, services: ServicesDep) -> AdapterOut:
    """Status, configuration and training metrics."""
    return _render(record, services)


@router.delete("/{adapter_id}", status_code=204, responses=ERRORS)
def delete_adapter(record: AdapterDep, services: ServicesDep) -> Response:
    """Deletes the adapter and its files; its training stops, and every worker drops it from its caches."""
    if record.job_id:
        services.jobs.cancel(record.job_id)
    services.catalog.delete(record.id, record.tenant_id)
    services.storage.remove_adapter(record.tenant_id, record.id)
    return Response(status_code=204)


@router.get("/{adapter_id}/atoms", response_model=AtomsOut, responses=ERRORS)
def get_atoms(
    record: AdapterDep,
    services: ServicesDep,
    limit: Annotated[int | None, Query(ge=1, description="Only the K most important atoms per block")] = None,
) -> AtomsOut:
    """Atom importance per block, most important first."""
    _require_ready(record, services)
    blocks = read_atoms(services.storage.adapter_dir(record.tenant_id, record.id))
    if blocks is None:
        raise ApiError(409, "no_importance", f"adapter '{record.id}' carries no atom importance")
    if limit is not None:
        blocks = [{**block, "atoms": block["atoms"][:limit]} for block in blocks]
    return AtomsOut.model_validate({"adapter_id": record.id, "blocks": blocks})


@router.get(
    "/{adapter_id}/download",
    response_class=FileResponse,
    responses={**ERRORS, 200: {"content": {"application/zip": {}}}},
)
def download_adapter(record: AdapterDep, services: ServicesDep) -> FileResponse:
    """The adapter folder (`adapter_config.json`, `adapter_model.safetensors`) as a zip."""
    _require_ready(record, services)
    folder = services.storage.adapter_dir(record.tenant_id, record.id) / ADAPTER_SUBDIR
    archive = zip_folder(folder)
    return FileResponse(
        archive,
        media_type="application/zip",
        filename=f"adapter-{record.id}.zip",
        background=BackgroundTask(archive.unlink),
    )


@router.post(
    "/import",
    status_code=201,
    response_model=AdapterOut,
    responses={**ERRORS, 201: {"links": adapter_links("/id")}},
    dependencies=[SubmissionRateDep],
)
def import_adapter(
    tenant: TenantDep,
    services: ServicesDep,
    file: Annotated[UploadFile, File(description="A zip as returned by /download")],
    prompt: Annotated[PlainText, Form(max_length=1000, description="What the adapter depicts")] = "",
) -> AdapterOut:
    """Upload an adapter; the engine's loader validates it before it is stored."""
    limit = services.settings.max_adapter_bytes
    data = read_upload(file, limit)
    if len(data) > limit:
        raise ApiError(413, "adapter_too_large", f"the zip is over {limit} bytes; the limit is {limit} bytes")
    return _render(import_adapter_zip(services, tenant, data, prompt), services)
