"""Connections that send half a request's head are closed after the header timeout, on a fresh
connection and on a kept-alive one; a request whose head arrived is never cut, however long it
takes. Against a gateway of its own whose jobs no worker takes."""

import socket
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from service.core.redis_db import connect
from service.core.tenants import TenantStore
from tests.service.conftest import serve_gateway

HEADER_TIMEOUT = 1.0
HALF_HEAD = b"GET /healthz HTTP/1.1\r\nHost: atomtune\r\nX-Slow: "


@pytest.fixture(scope="module")
def strict_gateway(own_env: Callable[..., dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = own_env("connections", header_timeout_seconds=str(HEADER_TIMEOUT), keep_alive_seconds="30")
    yield from serve_gateway(env, tmp_path_factory)


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """Reads until the server closes (True) or ``within`` seconds pass (False); skips any response."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


def test_half_sent_heads_are_cut_off_and_whole_requests_are_not(strict_gateway: str, own_redis_url: str) -> None:
    address = urlsplit(strict_gateway)
    endpoint = (address.hostname, address.port)
    stalled = [socket.create_connection(endpoint) for _ in range(10)]
    for sock in stalled:
        sock.sendall(HALF_HEAD)
    started = time.monotonic()
    assert all(_closed_by_server(sock, HEADER_TIMEOUT + 3) for sock in stalled)
    assert time.monotonic() - started < HEADER_TIMEOUT + 3

    # A kept-alive connection: one whole request, answered; then half a head, cut off.
    with socket.create_connection(endpoint) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: atomtune\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(HEADER_TIMEOUT / 2)
        sock.sendall(HALF_HEAD)
        assert _closed_by_server(sock, HEADER_TIMEOUT + 3)

    # A request that takes longer than the header timeout, its head sent at once, is answered.
    key = TenantStore(connect(own_redis_url)).create("patient")[1]
    with httpx.Client(base_url=strict_gateway, headers={"Authorization": f"Bearer {key}"}) as api:
        started = time.monotonic()
        response = api.post("/v1/generations", json={"prompt": "p"}, params={"wait": 3 * HEADER_TIMEOUT})
        assert response.status_code == 202, response.text
        assert time.monotonic() - started >= 3 * HEADER_TIMEOUT
    # An idle kept-alive connection is the keep-alive timeout's (30 s here), not the header timeout's.
    with socket.create_connection(endpoint) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: atomtune\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        assert not _closed_by_server(sock, HEADER_TIMEOUT * 2)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: atomtune\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
