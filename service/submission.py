"""From a request to a queued job: every check against the served base and the adapter's record, the
kind's typed message (``service.core.contract``), the job record within the tenant's quota, and the
message on its queue.

This is the one place a job's parameters are checked; the worker trusts the message it reads.
"""

import logging
import secrets
from collections import Counter
from collections.abc import Callable

from fastapi import UploadFile

from service.api.deps import owned_adapter
from service.api.schemas import AdapterUseRequest, AtomMask, GenerationRequest, TrainingForm
from service.context import Services
from service.core.catalog import AdapterRecord
from service.core.contract import (
    MAX_SEED,
    AdapterSpec,
    AdapterUse,
    AtomMaskSpec,
    FinetuneParams,
    GenerateParams,
    JobParams,
    TrainingSpec,
)
from service.core.ids import new_id
from service.core.queue import enqueue
from service.core.storage import read_atoms
from service.core.tenants import Tenant
from service.core.webhooks import WebhookRefused, check_url
from service.core.worker_registry import BaseShape, base_shape
from service.errors import ApiError, invalid
from service.images import MAX_IMAGES, CheckedImage, check_image
from service.metrics import JOBS_SUBMITTED

log = logging.getLogger(__name__)
# PixArt's VAE downsamples by 8 and its transformer patches latents by 2.
SIDE_MULTIPLE = 16

JOB_QUOTA_RETRY_SECONDS = 5
"""What a 429 of the job quota tells clients to wait: about a short generation's time."""


UNPUBLISHED_MAX_SIDE = 1024
"""The largest side accepted before any worker has published the base (PixArt-Σ's own size)."""


def native_side(base: BaseShape | None) -> int:
    """The side the served base was trained at, as its workers publish it."""
    return base.sample_size if base is not None and base.sample_size else UNPUBLISHED_MAX_SIDE


def check_side(name: str, value: int | None, native: int, services: Services) -> None:
    max_side = services.settings.max_resolution or native
    if value is not None and (value > max_side or value % SIDE_MULTIPLE):
        raise invalid(f"{name} must be a multiple of {SIDE_MULTIPLE} and at most {max_side}")


def check_cost(request: GenerationRequest, native: int, services: Services) -> None:
    """Bounds what one generation may hold a worker for: images x steps x pixels."""
    pixels = (request.width or native) * (request.height or native)
    cost = request.num_images * request.steps * pixels / native**2
    budget = services.settings.max_image_steps
    if cost > budget:
        raise invalid(
            f"this generation costs {cost:g} image-steps at the base's {native} px (images x steps x pixels); "
            f"the limit is {budget:g}: use fewer images or steps, or a smaller size"
        )


def _random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


def check_webhook(url: str | None, services: Services) -> None:
    if url is not None:
        try:
            check_url(url, services.settings)
        except WebhookRefused as exc:
            raise invalid(str(exc)) from None


def submit(
    services: Services,
    tenant: Tenant,
    job_id: str,
    params: JobParams,
    undo: Callable[[], None] | None = None,
    webhook_url: str | None = None,
) -> None:
    """Records the job as queued (429 if the tenant has its limit of active jobs) and queues it.

    If either fails, ``undo`` removes what was written for the job. A job that cannot be queued is
    failed, so that it holds no slot of the tenant's quota, and the error propagates (503).
    """
    limit = services.settings.max_active_jobs_per_tenant
    if services.jobs.create(job_id, tenant.id, params, max_active=limit, webhook_url=webhook_url) is None:
        if undo is not None:
            undo()
        raise ApiError(
            429,
            "too_many_jobs",
            f"you have {limit} jobs queued or running; wait for some to finish or cancel them",
            headers={"Retry-After": str(JOB_QUOTA_RETRY_SECONDS)},
        )
    try:
        enqueue(services.celery, params.kind, job_id)
    except Exception:
        try:
            services.jobs.abandon(job_id, "unavailable", "the job could not be queued; submit it again")
            if undo is not None:
                undo()
        except Exception:
            log.exception("cleaning up job %s, which could not be queued, failed", job_id)
        raise
    JOBS_SUBMITTED.labels(params.kind).inc()


def read_upload(upload: UploadFile, limit: int) -> bytes:
    """At most one byte past the limit: enough to know the file is too large without reading all of it."""
    return upload.file.read(limit + 1)


def submit_finetune(services: Services, tenant: Tenant, form: TrainingForm) -> tuple[str, str]:
    """Checks the form and the images, stores the uploads and queues the training: (adapter id, job id)."""
    images = form.images
    settings = services.settings
    if not 1 <= len(images) <= MAX_IMAGES:
        raise invalid(f"send 1-{MAX_IMAGES} images in the 'images' field; got {len(images)}")
    base = base_shape(services.db)
    check_side("resolution", form.resolution, native_side(base), services)
    check_webhook(form.webhook_url, services)
    if form.captions is not None and len(form.captions) != len(images):
        raise invalid(f"send one caption per image: {len(form.captions)} captions for {len(images)} images")
    # Until a worker has published the base, the engine's own check fails the job instead.
    if base is not None and form.atoms % base.num_heads:
        raise invalid(f"atoms ({form.atoms}) must be a multiple of the base model's {base.num_heads} attention heads")
    checked: list[CheckedImage] = [
        check_image(
            upload.filename or f"#{i}",
            read_upload(upload, settings.max_image_bytes),
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

    params = FinetuneParams(
        adapter_id=adapter_id,
        prompt=form.prompt,
        captions=form.captions,
        adapter=AdapterSpec(num_atoms=form.atoms, density=form.density, activation=form.activation),
        training=TrainingSpec(
            steps=form.steps,
            learning_rate=form.learning_rate,
            batch_size=form.batch_size,
            seed=form.seed if form.seed is not None else _random_seed(),
            resolution=form.resolution,
            image_count=len(names),
        ),
        images=names,
    )
    services.catalog.create(
        adapter_id,
        tenant.id,
        form.prompt,
        "trained",
        params.adapter.model_dump(),
        params.training.model_dump(),
        job_id,
    )

    def discard() -> None:
        services.catalog.delete(adapter_id, tenant.id)
        services.storage.remove_adapter(tenant.id, adapter_id)

    submit(services, tenant, job_id, params, undo=discard, webhook_url=form.webhook_url)
    return adapter_id, job_id


def _atom_mask(mask: AtomMask, record: AdapterRecord) -> AtomMaskSpec:
    num_atoms = int(record.config["num_atoms"])
    blocks = set(record.blocks or [])
    for block, atoms in mask.blocks.items():
        if block not in blocks:
            raise invalid(f"atom_mask names block {block}; the adapter's blocks are {sorted(blocks)}")
        if bad := [a for a in atoms if not 0 <= a < num_atoms]:
            raise invalid(f"atom_mask block {block}: atoms {bad} are outside 0-{num_atoms - 1}")
        if repeated := sorted(a for a, n in Counter(atoms).items() if n > 1):
            raise invalid(f"atom_mask block {block}: atoms {repeated} are listed more than once; list each once")
    # Sorted, so equal masks are stored (and logged) the same way whatever order they came in.
    return AtomMaskSpec(mode=mask.mode, blocks={block: sorted(atoms) for block, atoms in mask.blocks.items()})


def _check_adapter(use: AdapterUseRequest, record: AdapterRecord, services: Services) -> None:
    job = services.jobs.get(record.job_id) if record.job_id else None
    if (status := record.status(job)) != "ready":
        raise ApiError(409, "adapter_not_ready", f"adapter '{record.id}' is {status}; wait until it is ready")
    if use.top_atoms is not None:
        _check_ranked(record, use.top_atoms, "top_atoms", services)


def _check_ranked(record: AdapterRecord, count: int, option: str, services: Services) -> None:
    """``option`` picks the adapter's ``count`` most important atoms: it needs that many, ranked."""
    num_atoms = int(record.config["num_atoms"])
    if count > num_atoms:
        raise invalid(f"{option} must be at most the adapter's {num_atoms} atoms")
    if read_atoms(services.storage.adapter_dir(record.tenant_id, record.id)) is None:
        raise invalid(f"adapter '{record.id}' carries no atom importance, so {option} cannot rank its atoms")


def _adapter_uses(request: GenerationRequest) -> list[AdapterUseRequest]:
    """The adapters a request composes, its single-adapter form (``adapter_id``) included."""
    single_form = [
        name for name in ("adapter_id", "density", "atom_mask", "top_atoms") if getattr(request, name) is not None
    ]
    if request.adapters is not None:
        if single_form:
            raise invalid(f"give {', '.join(single_form)} inside each of adapters, or no adapters list")
        if repeated := sorted(i for i, n in Counter(use.id for use in request.adapters).items() if n > 1):
            raise invalid(f"adapters names {repeated} more than once; compose each adapter once, with a scale")
        return request.adapters
    if request.adapter_id is None:
        for option in ("density", "atom_mask", "top_atoms"):
            if getattr(request, option) is not None:
                raise invalid(f"{option} applies to an adapter; give adapter_id too")
        return []
    return [
        AdapterUseRequest(
            id=request.adapter_id, density=request.density, atom_mask=request.atom_mask, top_atoms=request.top_atoms
        )
    ]


def submit_generation(services: Services, tenant: Tenant, request: GenerationRequest) -> str:
    """Checks the request against its adapters and queues the generation; returns the job id."""
    native = native_side(base_shape(services.db))
    check_side("width", request.width, native, services)
    check_side("height", request.height, native, services)
    check_cost(request, native, services)
    check_webhook(request.webhook_url, services)
    uses = _adapter_uses(request)
    if not uses and "adapter_guidance" in request.model_fields_set:
        raise invalid("adapter_guidance applies to an adapter; give adapter_id or adapters too")
    if not uses and request.attribution is not None:
        raise invalid("attribution maps an adapter's atoms; give adapter_id or adapters too")
    adapters = []
    for index, use in enumerate(uses):
        record = owned_adapter(use.id, tenant, services)
        _check_adapter(use, record, services)
        if index == 0 and request.attribution is not None:
            _check_ranked(record, request.attribution, "attribution", services)
        adapters.append(
            AdapterUse(
                adapter_id=record.id,
                scale=use.scale,
                density=use.density,
                atom_mask=_atom_mask(use.atom_mask, record) if use.atom_mask is not None else None,
                top_atoms=use.top_atoms,
            )
        )
    params = GenerateParams(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        adapters=adapters,
        adapter_guidance=request.adapter_guidance,
        attribution_atoms=request.attribution,
        num_images=request.num_images,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        width=request.width,
        height=request.height,
        seed=request.seed if request.seed is not None else _random_seed(),
    )
    job_id = new_id()
    submit(services, tenant, job_id, params, webhook_url=request.webhook_url)
    return job_id
