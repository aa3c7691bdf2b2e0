"""Job execution on the real worker: cancellation, progress events, crashes and redelivery, a
deleted adapter leaving the worker, and jobs of another version."""

import json
import os
import signal
import time
from collections.abc import Callable

import pytest
from httpx import Client as Api

from service.core.contract import SCHEMA_VERSION, GenerateParams
from service.core.ids import new_id
from service.core.jobs import JobStore
from service.core.queue import enqueue, make_celery
from service.core.redis_db import connect
from service.core.settings import Settings

pytestmark = pytest.mark.usefixtures("worker")
TRAINING = {"prompt": "a photo of a blue square", "atoms": 16, "density": 0.25, "learning_rate": 0.01}


def start_training(api: Api, image_bytes: Callable[..., bytes], steps: int) -> tuple[str, str]:
    files = [("images", ("a.png", image_bytes((30, 30, 200)), "image/png"))]
    response = api.post("/v1/adapters", data={**TRAINING, "steps": steps}, files=files)
    assert response.status_code == 202, response.text
    return response.json()["adapter_id"], response.json()["job_id"]


def running_with_steps(min_step: int) -> Callable[[dict], bool]:
    def check(job: dict) -> bool:
        assert job["status"] in ("queued", "running"), job
        return job["status"] == "running" and job["progress"]["step"] >= min_step

    return check


def queued_without_message(settings: Settings, tenant_id: str, params: GenerateParams) -> str:
    """A job recorded but not yet sent, as one whose message still waits in a long queue."""
    job_id = new_id()
    assert JobStore(connect(settings.redis_url)).create(job_id, tenant_id, params, max_active=4) is not None
    return job_id


def test_cancel_stops_running_jobs_and_a_queued_one_never_runs(
    new_tenant: Callable[[str], Api],
    wait_job: Callable[..., dict],
    image_bytes: Callable[..., bytes],
    settings: Settings,
    generate_params: Callable[..., GenerateParams],
) -> None:
    api = new_tenant("cancel")
    adapter_id, training = start_training(api, image_bytes, steps=5000)
    wait_job(api, training, until=running_with_steps(1))
    # Trainings have a worker of their own: a generation meanwhile runs at once.
    during = api.post("/v1/generations", json={"prompt": "x", "steps": 2}, params={"wait": 60}).json()
    assert during["job"]["status"] == "succeeded"

    queued = queued_without_message(settings, api.tenant_id, generate_params(steps=2))
    cancelled = api.delete(f"/v1/jobs/{queued}")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    enqueue(make_celery(settings), "generate", queued)

    stopping = api.delete(f"/v1/jobs/{training}")
    assert stopping.status_code == 202 and stopping.json()["cancel_requested"] is True
    job = wait_job(api, training, timeout=60)
    assert job["status"] == "cancelled" and job["progress"]["step"] < 5000
    assert api.get(f"/v1/adapters/{adapter_id}").json()["status"] == "cancelled"

    # A running generation stops at its next step.
    long = api.post("/v1/generations", json={"prompt": "x", "steps": 100, "width": 256, "height": 256}).json()
    wait_job(api, long["job_id"], until=running_with_steps(1))
    assert api.delete(f"/v1/jobs/{long['job_id']}").status_code == 202
    stopped = wait_job(api, long["job_id"], timeout=60)
    assert stopped["status"] == "cancelled" and stopped["progress"]["step"] < 100

    # A later generation runs, so the worker has taken the cancelled message off the queue by now.
    later = api.post("/v1/generations", json={"prompt": "x", "steps": 2}, params={"wait": 60}).json()
    assert later["job"]["status"] == "succeeded"
    skipped = api.get(f"/v1/jobs/{queued}").json()
    assert skipped["status"] == "cancelled" and skipped["started_at"] is None and skipped["attempts"] == 0
    again = api.delete(f"/v1/jobs/{queued}")
    assert again.status_code == 409 and "nothing to cancel" in again.json()["error"]["message"]


def test_event_stream_delivers_progress_and_ends_with_the_job(
    new_tenant: Callable[[str], Api], image_bytes: Callable[..., bytes]
) -> None:
    api = new_tenant("events")
    _, job_id = start_training(api, image_bytes, steps=20)
    events: list[tuple[str, dict]] = []
    with api.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: ") and name:
                events.append((name, json.loads(line.removeprefix("data: "))))
    # The stream closed by itself once the job ended.
    assert events[0][0] == "status" and events[0][1]["status"] in ("queued", "running")
    assert events[-1][0] == "status" and events[-1][1]["status"] == "succeeded"
    steps = [data["step"] for name, data in events if name == "progress"]
    assert steps and steps == sorted(steps) and steps[-1] == 20
    assert all(data["loss"] is not None for name, data in events if name == "progress")


def test_a_killed_worker_process_loses_no_job(
    new_tenant: Callable[[str], Api],
    wait_job: Callable[..., dict],
    image_bytes: Callable[..., bytes],
    settings: Settings,
) -> None:
    api = new_tenant("crash")
    adapter_id, job_id = start_training(api, image_bytes, steps=150)
    wait_job(api, job_id, until=running_with_steps(2))
    # The API does not expose which process runs a job; the record does. Fine-tuning runs in a
    # prefork pool process, whose parent puts the message back when it dies.
    running = JobStore(connect(settings.redis_url)).get(job_id)
    assert running is not None and running.worker_pid
    os.kill(running.worker_pid, signal.SIGKILL)

    job = wait_job(api, job_id, timeout=120)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2 and job["progress"]["step"] == 150
    assert api.get(f"/v1/adapters/{adapter_id}").json()["status"] == "ready"


def test_a_redelivered_finished_job_does_not_run_again(new_tenant: Callable[[str], Api], settings: Settings) -> None:
    api = new_tenant("redeliver")
    first = api.post("/v1/generations", json={"prompt": "x", "steps": 2}, params={"wait": 60}).json()["job"]
    assert first["status"] == "succeeded"
    celery = make_celery(settings)
    enqueue(celery, "generate", first["id"])
    enqueue(celery, "generate", first["id"])
    later = api.post("/v1/generations", json={"prompt": "x", "steps": 2}, params={"wait": 60}).json()["job"]
    assert later["status"] == "succeeded"
    time.sleep(0.2)
    assert api.get(f"/v1/jobs/{first['id']}").json() == first


def test_a_deleted_adapter_leaves_the_workers_caches_and_a_job_naming_it_fails_cleanly(
    new_tenant: Callable[[str], Api],
    wait_job: Callable[..., dict],
    wait_for: Callable[..., None],
    image_bytes: Callable[..., bytes],
    resident_adapters: Callable[[], dict[str, float]],
    settings: Settings,
    generate_params: Callable[..., GenerateParams],
) -> None:
    api = new_tenant("evict")
    adapter_id, trained = start_training(api, image_bytes, steps=3)
    assert wait_job(api, trained)["status"] == "succeeded"
    used = api.post("/v1/generations", json={"prompt": "x", "steps": 2, "adapter_id": adapter_id}, params={"wait": 60})
    assert used.json()["job"]["result"]["adapter_tier"] == "storage"
    before = resident_adapters()  # now resident on the generation worker's device
    # A generation naming the adapter, submitted just before the delete; its message arrives after.
    queued = queued_without_message(settings, api.tenant_id, generate_params(steps=2, adapter_id=adapter_id))
    assert api.delete(f"/v1/adapters/{adapter_id}").status_code == 204
    enqueue(make_celery(settings), "generate", queued)

    job = wait_job(api, queued)
    assert job["status"] == "failed"
    assert job["error"] == {"code": "adapter_deleted", "message": f"adapter '{adapter_id}' was deleted"}
    wait_for(
        lambda: resident_adapters()["device"] == before["device"] - 1,
        30,
        "the deleted adapter to leave the worker's device",
    )
    assert resident_adapters()["host"] == before["host"]


def test_a_job_written_by_a_gateway_of_another_version_fails_with_a_clear_error(
    new_tenant: Callable[[str], Api],
    wait_job: Callable[..., dict],
    settings: Settings,
    generate_params: Callable[..., GenerateParams],
) -> None:
    api = new_tenant("versions")
    job_id = new_id()
    newer = generate_params(steps=2).model_copy(update={"schema_version": SCHEMA_VERSION + 1})
    assert JobStore(connect(settings.redis_url)).create(job_id, api.tenant_id, newer, max_active=4) is not None
    enqueue(make_celery(settings), "generate", job_id)
    job = wait_job(api, job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "version_mismatch", job
    assert f"came with message schema {SCHEMA_VERSION + 1}" in job["error"]["message"]
    # The worker goes on with jobs of its own version.
    later = api.post("/v1/generations", json={"prompt": "x", "steps": 2}, params={"wait": 60}).json()["job"]
    assert later["status"] == "succeeded"


def test_a_generation_composes_adapters_each_with_its_scale_and_records_them(
    new_tenant: Callable[[str], Api], wait_job: Callable[..., dict], image_bytes: Callable[..., bytes]
) -> None:
    api = new_tenant("composer")
    other = new_tenant("composer-neighbour")
    first, first_job = start_training(api, image_bytes, steps=3)
    second, second_job = start_training(api, image_bytes, steps=3)
    foreign, foreign_job = start_training(other, image_bytes, steps=3)
    for client, job in ((api, first_job), (api, second_job), (other, foreign_job)):
        assert wait_job(client, job)["status"] == "succeeded"

    def image(**body: object) -> tuple[bytes, dict]:
        response = api.post("/v1/generations", json={"prompt": "x", "steps": 3, "seed": 4, **body}, params={"wait": 60})
        job = response.json()["job"]
        assert job is not None and job["status"] == "succeeded", response.text
        return api.get(job["result"]["images"][0]).content, job["result"]

    alone, _ = image(adapter_id=first)
    muted, muted_result = image(adapters=[{"id": first}, {"id": second, "scale": 0}])
    composed, composed_result = image(adapters=[{"id": first}, {"id": second, "scale": -1.5, "density": 0.5}])
    # Scale 0 is the adapter absent, through the whole service; another scale changes the image.
    assert muted == alone and composed != alone
    applied = composed_result["adapters"]
    assert [(a["id"], a["scale"]) for a in applied] == [(first, 1.0), (second, -1.5)]
    assert {a["tier"] for a in applied + muted_result["adapters"]} <= {"device", "host", "storage"}

    refused = api.post("/v1/generations", json={"prompt": "x", "adapters": [{"id": first}, {"id": foreign}]})
    assert refused.status_code == 404 and foreign in refused.json()["error"]["message"]
