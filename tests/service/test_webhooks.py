"""Webhooks: a job that names a ``webhook_url`` is POSTed to it when it ends, signed as Standard
Webhooks says (checked with the spec's reference library), retried after a failure with the same
message id, recorded on the job, never redirected; and URLs that lead to loopback, private,
link-local or metadata addresses are refused at submission."""

import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from service.core.contract import GenerateParams
from service.core.ids import new_id
from service.core.jobs import JobStore
from service.core.redis_db import connect
from service.core.settings import Settings
from service.core.tenants import TenantStore
from service.core.webhooks import pinned
from tests.service.conftest import Api, free_port, serve_stack, wait_until
from worker.webhooks import WebhookSender

MAX_ATTEMPTS = 3


class Receiver:
    """A local HTTP server that records every delivery and answers from a script per path."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[str, dict[str, str], bytes]] = []
        self.answers: dict[str, list[int]] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.deliveries.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                script = receiver.answers.get(self.path, [])
                status = script.pop(0) if script else 200
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("location", "http://169.254.169.254/latest/meta-data")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def at(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        return [(headers, body) for where, headers, body in self.deliveries if where == path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture(scope="module")
def hooked_stack(own_env: Callable[..., dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = own_env(
        "webhooks",
        # The local receiver: allowed by name, over plain HTTP.
        webhook_allowed_hosts='["127.0.0.1"]',
        webhook_allow_http="true",
        webhook_backoff_seconds="0.3",
        webhook_max_attempts=str(MAX_ATTEMPTS),
    )
    yield from serve_stack(env, tmp_path_factory)


def _webhook_settled(api: httpx.Client, job_id: str) -> Callable[[], bool]:
    def settled() -> bool:
        webhook = api.get(f"/v1/jobs/{job_id}").json()["webhook"]
        return webhook is not None and webhook["status"] in ("delivered", "failed")

    return settled


def test_deliveries_are_signed_retried_recorded_and_never_redirected(
    hooked_stack: str, own_redis_url: str, receiver: Receiver
) -> None:
    key = TenantStore(connect(own_redis_url)).create("hooked")[1]
    api = httpx.Client(base_url=hooked_stack, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    secret = api.get("/v1/webhook-secret").json()["secret"]
    assert secret.startswith("whsec_") and api.get("/v1/webhook-secret").json()["secret"] == secret

    receiver.answers["/flaky"] = [500]
    body = {"prompt": "p", "steps": 2, "seed": 3, "webhook_url": f"{receiver.url}/flaky"}
    job_id = api.post("/v1/generations", json=body).json()["job_id"]
    wait_until(_webhook_settled(api, job_id), 60, "the webhook to be delivered")
    job = api.get(f"/v1/jobs/{job_id}").json()
    webhook = job["webhook"]
    assert webhook["url"] == f"{receiver.url}/flaky" and webhook["status"] == "delivered"
    assert [(a["status_code"], a["error"]) for a in webhook["attempts"]] == [
        (500, "the receiver answered 500"),
        (200, None),
    ]
    deliveries = receiver.at("/flaky")
    assert len(deliveries) == 2
    # The same message id on every attempt, so a receiver can drop repeats.
    assert deliveries[0][0]["webhook-id"] == deliveries[1][0]["webhook-id"] == f"msg_{job_id}"
    headers, raw = deliveries[1]
    delivered = Webhook(secret).verify(raw, headers)
    assert delivered["type"] == "job.succeeded"
    assert delivered["data"]["id"] == job_id and delivered["data"]["status"] == "succeeded"
    assert delivered["data"]["result"]["image_count"] == 1
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(raw.replace(b"succeeded", b"failed"), headers)

    # A rotated secret signs what follows; the old one no longer verifies it.
    rotated = api.post("/v1/webhook-secret").json()["secret"]
    assert rotated != secret and api.get("/v1/webhook-secret").json()["secret"] == rotated
    receiver.answers["/redirect"] = [302] * MAX_ATTEMPTS
    body = {**body, "webhook_url": f"{receiver.url}/redirect"}
    redirected = api.post("/v1/generations", json=body).json()["job_id"]
    wait_until(_webhook_settled(api, redirected), 60, "the redirected webhook to give up")
    webhook = api.get(f"/v1/jobs/{redirected}").json()["webhook"]
    assert webhook["status"] == "failed" and len(webhook["attempts"]) == MAX_ATTEMPTS
    assert all("redirects are not followed" in a["error"] for a in webhook["attempts"])
    headers, raw = receiver.at("/redirect")[0]
    assert Webhook(rotated).verify(raw, headers)["data"]["id"] == redirected
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(raw, headers)
    # Nothing followed the redirect to the metadata address.
    assert {path for path, _, _ in receiver.deliveries} == {"/flaky", "/redirect"}
    api.close()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://example.com/hook", "must be an https URL"),
        ("ftp://example.com/hook", "must be an https URL"),
        ("https://127.0.0.1/hook", "resolves to 127.0.0.1, which is not a public address"),
        ("https://localhost:8443/hook", "which is not a public address"),
        ("https://169.254.169.254/latest/meta-data", "resolves to 169.254.169.254"),
        ("https://10.1.2.3/hook", "resolves to 10.1.2.3"),
        ("https://192.168.0.7/hook", "resolves to 192.168.0.7"),
        ("https://[::1]/hook", "resolves to ::1"),
        ("https://[::ffff:127.0.0.1]/hook", "which is not a public address"),
        ("https://0.0.0.0/hook", "which is not a public address"),
        ("https://user:secret@8.8.8.8/hook", "may not carry credentials"),
        ("https://no-such-host.invalid/hook", "does not resolve"),
        ("https:///hook", "names no host"),
    ],
)
def test_webhooks_to_private_addresses_are_refused_at_submission(
    new_tenant: Callable[[str], Api], image_bytes: Callable[..., bytes], url: str, says: str
) -> None:
    api = new_tenant("ssrf")
    generation = api.post("/v1/generations", json={"prompt": "p", "webhook_url": url})
    assert generation.status_code == 422 and says in generation.json()["error"]["message"], generation.text
    files = [("images", ("a.png", image_bytes((30, 30, 200)), "image/png"))]
    training = api.post("/v1/adapters", data={"prompt": "p", "webhook_url": url}, files=files)
    assert training.status_code == 422 and says in training.json()["error"]["message"], training.text
    assert api.get("/v1/adapters").json()["items"] == []
    assert json.loads(api.get("/v1/webhook-secret").text)["secret"].startswith("whsec_")


def test_an_attempt_goes_to_the_address_checked_not_to_where_the_name_rebinds(
    own_redis_url: str,
    receiver: Receiver,
    generate_params: Callable[..., GenerateParams],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """DNS rebinding: the attacker's name resolves to a public address for the check and to
    loopback (where the receiver listens) a moment later, for the connection."""
    db = connect(own_redis_url)
    tenant = TenantStore(db).create("rebinding")[0]
    port = receiver.server.server_port
    url = f"http://rebind.attacker.test:{port}/rebound"
    job_id = new_id()
    assert JobStore(db).create(job_id, tenant.id, generate_params(steps=1), max_active=4, webhook_url=url)
    resolve = socket.getaddrinfo
    answers = iter(["1.1.1.1"])

    def attacker_dns(host: str, *args: Any, **kwargs: Any) -> Any:
        if host != "rebind.attacker.test":
            return resolve(host, *args, **kwargs)
        address = next(answers, "127.0.0.1")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", attacker_dns)
    settings = Settings(
        redis_url=own_redis_url, data_dir=tmp_path, webhook_allow_http=True, webhook_timeout_seconds=1.0
    )
    WebhookSender(db, settings).attempt(job_id)
    assert receiver.at("/rebound") == []
    job = JobStore(db).get(job_id)
    assert job is not None and job.webhook_attempts[0]["status_code"] is None
    # Over HTTPS the checked address is pinned too, with the name kept for the certificate.
    assert pinned("https://hooks.example.com:8443/a?b=1", "93.184.216.34") == (
        "https://93.184.216.34:8443/a?b=1",
        {"host": "hooks.example.com:8443"},
        {"sni_hostname": "hooks.example.com"},
    )
    assert pinned("https://hooks.example.com/a", "2606:2800::1")[0] == "https://[2606:2800::1]/a"
    # An internationalised name goes in its ASCII form, as HTTP and TLS want it.
    assert pinned("https://bücher.example/a", "93.184.216.34")[1:] == (
        {"host": "xn--bcher-kva.example"},
        {"sni_hostname": "xn--bcher-kva.example"},
    )
    JobStore(db).cancel(job_id)
