from fastapi import APIRouter
from redis.exceptions import RedisError

from service.api.deps import ServicesDep
from service.api.schemas import ErrorResponse, Health
from service.core import worker_registry
from service.errors import ApiError

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The gateway process is alive."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": ErrorResponse}})
def readyz(services: ServicesDep) -> Health:
    """Redis answers and at least one worker is alive."""
    try:
        services.db.ping()
        workers = worker_registry.alive(services.db, services.settings.worker_heartbeat_seconds)
    except RedisError:
        raise ApiError(503, "not_ready", "Redis does not answer at the configured URL") from None
    if not workers:
        raise ApiError(503, "not_ready", "no worker is alive; start one with `atomtune worker`")
    return Health(status="ready", workers=len(workers))
