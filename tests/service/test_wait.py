"""``?wait=`` keeps its deadline whatever its value, and gives its stream slot back as soon as the
client leaves: against a gateway whose jobs no worker takes, so every job stays queued."""

import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from service.core.redis_db import connect, tenant_streams_key
from service.core.tenants import TenantStore
from tests.service.conftest import Api, serve_gateway, tenant_clients, wait_until


@pytest.fixture(scope="module")
def idle_gateway(
    own_redis_url: str, service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    env = {**service_env, "ATOMTUNE_REDIS_URL": own_redis_url, "ATOMTUNE_MAX_ACTIVE_JOBS_PER_TENANT": "100"}
    yield from serve_gateway(env, tmp_path_factory)


@pytest.fixture
def tenant(idle_gateway: str, own_redis_url: str) -> Iterator[Callable[..., Api]]:
    yield from tenant_clients(idle_gateway, TenantStore(connect(own_redis_url)))


@pytest.mark.parametrize("wait", [2.6e-182, 0.0005, 0.003])
def test_a_wait_of_a_few_milliseconds_or_less_answers_at_once(tenant: Callable[..., Api], wait: float) -> None:
    api = tenant("waiter")
    started = time.monotonic()
    response = api.post("/v1/generations", json={"prompt": "p"}, params={"wait": wait})
    elapsed = time.monotonic() - started
    assert response.status_code == 202 and response.json()["job"] is None, response.text
    assert elapsed < 1.0, elapsed


def test_a_wait_ends_at_its_deadline_with_the_job_still_queued(tenant: Callable[..., Api]) -> None:
    api = tenant("waiter")
    started = time.monotonic()
    response = api.post("/v1/generations", json={"prompt": "p"}, params={"wait": 0.8})
    elapsed = time.monotonic() - started
    assert response.status_code == 202, response.text
    assert 0.8 <= elapsed < 2.0, elapsed
    assert api.get(f"/v1/jobs/{response.json()['job_id']}").json()["status"] == "queued"


def test_a_client_that_leaves_a_wait_gives_its_slot_back_at_once(
    tenant: Callable[..., Api], own_redis_url: str
) -> None:
    api = tenant("leaver", timeout=0.5)
    with pytest.raises(httpx.ReadTimeout):
        api.post("/v1/generations", json={"prompt": "p"}, params={"wait": 30})
    db = connect(own_redis_url)
    slots = tenant_streams_key(api.tenant_id)  # type: ignore[attr-defined]
    left = time.monotonic()
    wait_until(lambda: db.get(slots) in (None, "0"), 5, "the wait's stream slot to be given back")
    assert time.monotonic() - left < 2.0
