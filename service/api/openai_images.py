"""The OpenAI images API, so that its clients and tools work unchanged (only ``base_url`` and
``api_key`` set): ``POST /v1/images/generations`` and ``GET /v1/models``. Same keys, limits,
queue and batching as ``/v1/generations``, which does the work; errors in OpenAI's shape."""

import base64
import re
import time
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from service.api.deps import ServicesDep, SubmissionRateDep, TenantDep
from service.api.schemas import GenerationRequest, PlainText
from service.context import Services
from service.core.contract import GenerateResult, parse_result
from service.core.ids import is_valid_id
from service.core.tenants import Tenant
from service.core.worker_registry import base_shape
from service.errors import ApiError, invalid
from service.submission import submit_generation

router = APIRouter(tags=["openai"])
_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
MAX_LISTED_MODELS = 1000
"""The newest adapters ``GET /v1/models`` looks at (OpenAI's list has no pages)."""


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class OpenAIErrorResponse(BaseModel):
    error: OpenAIError


ERRORS = {code: {"model": OpenAIErrorResponse} for code in (400, 401, 404, 409, 413, 429, 503, 504)}


class ImageRequest(BaseModel):
    """OpenAI's image generation body; the fields atomtune has no use for are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")

    prompt: PlainText = Field(min_length=1, max_length=1000)
    model: str | None = Field(default=None, description="The base's id (as `GET /v1/models` lists it) or an adapter id")
    n: StrictInt = Field(default=1, ge=1, le=4)
    size: str | None = Field(default=None, description="`WxH` in pixels; the base's own size when omitted")
    response_format: Literal["url", "b64_json"] = "url"
    user: str | None = Field(default=None, max_length=256, description="Accepted and not used")


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


def _adapter_id(model: str | None, tenant: Tenant, services: Services) -> str | None:
    """The adapter a ``model`` names, or None for the base; 404 for anything else."""
    if model is None:
        return None
    base = base_shape(services.db)
    if base is not None and model == base.name:
        return None
    record = services.catalog.get(model) if is_valid_id(model) else None
    if record is None or record.tenant_id != tenant.id:
        raise ApiError(404, "model_not_found", f"model '{model}' does not exist; GET /v1/models lists yours")
    return record.id


def _side(size: str | None) -> tuple[int | None, int | None]:
    if size is None:
        return None, None
    match = _SIZE.fullmatch(size)
    if match is None:
        raise invalid(f"size must be 'WIDTHxHEIGHT' in pixels, e.g. '1024x1024'; got {size!r}")
    return int(match[1]), int(match[2])


@router.post(
    "/v1/images/generations", response_model=ImagesResponse, responses=ERRORS, dependencies=[SubmissionRateDep]
)
async def create_image(
    body: ImageRequest,
    tenant: TenantDep,
    services: ServicesDep,
    connection: Request,
) -> ImagesResponse:
    """Generate images (OpenAI's `images.generate`); `model` may be one of your adapters."""
    adapter_id = await run_in_threadpool(_adapter_id, body.model, tenant, services)
    width, height = _side(body.size)
    try:
        request = GenerationRequest(
            prompt=body.prompt, adapter_id=adapter_id, num_images=body.n, width=width, height=height
        )
    except ValidationError as exc:
        # Only the size can break the generation's own bounds: the rest is ImageRequest's.
        raise invalid(f"size {body.size!r}: {exc.errors()[0]['msg']}") from None
    wait = services.settings.max_wait_seconds
    async with services.stream_slots.hold(tenant.id):
        job_id = await run_in_threadpool(submit_generation, services, tenant, request)
        job = await services.watcher.wait(job_id, wait, connection.is_disconnected)
    if job is None:
        raise ApiError(
            504, "timeout", f"not done within {wait:g} s; job '{job_id}' goes on: GET /v1/jobs/{job_id} has it"
        )
    if job.status != "succeeded" or job.result is None:
        error = job.error_message or job.status
        raise ApiError(500 if job.error_code == "internal" else 400, job.error_code or job.status, error)
    result = parse_result(job.kind, job.result)
    assert isinstance(result, GenerateResult)
    paths = [services.storage.output_image(job.tenant_id, job.id, index) for index in range(result.image_count)]
    if body.response_format == "b64_json":
        data = [ImageData(b64_json=base64.b64encode(path.read_bytes()).decode()) for path in paths]
    else:
        # Fetched with the same key: these URLs are not signed for anyone who has them.
        base_url = str(connection.base_url).rstrip("/")
        data = [ImageData(url=f"{base_url}/v1/jobs/{job.id}/images/{index}") for index in range(len(paths))]
    return ImagesResponse(created=int(job.finished_at or time.time()), data=data)


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)
def list_models(tenant: TenantDep, services: ServicesDep) -> ModelList:
    """The base (once a worker serves it) and your ready adapters (of your newest 1,000), as OpenAI's list."""
    models = []
    base = base_shape(services.db)
    if base is not None and base.name:
        models.append(Model(id=base.name, created=0, owned_by="atomtune"))
    for adapter_id in services.catalog.page(tenant.id, MAX_LISTED_MODELS, None):
        record = services.catalog.get(adapter_id)
        if record is not None and record.ready_at is not None:
            models.append(Model(id=record.id, created=int(record.created_at), owned_by=tenant.name))
    return ModelList(data=models)
