"""Retention: a worker's sweep removes a fine-tune's uploads, a generation's images and ended jobs'
records when their time is up, counts them in the gateway's metrics, and leaves adapters alone.
A stack of its own (Redis, gateway, worker) with retention times of seconds."""

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from service.core.redis_db import connect
from service.core.tenants import TenantStore
from tests.service.conftest import serve_stack, wait_until

UPLOADS_TTL, OUTPUTS_TTL, JOBS_TTL = 3, 5, 8


@pytest.fixture(scope="module")
def short_lived(
    own_redis_url: str, service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, str]]]:
    env = {
        **service_env,
        "ATOMTUNE_REDIS_URL": own_redis_url,
        "ATOMTUNE_DATA_DIR": str(tmp_path_factory.mktemp("retention")),
        "ATOMTUNE_WORKER_METRICS_PORT": "0",
        "ATOMTUNE_UPLOAD_RETENTION_SECONDS": str(UPLOADS_TTL),
        "ATOMTUNE_OUTPUT_RETENTION_SECONDS": str(OUTPUTS_TTL),
        "ATOMTUNE_JOB_RETENTION_SECONDS": str(JOBS_TTL),
        "ATOMTUNE_RETENTION_SWEEP_SECONDS": "1",
    }
    for gateway in serve_stack(env, tmp_path_factory, queues="generate,finetune"):
        yield gateway, env


def _removed(gateway: str) -> dict[str, float]:
    text = httpx.get(f"{gateway}/metrics").text
    return {kind: float(n) for kind, n in re.findall(r'atomtune_retention_removed_total\{kind="(\w+)"\} (\S+)', text)}


def test_uploads_images_and_jobs_go_when_due_and_adapters_stay(
    short_lived: tuple[str, dict[str, str]],
    own_redis_url: str,
    image_bytes: Callable[..., bytes],
    wait_job: Callable[..., dict],
) -> None:
    gateway, env = short_lived
    tenant, key = TenantStore(connect(own_redis_url)).create("forgetful")
    api = httpx.Client(base_url=gateway, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert _removed(gateway) == {"jobs": 0, "outputs": 0, "uploads": 0}

    files = [("images", (f"{i}.png", image_bytes((200, 30 * i, 30)), "image/png")) for i in range(2)]
    created = api.post("/v1/adapters", data={"prompt": "a red square", "steps": 3}, files=files).json()
    assert wait_job(api, created["job_id"])["status"] == "succeeded"
    adapter_id = created["adapter_id"]
    request = {"prompt": "p", "steps": 2, "adapter_id": adapter_id}
    generated = api.post("/v1/generations", json=request, params={"wait": 30})
    job = generated.json()["job"]
    assert job["status"] == "succeeded", generated.text
    ended = time.monotonic()
    assert api.get(f"/v1/jobs/{job['id']}/images/0").status_code == 200

    tenant_dir = Path(env["ATOMTUNE_DATA_DIR"]) / "tenants" / tenant.id
    wait_until(lambda: not (tenant_dir / "uploads" / adapter_id).exists(), UPLOADS_TTL + 10, "the uploads to go")
    wait_until(lambda: api.get(f"/v1/jobs/{job['id']}/images/0").status_code == 410, OUTPUTS_TTL + 10, "images")
    assert time.monotonic() - ended >= OUTPUTS_TTL - 1
    gone = api.get(f"/v1/jobs/{job['id']}/images/0").json()["error"]
    assert gone["code"] == "expired" and "removed" in gone["message"]
    assert not (tenant_dir / "outputs" / job["id"]).exists()

    wait_until(lambda: api.get(f"/v1/jobs/{job['id']}").status_code == 404, JOBS_TTL + 10, "the job record")
    assert api.get(f"/v1/jobs/{created['job_id']}").status_code == 404
    # The adapter stays until its owner deletes it: ready, listed, downloadable, still generating.
    adapter = api.get(f"/v1/adapters/{adapter_id}").json()
    assert adapter["status"] == "ready"
    assert api.get(f"/v1/adapters/{adapter_id}/download").status_code == 200
    again = api.post("/v1/generations", json=request, params={"wait": 30})
    assert again.json()["job"]["status"] == "succeeded", again.text
    assert _removed(gateway) == {"jobs": 2, "outputs": 1, "uploads": 1}
    api.close()
