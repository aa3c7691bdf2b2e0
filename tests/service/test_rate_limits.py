"""Rate limits: per tenant for requests and for job submissions, per client address for failed
authentications; every refusal a 429 with ``Retry-After``. Against a gateway of its own, on a
Redis of its own whose jobs no worker takes."""

from collections.abc import Callable, Iterator

import httpx
import pytest

from service.core.redis_db import connect
from service.core.tenants import TenantStore
from tests.service.conftest import serve_gateway

REQUESTS, SUBMISSIONS, AUTH_FAILURES = 8, 2, 3


@pytest.fixture(scope="module")
def limited_gateway(own_env: Callable[..., dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = own_env(
        "rate-limits",
        rate_limit_requests=f"{REQUESTS}/minute",
        rate_limit_submissions=f"{SUBMISSIONS}/minute",
        rate_limit_auth_failures=f"{AUTH_FAILURES}/minute",
    )
    yield from serve_gateway(env, tmp_path_factory)


def _retry_after(response: httpx.Response) -> int:
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "rate_limited"
    seconds = int(response.headers["Retry-After"])
    assert 1 <= seconds <= 60
    assert f"retry in {seconds} s" in response.json()["error"]["message"]
    return seconds


def test_tenants_are_limited_each_on_their_own_and_a_guessing_address_is_shut_out(
    limited_gateway: str, own_redis_url: str
) -> None:
    tenants = TenantStore(connect(own_redis_url))
    clients = []
    for name in ("busy", "quiet"):
        key = tenants.create(name)[1]
        clients.append(httpx.Client(base_url=limited_gateway, headers={"Authorization": f"Bearer {key}"}))
    busy, quiet = clients

    for _ in range(SUBMISSIONS):
        assert busy.post("/v1/generations", json={"prompt": "p", "steps": 1}).status_code == 202
    refused = busy.post("/v1/generations", json={"prompt": "p", "steps": 1})
    _retry_after(refused)
    assert "job submissions" in refused.json()["error"]["message"]

    # Every request counts, submissions too: three so far.
    answers = [busy.get("/v1/adapters").status_code for _ in range(REQUESTS - 3)]
    assert answers == [200] * (REQUESTS - 3)
    refused = busy.get("/v1/adapters")
    _retry_after(refused)
    assert "too many requests" in refused.json()["error"]["message"]
    assert quiet.get("/v1/adapters").status_code == 200

    guesser = httpx.Client(base_url=limited_gateway)
    for attempt in range(AUTH_FAILURES):
        key = f"atk_{attempt:026d}_wrong"
        assert guesser.get("/v1/adapters", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    _retry_after(guesser.get("/v1/adapters", headers={"Authorization": "Bearer atk_x_y"}))
    # The address is shut out whatever key it sends now, so guessing cannot go on between good keys.
    _retry_after(quiet.get("/v1/adapters"))
    for client in (*clients, guesser):
        client.close()
