"""Request and response bodies. Bounds here are the documented limits of the API; the words and the
bounds the workers share (activations, cache tiers, atoms, blocks, seeds) come from the core's
contract."""

import re
import unicodedata
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt
from pydantic_core import PydanticCustomError

from service.core.catalog import AdapterRecord, AdapterSource, AdapterStatus
from service.core.contract import (
    MAX_ADAPTER_SCALE,
    MAX_ATOMS,
    MAX_BLOCKS,
    MAX_COMPOSED,
    MAX_SEED,
    Activation,
    AtomMaskMode,
    CacheTier,
    FinetuneResult,
    GuidanceBranch,
    JobKind,
    parse_result,
)
from service.core.jobs import Job, JobStatus
from service.images import MAX_IMAGES


def _time(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None


class ErrorInfo(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorInfo


def _whole_number(value: object) -> object:
    # Form fields arrive as text; pydantic's lax mode would read "3.0" as 3. (JSON bodies use StrictInt.)
    if isinstance(value, bool | float) or (isinstance(value, str) and not re.fullmatch(r"\s*[+-]?\d+\s*", value)):
        raise PydanticCustomError("whole_number", "Input should be a whole number such as 20")
    return value


def _plain_text(text: str) -> str:
    if any(unicodedata.category(c) == "Cc" and c not in "\t\n\r" for c in text):
        raise PydanticCustomError("control_character", "Input should not contain control characters such as NUL")
    return text


WholeNumber = Annotated[int, BeforeValidator(_whole_number)]
OptionalWholeNumber = Annotated[int | None, BeforeValidator(_whole_number)]
PlainText = Annotated[str, AfterValidator(_plain_text)]
Caption = Annotated[str, Field(min_length=1, max_length=1000), AfterValidator(_plain_text)]


WebhookUrl = Annotated[
    str | None,
    Field(
        default=None,
        max_length=2048,
        description="Called with a signed POST of the job when it ends (HTTPS, a public address; see the README)",
    ),
]


class TrainingForm(BaseModel):
    """The multipart form of ``POST /v1/adapters``: the images and the training fields. A field it
    does not know is refused rather than ignored (a misspelt ``stepz`` would train the default)."""

    model_config = ConfigDict(extra="forbid")

    images: list[UploadFile] = Field(description=f"1-{MAX_IMAGES} PNG, JPEG or WebP images (repeat the field)")
    prompt: PlainText = Field(
        min_length=1, max_length=1000, description="Names the concept, e.g. 'a photo of sks dog'"
    )
    captions: list[Caption] | None = Field(
        default=None,
        description="One caption per image, in the images' order (repeat the field); every image is trained on "
        "`prompt` when omitted. Images of the concept in varied contexts, each captioned, teach it to follow "
        "the prompt's context",
    )
    atoms: WholeNumber = Field(default=256, ge=8, le=1024, description="Dictionary atoms per adapted block (M)")
    density: float = Field(default=0.04, gt=0, le=1, description="Fraction of atoms a token uses (k/M)")
    activation: Activation = "topk"
    steps: WholeNumber = Field(default=2000, ge=1, le=5000)
    learning_rate: float = Field(default=3e-3, gt=0, le=0.1)
    batch_size: WholeNumber = Field(default=4, ge=1, le=16, description="Images per training step")
    seed: OptionalWholeNumber = Field(default=None, ge=0, le=MAX_SEED, description="Random when omitted")
    resolution: OptionalWholeNumber = Field(
        default=None, ge=16, le=4096, description="Training size in pixels; the base model's own when omitted"
    )
    webhook_url: WebhookUrl = None


class AdapterCreated(BaseModel):
    adapter_id: str
    job_id: str


class AdapterOut(BaseModel):
    id: str
    status: AdapterStatus
    prompt: str
    source: AdapterSource
    job_id: str | None
    config: dict[str, Any] = Field(description="The engine's adapter configuration")
    training: dict[str, Any] | None = Field(description="Training parameters (trained adapters)")
    metrics: dict[str, Any] | None = Field(description="Training metrics once ready: losses, seconds")
    blocks: list[int] | None = Field(description="The transformer blocks the adapter modifies")
    created_at: datetime
    ready_at: datetime | None

    @classmethod
    def of(cls, record: AdapterRecord, job: Job | None) -> "AdapterOut":
        return cls(
            id=record.id,
            status=record.status(job),
            prompt=record.prompt,
            source=record.source,
            job_id=record.job_id,
            config=record.config,
            training=record.training,
            metrics=record.metrics,
            blocks=record.blocks,
            created_at=_time(record.created_at),  # type: ignore[arg-type]
            ready_at=_time(record.ready_at),
        )


class AdapterPage(BaseModel):
    items: list[AdapterOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last")


class AtomScore(BaseModel):
    atom: int
    importance: float


class BlockAtoms(BaseModel):
    block: int
    atoms: list[AtomScore] = Field(description="Most important first")


class AtomsOut(BaseModel):
    adapter_id: str
    blocks: list[BlockAtoms]


class AtomMask(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: AtomMaskMode = Field(description="Keep only the listed atoms, or drop them")
    # Bounded so that one request cannot store megabytes of job parameters in Redis.
    blocks: dict[int, Annotated[list[StrictInt], Field(max_length=MAX_ATOMS)]] = Field(
        min_length=1,
        max_length=MAX_BLOCKS,
        description="Block index -> distinct atom indices; blocks not named keep every atom",
    )


MAX_ATTRIBUTION_ATOMS = 8


class AdapterUseRequest(BaseModel):
    """One of the adapters a generation composes."""

    model_config = ConfigDict(extra="forbid")

    id: str
    scale: float = Field(
        default=1.0,
        ge=-MAX_ADAPTER_SCALE,
        le=MAX_ADAPTER_SCALE,
        description="Multiplies the adapter's update: 0 leaves it out, a negative scale pushes away from its concept",
    )
    density: float | None = Field(default=None, gt=0, le=1, description="Overrides the adapter's density")
    atom_mask: AtomMask | None = None
    top_atoms: StrictInt | None = Field(default=None, ge=1, description="Keep the K most important atoms per block")


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: PlainText = Field(min_length=1, max_length=1000)
    negative_prompt: PlainText = Field(default="", max_length=1000)
    adapter_id: str | None = Field(default=None, description="One adapter at scale 1 (or give `adapters`)")
    density: float | None = Field(default=None, gt=0, le=1, description="Overrides the adapter's density")
    atom_mask: AtomMask | None = None
    top_atoms: StrictInt | None = Field(default=None, ge=1, description="Keep the K most important atoms per block")
    attribution: StrictInt | None = Field(
        default=None,
        ge=1,
        le=MAX_ATTRIBUTION_ATOMS,
        description="Record where the K most important atoms of every adapted block (of the first adapter) act: "
        "maps at `GET /v1/jobs/{id}/attribution`",
    )
    adapters: list[AdapterUseRequest] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_COMPOSED,
        description=f"Up to {MAX_COMPOSED} adapters composed, each with its own scale, density, atom mask and top "
        "atoms: their updates add up. Instead of `adapter_id` and its options.",
    )
    adapter_guidance: GuidanceBranch = Field(
        default="conditional",
        description="Which classifier-free-guidance branch the adapter acts on: `conditional` (the default: the "
        "guidance scale amplifies the adapter like the prompt), `both` (the adapter at weight 1) or "
        "`unconditional` (steers away from the adapter's concept)",
    )
    num_images: StrictInt = Field(default=1, ge=1, le=4)
    steps: StrictInt = Field(default=20, ge=1, le=100)
    guidance_scale: float = Field(default=4.5, ge=0, le=20)
    width: StrictInt | None = Field(default=None, ge=16, le=4096, description="The base model's size when omitted")
    height: StrictInt | None = Field(default=None, ge=16, le=4096, description="The base model's size when omitted")
    seed: StrictInt | None = Field(default=None, ge=0, le=MAX_SEED, description="Random when omitted")
    webhook_url: WebhookUrl = None


class Progress(BaseModel):
    step: int
    total: int
    loss: float | None = None


class AppliedAdapterOut(BaseModel):
    id: str
    scale: float
    tier: CacheTier


class JobResult(BaseModel):
    adapter_id: str | None = Field(default=None, description="Fine-tuning: the trained adapter")
    images: list[str] | None = Field(default=None, description="Generation: URLs of the PNGs")
    seed: int | None = None
    adapter_tier: CacheTier | None = Field(
        default=None, description="Generation: the coldest cache tier its adapters were found in"
    )
    batch_size: int | None = Field(
        default=None,
        description="Generation: the most rows (of all requests batched with it) in one of its denoising steps",
    )
    adapters: list[AppliedAdapterOut] | None = Field(
        default=None, description="Generation: the adapters applied, in order, and where each was found"
    )
    attribution: str | None = Field(default=None, description="Generation: the URL of its attribution maps")


class WebhookAttemptOut(BaseModel):
    at: datetime
    status_code: int | None = Field(description="The receiver's answer; none when it could not be reached")
    error: str | None


class WebhookOut(BaseModel):
    url: str
    status: Literal["pending", "retrying", "delivered", "failed"] | None = Field(
        description="None while the job runs; `pending` once it ended, until delivered or given up"
    )
    attempts: list[WebhookAttemptOut]


class JobOut(BaseModel):
    id: str
    kind: JobKind
    status: JobStatus
    adapter_id: str | None
    progress: Progress
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested: bool
    attempts: int
    error: ErrorInfo | None
    result: JobResult | None
    webhook: WebhookOut | None = Field(default=None, description="Its webhook's deliveries, if it names one")

    @classmethod
    def of(cls, job: Job) -> "JobOut":
        result = None
        if job.result is not None:
            stored = parse_result(job.kind, job.result)
            if isinstance(stored, FinetuneResult):
                result = JobResult(adapter_id=stored.adapter_id)
            else:
                images = [f"/v1/jobs/{job.id}/images/{n}" for n in range(stored.image_count)]
                result = JobResult(
                    images=images,
                    seed=stored.seed,
                    adapter_tier=stored.adapter_tier,
                    batch_size=stored.batch_size,
                    adapters=[AppliedAdapterOut(id=a.adapter_id, scale=a.scale, tier=a.tier) for a in stored.adapters],
                    attribution=f"/v1/jobs/{job.id}/attribution" if stored.attribution else None,
                )
        error = None
        if job.error_code:
            error = ErrorInfo(code=job.error_code, message=job.error_message or "")
        return cls(
            id=job.id,
            kind=job.kind,
            status=job.status,
            adapter_id=job.adapter_id,
            progress=Progress(step=job.step, total=job.total, loss=job.loss),
            queued_at=_time(job.queued_at),  # type: ignore[arg-type]
            started_at=_time(job.started_at),
            finished_at=_time(job.finished_at),
            cancel_requested=job.cancel_requested,
            attempts=job.attempts,
            error=error,
            result=result,
            webhook=None
            if job.webhook_url is None
            else WebhookOut(
                url=job.webhook_url,
                status=job.webhook_status,  # type: ignore[arg-type]
                attempts=[
                    WebhookAttemptOut(at=_time(a["at"]), status_code=a["status_code"], error=a["error"])  # type: ignore[arg-type]
                    for a in job.webhook_attempts
                ],
            ),
        )


class AtomMapOut(BaseModel):
    atom: int
    maps: list[list[list[float]]] = Field(description="Per image, rows × columns of latent patches")


class BlockAttributionOut(BaseModel):
    block: int
    total: list[list[list[float]]] = Field(description="Per image, the adapter's whole effect (every atom)")
    atoms: list[AtomMapOut] = Field(description="The block's most important atoms, most important first")


class AttributionOut(BaseModel):
    grid: list[int] = Field(description="Rows and columns of the maps (the image's latent patches)")
    blocks: list[BlockAttributionOut]
    overlay: str = Field(description="URL template of a map laid over its image as a PNG (`atom` may be `total`)")


class WebhookSecret(BaseModel):
    secret: str = Field(description="`whsec_` and the base64 of the key that signs your webhooks")


class GenerationAccepted(BaseModel):
    job_id: str
    job: JobOut | None = Field(description="The finished job when `wait` was given and it ended in time")


class Health(BaseModel):
    status: Literal["ok", "ready"]
    workers: int | None = None
