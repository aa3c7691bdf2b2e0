import secrets
from collections import Counter
from contextlib import nullcontext
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.concurrency import run_in_threadpool

from service.api.deps import ServicesDep, TenantDep, check_side, create_job, owned_adapter, send_job
from service.api.schemas import MAX_SEED, ErrorResponse, GenerationAccepted, GenerationRequest, JobOut
from service.catalog import AdapterRecord
from service.context import Services
from service.errors import ApiError, invalid
from service.ids import new_id
from service.storage import read_atoms
from service.tenants import Tenant

router = APIRouter(prefix="/v1/generations", tags=["generations"])
ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 409, 422, 429)}


def _check_adapter_options(request: GenerationRequest, record: AdapterRecord | None, services: Services) -> None:
    if record is None:
        for option in ("density", "atom_mask", "top_atoms"):
            if getattr(request, option) is not None:
                raise invalid(f"{option} applies to an adapter; give adapter_id too")
        return
    job = services.jobs.get(record.job_id) if record.job_id else None
    if (status := record.status(job)) != "ready":
        raise ApiError(409, "adapter_not_ready", f"adapter '{record.id}' is {status}; wait until it is ready")
    num_atoms = int(record.config.get("num_atoms", 0))
    layers = set(record.layers or [])
    if request.top_atoms is not None:
        if request.top_atoms > num_atoms:
            raise invalid(f"top_atoms must be at most the adapter's {num_atoms} atoms")
        if read_atoms(services.storage.adapter_dir(record.tenant_id, record.id)) is None:
            raise invalid(f"adapter '{record.id}' carries no atom importance, so top_atoms cannot rank its atoms")
    if request.atom_mask is not None:
        for layer, atoms in request.atom_mask.layers.items():
            if layer not in layers:
                raise invalid(f"atom_mask names layer {layer}; the adapter's layers are {sorted(layers)}")
            if bad := [a for a in atoms if not 0 <= a < num_atoms]:
                raise invalid(f"atom_mask layer {layer}: atoms {bad} are outside 0-{num_atoms - 1}")
            if repeated := sorted(a for a, n in Counter(atoms).items() if n > 1):
                raise invalid(f"atom_mask layer {layer}: atoms {repeated} are listed more than once; list each once")
        # Sorted, so equal masks are stored (and logged) the same way whatever order they came in.
        request.atom_mask.layers = {layer: sorted(atoms) for layer, atoms in request.atom_mask.layers.items()}


def _submit(request: GenerationRequest, tenant: Tenant, services: Services) -> str:
    check_side("width", request.width, services.settings.max_resolution)
    check_side("height", request.height, services.settings.max_resolution)
    record = owned_adapter(request.adapter_id, tenant, services) if request.adapter_id else None
    _check_adapter_options(request, record, services)
    params = request.model_dump(mode="json")
    if params["seed"] is None:
        params["seed"] = secrets.randbelow(MAX_SEED + 1)
    job_id = new_id()
    create_job(services, tenant, job_id, "generate", params, total=request.steps, adapter_id=request.adapter_id)
    send_job(services, job_id, "generate")
    return job_id


@router.post(
    "",
    status_code=202,
    response_model=GenerationAccepted,
    responses={**ERRORS, 200: {"model": GenerationAccepted, "description": "Finished within `wait`"}},
)
async def create_generation(
    request: GenerationRequest,
    tenant: TenantDep,
    services: ServicesDep,
    response: Response,
    wait: Annotated[
        float, Query(ge=0, description="Seconds to wait for the result (bounded by the server's limit)")
    ] = 0,
) -> GenerationAccepted:
    """Generate images, optionally through an adapter with a density, an atom mask or its top atoms."""
    if wait > services.settings.max_wait_seconds:
        raise invalid(f"wait must be at most {services.settings.max_wait_seconds:g} seconds")
    # The slot is taken before the job is submitted, so a refusal leaves no job behind.
    slot = services.stream_slots.hold(tenant.id) if wait > 0 else nullcontext()
    async with slot:
        job_id = await run_in_threadpool(_submit, request, tenant, services)
        job = await services.watcher.wait(job_id, wait) if wait > 0 else None
    if job is not None:
        response.status_code = 200
    return GenerationAccepted(job_id=job_id, job=JobOut.of(job) if job is not None else None)
