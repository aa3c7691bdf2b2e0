"""Configuration shared by the gateway, the workers and the CLI (env prefix ``ATOMTUNE_``)."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

import limits
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Every field is documented in the README's configuration table; keep the two in step."""

    model_config = SettingsConfigDict(env_prefix="ATOMTUNE_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    data_dir: Path = Path("data")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    worker_metrics_port: int = Field(
        default=9101,
        ge=0,
        le=65535,
        description="First port of a worker's /metrics; pool process i serves on this + i. 0 turns it off.",
    )

    base_model: str | None = Field(
        default=None,
        description="Local diffusers folder or hub id of a PixArt-Sigma pipeline; `up` fills in a tiny one.",
    )
    device: str = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_sequence_length: int = Field(default=300, ge=1, le=512)

    device_cache_slots: int = Field(default=32, ge=1)
    host_cache_bytes: int = Field(default=2048 * MiB, ge=0)

    max_image_bytes: int = Field(default=10 * MiB, ge=1)
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    max_request_bytes: int = Field(default=110 * MiB, ge=1)
    max_json_bytes: int = Field(default=1 * MiB, ge=1, description="Largest JSON request body")
    max_adapter_bytes: int = Field(default=100 * MiB, ge=1)
    max_resolution: int | None = Field(
        default=None, ge=16, description="Largest image side; the served base's own when unset"
    )
    max_image_steps: float = Field(
        default=400,
        gt=0,
        description="What one generation may cost: images x steps x pixels, in images at the base's own size",
    )
    header_timeout_seconds: float = Field(
        default=10.0, gt=0, description="Time a connection has to send a request's head (headers)"
    )
    keep_alive_seconds: int = Field(default=5, ge=1, description="An idle connection is closed after this long")
    max_active_jobs_per_tenant: int = Field(default=16, ge=1)
    max_wait_seconds: float = Field(default=60.0, ge=0)
    max_streams_per_tenant: int = Field(default=8, ge=1)

    rate_limit_requests: str = Field(
        default="1200/minute", description="Requests per tenant, in `limits` notation (count/period)"
    )
    rate_limit_submissions: str = Field(default="120/minute", description="Job submissions per tenant")
    rate_limit_auth_failures: str = Field(default="30/minute", description="Failed authentications per client address")

    @field_validator("rate_limit_requests", "rate_limit_submissions", "rate_limit_auth_failures")
    @classmethod
    def _parses_as_a_rate(cls, value: str) -> str:
        try:
            limits.parse(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a rate; write it like '120/minute' or '10 per 5 seconds'") from None
        return value

    max_batch: int = Field(
        default=64,
        ge=1,
        description="Rows in one denoising step of a generation worker, and generations it takes at once.",
    )
    max_batch_tokens: int = Field(
        default=65536,
        ge=1,
        description="Rows times latent tokens in one denoising step: the activation-memory bound of a batch.",
    )

    job_retention_seconds: int = Field(
        default=7 * 24 * 3600, ge=1, description="How long an ended job's record stays (then GET answers 404)"
    )
    output_retention_seconds: int = Field(
        default=24 * 3600, ge=1, description="How long a generation's images stay after it ended"
    )
    upload_retention_seconds: int = Field(
        default=3600, ge=1, description="How long a fine-tune's training images stay after it ended"
    )
    retention_sweep_seconds: float = Field(default=300.0, gt=0, description="How often a worker sweeps")

    webhook_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts a webhook may go to whatever they resolve to (a JSON list), e.g. an internal receiver",
    )
    webhook_allow_http: bool = Field(default=False, description="Let webhooks go over plain HTTP")
    webhook_max_attempts: int = Field(default=6, ge=1, le=20)
    webhook_backoff_seconds: float = Field(default=2.0, gt=0, description="Wait before the 2nd attempt, doubling")
    webhook_timeout_seconds: float = Field(default=5.0, gt=0)

    job_time_limit_seconds: int = Field(default=3600, ge=10)
    max_job_attempts: int = Field(default=3, ge=1)
    worker_heartbeat_seconds: float = Field(default=5.0, gt=0)
    lost_message_seconds: float = Field(
        default=30.0, gt=0, description="A job queued this long with no message in the broker is sent again"
    )

    @model_validator(mode="after")
    def _images_go_with_their_job(self) -> "Settings":
        if self.output_retention_seconds > self.job_retention_seconds:
            raise ValueError("output_retention_seconds must be at most job_retention_seconds: images are served by job")
        return self

    @property
    def job_soft_time_limit_seconds(self) -> int:
        # The soft limit fires first so the task itself can record why it stopped.
        return self.job_time_limit_seconds * 9 // 10

    @property
    def visibility_timeout_seconds(self) -> int:
        # Redis redelivers an unacked message after this long; it must outlast the longest job
        # or a healthy job would run twice.
        return self.job_time_limit_seconds + 600


@lru_cache
def get_settings() -> Settings:
    return Settings()
