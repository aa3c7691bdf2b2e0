"""The tenant's webhook signing secret: read it to verify deliveries, rotate it when it leaks."""

from fastapi import APIRouter

from service.api.deps import ServicesDep, TenantDep
from service.api.schemas import ErrorResponse, WebhookSecret
from service.core.webhooks import rotate_secret, secret_of

router = APIRouter(prefix="/v1/webhook-secret", tags=["webhooks"])
ERRORS = {code: {"model": ErrorResponse} for code in (401, 429, 503)}


@router.get("", response_model=WebhookSecret, responses=ERRORS)
def get_webhook_secret(tenant: TenantDep, services: ServicesDep) -> WebhookSecret:
    """The secret your jobs' webhooks are signed with (Standard Webhooks), made on first use."""
    return WebhookSecret(secret=secret_of(services.db, tenant.id))


@router.post("", response_model=WebhookSecret, responses=ERRORS)
def rotate_webhook_secret(tenant: TenantDep, services: ServicesDep) -> WebhookSecret:
    """A new secret: every delivery from now on, retries included, is signed with it."""
    return WebhookSecret(secret=rotate_secret(services.db, tenant.id))
