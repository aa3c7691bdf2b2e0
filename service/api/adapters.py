import secrets
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from service.api.deps import AdapterDep, ServicesDep, TenantDep, check_side, create_job, send_job
from service.api.schemas import (
    MAX_SEED,
    AdapterCreated,
    AdapterOut,
    AdapterPage,
    AtomsOut,
    ErrorResponse,
    TrainingForm,
)
from service.bundles import unpack_adapter_zip, zip_folder
from service.catalog import AdapterRecord
from service.context import Services
from service.errors import ApiError, invalid
from service.ids import is_valid_id, new_id
from service.images import MAX_IMAGES, CheckedImage, check_image
from service.storage import ADAPTER_SUBDIR, read_atoms
from service.tenants import Tenant
from service.workers_registry import BaseShape, base_shape

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])
ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 409, 413, 415, 422, 429, 503)}


def _read_upload(upload: UploadFile, limit: int) -> bytes:
    # One byte past the limit is enough to know it is too large without reading all of it.
    return upload.file.read(limit + 1)


def _require_ready(record: AdapterRecord, services: Services) -> None:
    job = services.jobs.get(record.job_id) if record.job_id else None
    status = record.status(job)
    if status != "ready":
        raise ApiError(409, "adapter_not_ready", f"adapter '{record.id}' is {status}, not ready")


def _render(record: AdapterRecord, services: Services) -> AdapterOut:
    return AdapterOut.of(record, services.jobs.get(record.job_id) if record.job_id else None)


def _check_atoms(atoms: int, base: BaseShape | None) -> None:
    # Until a worker has published the base, the worker's own check fails the job instead.
    if base is not None and atoms % base.num_heads:
        raise invalid(f"atoms ({atoms}) must be a multiple of the base model's {base.num_heads} attention heads")


@router.post("", status_code=202, response_model=AdapterCreated, responses=ERRORS)
def create_adapter(
    tenant: TenantDep,
    services: ServicesDep,
    form: Annotated[TrainingForm, Form()],
    images: Annotated[list[UploadFile], File(description=f"1-{MAX_IMAGES} PNG, JPEG or WebP images")],
) -> AdapterCreated:
    """Fine-tune a new adapter on the images; the job's progress is at `/v1/jobs/{job_id}`."""
    settings = services.settings
    if not 1 <= len(images) <= MAX_IMAGES:
        raise invalid(f"send 1-{MAX_IMAGES} images in the 'images' field; got {len(images)}")
    check_side("resolution", form.resolution, settings.max_resolution)
    _check_atoms(form.atoms, base_shape(services.db))
    checked: list[CheckedImage] = [
        check_image(
            upload.filename or f"#{i}",
            _read_upload(upload, settings.max_image_bytes),
            settings.max_image_bytes,
            settings.max_image_pixels,
        )
        for i, upload in enumerate(images)
    ]

    adapter_id, job_id = new_id(), new_id()
    uploads = services.storage.uploads_dir(tenant.id, adapter_id)
    uploads.mkdir(parents=True)
    names = []
    for i, image in enumerate(checked):
        name = f"{i}.{image.extension}"
        (uploads / name).write_bytes(image.data)
        names.append(name)

    seed = form.seed if form.seed is not None else secrets.randbelow(MAX_SEED + 1)
    config = {"num_atoms": form.atoms, "density": form.density, "activation": form.activation}
    training = {
        "steps": form.steps,
        "learning_rate": form.learning_rate,
        "seed": seed,
        "resolution": form.resolution,
        "images": len(names),
    }
    services.catalog.create(adapter_id, tenant.id, form.prompt, "trained", config, training, job_id)

    def discard() -> None:
        services.catalog.delete(adapter_id, tenant.id)
        services.storage.remove_adapter(tenant.id, adapter_id)

    params = {"prompt": form.prompt, "config": config, "training": training, "images": names}
    try:
        create_job(services, tenant, job_id, "finetune", params, total=form.steps, adapter_id=adapter_id)
    except ApiError:
        discard()
        raise
    send_job(services, job_id, "finetune", undo=discard)
    return AdapterCreated(adapter_id=adapter_id, job_id=job_id)


@router.get("", response_model=AdapterPage, responses=ERRORS)
def list_adapters(
    tenant: TenantDep,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
) -> AdapterPage:
    """Your adapters, newest first."""
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
    """Deletes the adapter and its files; its training stops if it is still going."""
    if record.job_id:
        services.jobs.cancel(record.job_id)
    services.catalog.delete(record.id, record.tenant_id)
    services.storage.remove_adapter(record.tenant_id, record.id)
    return Response(status_code=204)


@router.get("/{adapter_id}/atoms", response_model=AtomsOut, responses=ERRORS)
def get_atoms(
    record: AdapterDep,
    services: ServicesDep,
    limit: Annotated[int | None, Query(ge=1, description="Only the K most important atoms per layer")] = None,
) -> AtomsOut:
    """Atom importance per layer, most important first."""
    _require_ready(record, services)
    layers = read_atoms(services.storage.adapter_dir(record.tenant_id, record.id))
    if layers is None:
        raise ApiError(409, "no_importance", f"adapter '{record.id}' carries no atom importance")
    if limit is not None:
        layers = [{**layer, "atoms": layer["atoms"][:limit]} for layer in layers]
    return AtomsOut.model_validate({"adapter_id": record.id, "layers": layers})


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


def _import(tenant: Tenant, services: Services, data: bytes, prompt: str) -> AdapterRecord:
    # The engine (and torch) load only here, so a gateway that never imports stays light.
    from adapters import AdapterConfigError, AdapterFormatError
    from worker.adapter_files import inspect_adapter_folder, write_extras

    adapter_id = new_id()
    limit = services.settings.max_adapter_bytes
    with services.storage.replacing(services.storage.adapter_dir(tenant.id, adapter_id)) as tmp:
        folder = tmp / ADAPTER_SUBDIR
        folder.mkdir()
        unpack_adapter_zip(data, folder, limit)
        base = base_shape(services.db)
        if base is None:
            raise ApiError(
                503,
                "no_base_model",
                "no worker has loaded the base model yet, so the adapter cannot be checked against it; "
                "start a worker (atomtune worker) or wait for it to load, and retry",
            )
        try:
            summary = inspect_adapter_folder(folder, base, limit)
        except (AdapterFormatError, AdapterConfigError) as exc:
            raise ApiError(422, "invalid_adapter", str(exc)) from None
        write_extras(tmp, summary)
    services.catalog.create(adapter_id, tenant.id, prompt, "imported", summary.config)
    services.catalog.mark_ready(adapter_id, summary.config, summary.layers, metrics={})
    record = services.catalog.get(adapter_id)
    assert record is not None
    return record


@router.post("/import", status_code=201, response_model=AdapterOut, responses=ERRORS)
def import_adapter(
    tenant: TenantDep,
    services: ServicesDep,
    file: Annotated[UploadFile, File(description="A zip as returned by /download")],
    prompt: Annotated[str, Form(max_length=1000, description="What the adapter depicts")] = "",
) -> AdapterOut:
    """Upload an adapter; the engine's loader validates it before it is stored."""
    limit = services.settings.max_adapter_bytes
    data = _read_upload(file, limit)
    if len(data) > limit:
        raise ApiError(413, "adapter_too_large", f"the zip is over {limit} bytes; the limit is {limit} bytes")
    return _render(_import(tenant, services, data, prompt), services)
