"""Jobs run end to end move the gateway's and the worker's Prometheus metrics (issue #4)."""

from collections.abc import Callable

import httpx
import pytest
from fastapi.testclient import TestClient
from httpx import Client as Api
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.core.settings import Settings

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, client: httpx.Client | None = None) -> tuple[set[str], Samples]:
    """The metric family names and every sample (name and labels -> value) at a /metrics URL."""
    response = client.get(url) if client else httpx.get(url, timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = list(text_string_to_metric_families(response.text))
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
    return {f.name for f in families}, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_gateway_labels_routes_by_template_and_rejections_by_error_code() -> None:
    # Nothing answers on port 1: the queue depth must then be absent, not a false zero.
    settings = Settings(redis_url="redis://127.0.0.1:1/0", max_json_bytes=10)
    with TestClient(create_app(settings)) as client:
        _, before = scrape("/metrics", client)
        assert client.post("/v1/generations", content=b"{}" * 10).status_code == 413
        assert client.put("/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV").status_code == 405
        assert client.get("/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV").status_code == 401
        assert client.get("/no/such/route").status_code == 404
        # A key to check, and no Redis to check it in (after retrying through what could be a restart).
        down = client.get("/v1/adapters", headers={"Authorization": "Bearer atk_x_y"})
        assert down.status_code == 503 and down.headers["Retry-After"] == "5", down.text
        names, after = scrape("/metrics", client)
    four = {"status_class": "4xx"}
    # Refused by the body limit before routing, yet labelled with its route.
    assert moved(before, after, "atomtune_http_requests_total", method="POST", route="/v1/generations", **four) == 1
    assert moved(before, after, "atomtune_http_requests_total", method="PUT", route="/v1/jobs/{job_id}", **four) == 1
    assert moved(before, after, "atomtune_http_requests_total", method="GET", route="unmatched", **four) == 1
    for reason in ("content_too_large", "method_not_allowed", "unauthenticated", "not_found", "unavailable"):
        assert moved(before, after, "atomtune_requests_rejected_total", reason=reason) == 1, reason
    assert moved(before, after, "atomtune_auth_failures_total") == 1
    assert "atomtune_queue_depth" in names
    unread = ("atomtune_queue_depth", "atomtune_workers_alive", "atomtune_retention_removed_total")
    assert not [key for key in after if key[0] in unread]


@pytest.mark.usefixtures("worker")
def test_a_job_end_to_end_moves_gateway_and_worker_metrics(
    gateway: str,
    service_env: dict[str, str],
    new_tenant: Callable[[str], Api],
    wait_job: Callable[..., dict],
    image_bytes: Callable[..., bytes],
) -> None:
    # `atomtune worker` runs a worker per queue: generations serve on the port, fine-tuning after it.
    port = int(service_env["ATOMTUNE_WORKER_METRICS_PORT"])
    worker_url = f"http://127.0.0.1:{port}/metrics"
    finetune_url = f"http://127.0.0.1:{port + 1}/metrics"
    _, gateway_before = scrape(f"{gateway}/metrics")
    _, worker_before = scrape(worker_url)
    _, finetune_before = scrape(finetune_url)
    api = new_tenant("metrics")

    files = [("images", ("a.png", image_bytes((20, 200, 20)), "image/png"))]
    form = {"prompt": "a green square", "atoms": 16, "density": 0.25, "steps": 3, "learning_rate": 0.02}
    created = api.post("/v1/adapters", data=form, files=files).json()
    assert wait_job(api, created["job_id"])["status"] == "succeeded"
    request = {"prompt": "a green square", "steps": 2, "num_images": 2, "adapter_id": created["adapter_id"]}
    first = api.post("/v1/generations", json=request, params={"wait": 60}).json()["job"]
    assert first["result"]["adapter_tier"] == "storage"
    # An imported copy is a new adapter: its first use loads it from storage.
    bundle = api.get(f"/v1/adapters/{created['adapter_id']}/download").content
    imported = api.post("/v1/adapters/import", files={"file": ("a.zip", bundle, "application/zip")}).json()
    loaded = api.post("/v1/generations", json={**request, "adapter_id": imported["id"]}, params={"wait": 60})
    assert loaded.json()["job"]["result"]["adapter_tier"] == "storage"
    assert httpx.get(f"{gateway}/v1/adapters", headers={"Authorization": "Bearer wrong"}).status_code == 401

    names, after = scrape(f"{gateway}/metrics")
    before = gateway_before
    post = {"method": "POST", "status_class": "2xx"}
    assert moved(before, after, "atomtune_http_requests_total", route="/v1/generations", **post) == 2
    assert moved(before, after, "atomtune_http_request_duration_seconds_count", route="/v1/adapters", **post) == 1
    # Route templates, never raw paths with ids, label the requests.
    assert value(after, "atomtune_http_requests_total", method="GET", route="/v1/jobs/{job_id}", status_class="2xx")
    assert moved(before, after, "atomtune_jobs_submitted_total", kind="finetune") == 1
    assert moved(before, after, "atomtune_jobs_submitted_total", kind="generate") == 2
    # Every label set exists from the start, so ratios over them always have a value.
    assert ("atomtune_jobs_submitted_total", frozenset({("kind", "finetune")})) in after
    assert moved(before, after, "atomtune_auth_failures_total") == 1
    assert moved(before, after, "atomtune_requests_rejected_total", reason="unauthenticated") == 1
    assert value(after, "atomtune_queue_depth", queue="generate") == 0
    assert value(after, "atomtune_workers_alive") >= 1
    assert {"atomtune_queue_depth", "process_resident_memory_bytes"} <= names

    names, after = scrape(worker_url)
    before = worker_before
    assert moved(before, after, "atomtune_job_duration_seconds_count", kind="generate", outcome="succeeded") == 2
    assert moved(before, after, "atomtune_job_queue_wait_seconds_count", kind="generate", outcome="succeeded") == 2
    assert moved(before, after, "atomtune_job_duration_seconds_sum", kind="generate", outcome="succeeded") > 0
    # Two generations of two steps each, one after the other; classifier-free guidance doubles the
    # two images of each to four rows per step.
    assert moved(before, after, "atomtune_denoising_step_seconds_count", rows="3-4") == 4
    assert moved(before, after, "atomtune_batch_size_sum") == 4 * 4
    assert moved(before, after, "atomtune_batch_requests_sum") == 4
    assert moved(before, after, "atomtune_batch_adapters_sum") == 4
    assert value(after, "atomtune_batch_capacity_rows") == 64
    assert moved(before, after, "atomtune_atoms_active_per_token_count") == 4
    assert 0 < moved(before, after, "atomtune_atoms_active_per_token_sum") <= 4 * 16
    # Both generations read their adapter from storage: the trained one and the imported copy.
    assert moved(before, after, "atomtune_adapter_cache_misses_total", tier="device") == 2
    assert moved(before, after, "atomtune_adapter_cache_misses_total", tier="host") == 2
    assert moved(before, after, "atomtune_adapter_load_seconds_count", tier="storage") == 2
    # Created at zero: the hit rate has a value before the first hit.
    assert ("atomtune_adapter_cache_hits_total", frozenset({("tier", "device")})) in after
    assert value(after, "atomtune_adapters_resident", tier="device") >= 2
    # Adapters on the device hold their own weights and nothing more (16 atoms x 2 blocks x 32 x 2, float32).
    resident = value(after, "atomtune_adapters_resident", tier="device")
    assert value(after, "atomtune_adapter_device_bytes") <= resident * 1.1 * (2 * 2 * 32 * 16 + 2 * 16) * 4
    info = {labels: v for (name, labels), v in after.items() if name == "atomtune_worker_info"}
    assert len(info) == 1 and dict(next(iter(info)))["device"] == "cpu"
    # No CUDA here: the device memory gauges exist but carry no sample.
    assert {"atomtune_device_memory_allocated_bytes", "atomtune_device_memory_reserved_bytes"} <= names

    _, after = scrape(finetune_url)
    before = finetune_before
    assert moved(before, after, "atomtune_job_duration_seconds_count", kind="finetune", outcome="succeeded") == 1
    assert moved(before, after, "atomtune_job_queue_wait_seconds_count", kind="finetune", outcome="succeeded") == 1
    assert moved(before, after, "atomtune_finetune_steps_total") == 3
    assert value(after, "atomtune_finetune_loss") > 0 and value(after, "atomtune_finetune_steps_per_second") > 0
