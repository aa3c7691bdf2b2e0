"""The gateway: ``create_app(settings)`` builds the FastAPI application (``uvicorn --factory``)."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.api import adapters, generations, health, jobs, openai_images, webhooks
from service.api.playground import mount_playground
from service.body_limit import BodyLimitMiddleware
from service.context import Services
from service.core.contract import MessageError
from service.core.settings import Settings, get_settings
from service.errors import error_response, install_error_handlers
from service.metrics import install_metrics

log = logging.getLogger(__name__)
UNAVAILABLE_RETRY_AFTER_SECONDS = 5

DESCRIPTION = """Fine-tune sparse dictionary adapters on a shared frozen PixArt-Σ and generate with them.

Every error answers `{"error": {"code", "message"}}`; the message says what to fix."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services.build(settings)
        app.state.services = services
        yield
        await services.close()

    app = FastAPI(
        title="atomtune",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        # Operation ids are the route functions' names (``get_job``), which the links between
        # operations name and generated clients turn into method names.
        generate_unique_id_function=lambda route: route.name,
    )
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_request_bytes, max_json_bytes=settings.max_json_bytes
    )
    # After the body limit, so the metrics middleware is outside it and counts its refusals too.
    install_metrics(app)
    install_error_handlers(app)

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        # Redis calls retry through a restart first (redis_db.connect): this is an outage to wait out.
        log.warning("Redis or the broker failed a request: %r", exc)
        message = "the job queue (Redis) is unavailable; retry in a few seconds"
        retry = {"Retry-After": str(UNAVAILABLE_RETRY_AFTER_SECONDS)}
        return error_response(request, 503, "unavailable", message, retry)

    for error in (RedisConnectionError, RedisTimeoutError, OperationalError):
        app.add_exception_handler(error, unavailable)

    async def unreadable(request: Request, exc: Exception) -> JSONResponse:
        # A job record written by a worker of another atomtune version: an operator's problem to fix.
        assert isinstance(exc, MessageError)
        return error_response(request, 500, exc.code, exc.message)

    app.add_exception_handler(MessageError, unreadable)

    for module in (health, adapters, generations, jobs, openai_images, webhooks):
        app.include_router(module.router)
    mount_playground(app)
    return app
