"""The contract between the gateway and the workers: per job kind, a typed message for its parameters
(written by the gateway, read by a worker) and one for its result (written by the worker, read by
the gateway), and the words and bounds that both sides, the API schemas included, take from here.

Messages travel as JSON in the job's record. Each carries ``schema_version`` and a process reads
only its own version, so a gateway and a worker of different atomtune versions refuse each other's
messages with a ``MessageError`` that says so, instead of misreading a field.

The gateway has checked every value before it writes a message (against the API's bounds, the
adapter's record and the served base); a worker trusts them and checks only the form.
"""

from typing import Any, ClassVar, Literal, Self, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

SCHEMA_VERSION = 5
"""Bump on any change to a message below that a reader of the previous version would misread."""

JobKind = Literal["finetune", "generate"]
Activation = Literal["topk", "relu", "soft_threshold"]
ACTIVATIONS: tuple[Activation, ...] = get_args(Activation)
CacheTier = Literal["device", "host", "storage"]
"""Where a worker found an adapter: resident on its device, in its host memory, or in storage."""
CACHE_TIERS: tuple[CacheTier, ...] = get_args(CacheTier)
"""From the warmest to the coldest."""
AtomMaskMode = Literal["keep", "drop"]
GuidanceBranch = Literal["conditional", "unconditional", "both"]
"""Which half of a classifier-free-guidance batch an adapter acts on (the engine's ``guided_routes``)."""
GUIDANCE_BRANCHES: tuple[GuidanceBranch, ...] = get_args(GuidanceBranch)

MAX_SEED = 2**32 - 1
# The engine's own bounds (adapters' MAX_BLOCKS and MAX_ATOMS; a test keeps them equal). The core
# is torch-free, so they are repeated here rather than imported.
MAX_BLOCKS = 1024
MAX_ATOMS = 4096
MAX_COMPOSED = 4
"""Adapters one generation may compose (the engine's ``MAX_COMPOSED``)."""
MAX_ADAPTER_SCALE = 2.0
"""The largest magnitude of a composed adapter's scale."""


class JobError(Exception):
    """Ends a job as failed, with the ``code`` and ``message`` its owner reads."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class MessageError(JobError, ValueError):
    """A job message this process cannot read."""


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Message(_Part):
    what: ClassVar[str]
    """What the message holds, for error messages: "parameters" or "result"."""

    schema_version: int = SCHEMA_VERSION

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Self:
        """Reads a message of this process's schema version; anything else raises ``MessageError``."""
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            written = "no message schema version" if version is None else f"message schema {version}"
            raise MessageError(
                "version_mismatch",
                f"this job's {cls.what} came with {written}, and this process reads schema {SCHEMA_VERSION} "
                "only: the gateway and the workers run different atomtune versions; run one version on both",
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or "message"
            raise MessageError(
                "invalid_message",
                f"this job's {cls.what} cannot be read with message schema {SCHEMA_VERSION} ({where}: {error['msg']})",
            ) from None


class AdapterSpec(_Part):
    """The engine configuration a fine-tune asks for (the rest of it comes from the served base)."""

    num_atoms: int
    density: float
    activation: Activation


class TrainingSpec(_Part):
    steps: int
    learning_rate: float
    batch_size: int
    seed: int
    resolution: int | None
    """Training image side in pixels; None is the base model's own size."""
    image_count: int


class FinetuneParams(Message):
    kind: ClassVar[JobKind] = "finetune"
    what: ClassVar[str] = "parameters"

    adapter_id: str
    """The adapter record the job trains; its uploads folder holds ``images``."""
    prompt: str
    captions: list[str] | None
    """One caption per image, in ``images``' order; None trains every image on ``prompt``."""
    adapter: AdapterSpec
    training: TrainingSpec
    images: list[str]
    """File names in the adapter's uploads folder."""

    @property
    def total_steps(self) -> int:
        return self.training.steps


class AtomMaskSpec(_Part):
    mode: AtomMaskMode
    blocks: dict[int, list[int]]
    """Block index -> distinct atom indices, sorted; blocks not named keep every atom."""


class AdapterUse(_Part):
    """One adapter a generation applies, and how."""

    adapter_id: str
    scale: float
    density: float | None
    atom_mask: AtomMaskSpec | None
    top_atoms: int | None


class GenerateParams(Message):
    kind: ClassVar[JobKind] = "generate"
    what: ClassVar[str] = "parameters"

    prompt: str
    negative_prompt: str
    adapters: list[AdapterUse]
    """Empty for the base model; several are composed, their updates added up."""
    adapter_guidance: GuidanceBranch
    attribution_atoms: int | None = None
    """Record where the K most important atoms of every block of the first adapter act."""
    num_images: int
    steps: int
    guidance_scale: float
    width: int | None
    height: int | None
    seed: int

    @property
    def total_steps(self) -> int:
        return self.steps

    @property
    def adapter_id(self) -> str | None:
        """The first adapter, which the job record names."""
        return self.adapters[0].adapter_id if self.adapters else None


class FinetuneResult(Message):
    what: ClassVar[str] = "result"

    adapter_id: str


class AppliedAdapter(_Part):
    adapter_id: str
    scale: float
    tier: CacheTier


class GenerateResult(Message):
    what: ClassVar[str] = "result"

    image_count: int
    seed: int
    adapter_tier: CacheTier | None
    """The coldest tier its adapters were found in; None without an adapter."""
    adapters: list[AppliedAdapter]
    """What was applied, in order."""
    attribution: bool = False
    """Whether its outputs hold attribution maps."""
    batch_size: int
    """The most rows (of every request in the batch, this one's included) in one of its denoising
    steps; classifier-free guidance gives a request two rows per image."""


JobParams = FinetuneParams | GenerateParams
JobResult = FinetuneResult | GenerateResult
_RESULTS: dict[JobKind, type[FinetuneResult] | type[GenerateResult]] = {
    "finetune": FinetuneResult,
    "generate": GenerateResult,
}


def parse_result(kind: JobKind, data: dict[str, Any]) -> JobResult:
    return _RESULTS[kind].parse(data)
