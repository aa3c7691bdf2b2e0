"""A generation worker killed mid-batch loses no request and runs none twice.

A worker of its own on a Redis of its own, so that no other worker can take the batch: the whole
worker process (the thread pool runs every request in it) is SIGKILLed while a batch of requests
is denoising; a second worker finds their holder's heartbeat gone, puts them back under the next
delivery number, and runs them once; a message sent before the crash, arriving late, is refused.
"""

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from service.core import worker_registry
from service.core.contract import GenerateParams, GenerateResult
from service.core.ids import new_id
from service.core.jobs import Job, JobStore
from service.core.queue import enqueue, make_celery
from service.core.redis_db import connect, job_events_key
from service.core.settings import Settings
from service.core.storage import Storage
from service.up import stop_process

REPO = Path(__file__).resolve().parents[2]
REQUESTS = 4
STEPS = 100


@pytest.fixture(scope="module")
def own_stack(
    service_env: dict[str, str], own_redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, str], Settings]:
    folder = tmp_path_factory.mktemp("recovery")
    env = {
        **service_env,
        "ATOMTUNE_REDIS_URL": own_redis_url,
        "ATOMTUNE_DATA_DIR": str(folder / "data"),
        "ATOMTUNE_WORKER_METRICS_PORT": "0",
        "ATOMTUNE_MAX_BATCH": str(2 * REQUESTS),
    }
    return env, Settings(redis_url=own_redis_url, data_dir=Path(env["ATOMTUNE_DATA_DIR"]))


def start_worker(
    env: dict[str, str], settings: Settings, log: Path, wait_until: Callable[..., None]
) -> subprocess.Popen[bytes]:
    """A generation worker: one process, its threads and scheduler; alive once it beats."""
    command = [sys.executable, "-m", "service.cli", "worker", "--queues", "generate", "--loglevel", "info"]
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    db = connect(settings.redis_url)
    before = set(worker_registry.alive(db, settings.worker_heartbeat_seconds))

    def beating() -> bool:
        assert process.poll() is None, log.read_text()[-3000:]
        return bool(set(worker_registry.alive(db, 1.0)) - before)

    wait_until(beating, 120, "the generation worker's heartbeat")
    return process


def status_events(settings: Settings, job_id: str) -> list[str]:
    entries = connect(settings.redis_url).xrange(job_events_key(job_id))
    return [fields["status"] for _, fields in entries if fields.get("type") == "status"]


def test_a_worker_killed_mid_batch_loses_no_request_and_runs_none_twice(
    own_stack: tuple[dict[str, str], Settings],
    generate_params: Callable[..., GenerateParams],
    wait_for: Callable[..., None],
    tmp_path: Path,
) -> None:
    wait_until = wait_for
    env, settings = own_stack
    jobs = JobStore(connect(settings.redis_url))
    celery = make_celery(settings)
    log = tmp_path / "workers.log"
    first = start_worker(env, settings, log, wait_for)
    # 256 px: slow enough per step on the tiny model that the kill lands mid-batch.
    params = [generate_params(steps=STEPS, width=256, height=256, seed=seed) for seed in range(REQUESTS)]
    job_ids = [new_id() for _ in params]
    tenant = new_id()
    for job_id, message in zip(job_ids, params, strict=True):
        assert jobs.create(job_id, tenant, message, max_active=100) is not None
        enqueue(celery, "generate", job_id)

    def all_denoising() -> bool:
        found = [jobs.get(job_id) for job_id in job_ids]
        assert all(job is not None and not job.terminal for job in found), found
        return all(job.step >= 2 for job in found if job is not None)

    wait_until(all_denoising, 120, "every request to be denoising")
    running: list[Job] = [jobs.get(job_id) for job_id in job_ids]  # type: ignore[misc]
    assert len({job.worker for job in running}) == 1 and all(job.step < STEPS for job in running)
    first.send_signal(signal.SIGKILL)
    first.wait()

    second = start_worker(env, settings, log, wait_for)
    try:
        # The dead worker's own messages, as Redis would return them after its visibility timeout,
        # once the requests were put back: refused, never a second run.
        def put_back() -> bool:
            return all(jobs.get(job_id).delivery == 1 for job_id in job_ids)  # type: ignore[union-attr]

        wait_until(put_back, 60, "the requests to be put back")
        for job_id in job_ids:
            enqueue(celery, "generate", job_id, delivery=0)

        def ended() -> bool:
            return all(jobs.get(job_id).terminal for job_id in job_ids)  # type: ignore[union-attr]

        wait_until(ended, 180, "the requests to finish")
        wait_until(lambda: log.read_text().count("not run: stale_message") == REQUESTS, 30, "the stale messages")
        storage = Storage(settings.data_dir)
        for job_id in job_ids:
            job = jobs.get(job_id)
            assert job is not None and job.status == "succeeded", (job.error_code, job.error_message)
            assert job.attempts == 2 and job.delivery == 1 and job.step == STEPS
            assert job.worker != running[0].worker
            assert status_events(settings, job_id).count("succeeded") == 1
            assert status_events(settings, job_id).count("running") == 2
            result = GenerateResult.parse(job.result or {})
            # Put back together, they ran as one batch again: two rows each (guidance).
            assert result.batch_size == 2 * REQUESTS
            assert (storage.outputs_dir(tenant, job_id) / "0.png").is_file()
    finally:
        stop_process(second, signal.SIGQUIT)
