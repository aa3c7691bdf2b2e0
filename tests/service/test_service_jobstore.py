"""Job and adapter state on a real Redis: what a redelivery, a cancel, a stale worker, a full quota
or a concurrent delete may do, and how a worker ends a job when Redis or its adapter goes away."""

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service.core.catalog import AdapterCatalog
from service.core.contract import (
    AdapterSpec,
    FinetuneParams,
    FinetuneResult,
    GenerateParams,
    GenerateResult,
    TrainingSpec,
)
from service.core.ids import new_id
from service.core.jobs import Job, JobStore
from service.core.redis_db import adapter_key, connect
from service.core.settings import Settings
from service.core.storage import Storage
from tests.service.conftest import STAND_IN_WORKER

# Jobs claimed here are claimed under a beating name: the session's worker would recover them otherwise.
pytestmark = pytest.mark.usefixtures("stand_in_worker")


@pytest.fixture
def jobs(settings: Settings) -> JobStore:
    return JobStore(connect(settings.redis_url))


@pytest.fixture
def make(jobs: JobStore, generate_params: Callable[..., GenerateParams]) -> Callable[[], str]:
    def make() -> str:
        job_id = new_id()
        jobs.create(job_id, new_id(), generate_params(steps=3), max_active=16)
        return job_id

    return make


def test_a_redelivery_takes_over_and_fences_off_the_first_run(jobs: JobStore, make: Callable[[], str]) -> None:
    job_id = make()
    tenant = jobs.get(job_id).tenant_id  # type: ignore[union-attr]
    assert jobs.active_count(tenant) == 1
    assert jobs.claim(job_id, pid=1, max_attempts=3, worker=STAND_IN_WORKER) == ("claimed", 1)
    assert jobs.progress(job_id, 1, 1, 3, 0.5) == "0"
    # The message came back (the first process died): the job starts over as attempt 2.
    assert jobs.claim(job_id, pid=2, max_attempts=3, worker=STAND_IN_WORKER) == ("claimed", 2)
    job = jobs.get(job_id)
    assert job is not None and job.step == 0 and job.worker_pid == 2 and job.status == "running"
    assert jobs.progress(job_id, 1, 2, 3) == "stale"
    result = GenerateResult(image_count=1, seed=0, adapter_tier=None, adapters=[], batch_size=2)
    assert jobs.finish(job_id, 1, "succeeded", result) == "running"
    assert jobs.finish(job_id, 2, "succeeded", result) == "ok"
    done = jobs.get(job_id)
    assert done is not None and done.status == "succeeded" and GenerateResult.parse(done.result or {}) == result
    assert done.finished_at is not None and jobs.active_count(tenant) == 0
    # A finished job delivered again does not run again.
    assert jobs.claim(job_id, pid=3, max_attempts=3, worker=STAND_IN_WORKER) == ("succeeded", 0)


def test_cancel_queued_running_and_finished(jobs: JobStore, make: Callable[[], str]) -> None:
    queued = make()
    assert jobs.cancel(queued) == "cancelled"
    assert jobs.claim(queued, pid=1, max_attempts=3, worker=STAND_IN_WORKER) == ("cancelled", 0)

    running = make()
    jobs.claim(running, pid=1, max_attempts=3, worker=STAND_IN_WORKER)
    assert jobs.cancel(running) == "cancelling"
    assert jobs.progress(running, 1, 1, 3) == "1"
    # If the worker dies before it notices, the redelivery ends the job instead of rerunning it.
    assert jobs.claim(running, pid=2, max_attempts=3, worker=STAND_IN_WORKER) == ("cancelled", 0)
    assert jobs.cancel(running) == "cancelled"


def test_a_job_that_keeps_killing_workers_is_given_up(jobs: JobStore, make: Callable[[], str]) -> None:
    job_id = make()
    for attempt in (1, 2):
        assert jobs.claim(job_id, pid=attempt, max_attempts=2, worker=STAND_IN_WORKER) == ("claimed", attempt)
    assert jobs.claim(job_id, pid=3, max_attempts=2, worker=STAND_IN_WORKER)[0] == "failed"
    job = jobs.get(job_id)
    assert job is not None and job.error_code == "worker_lost" and "2 times" in (job.error_message or "")


def test_concurrent_creates_never_pass_the_tenants_quota(
    jobs: JobStore, generate_params: Callable[..., GenerateParams]
) -> None:
    tenant = new_id()
    start = threading.Barrier(12)

    def create(_: int) -> bool:
        start.wait()
        return jobs.create(new_id(), tenant, generate_params(steps=1), max_active=3) is not None

    with ThreadPoolExecutor(max_workers=12) as pool:
        created = list(pool.map(create, range(12)))
    assert sum(created) == 3 and jobs.active_count(tenant) == 3


def test_abandon_fails_only_a_job_still_queued(jobs: JobStore, make: Callable[[], str]) -> None:
    queued = make()
    tenant = jobs.get(queued).tenant_id  # type: ignore[union-attr]
    assert jobs.abandon(queued, "unavailable", "could not be queued") == "failed"
    job = jobs.get(queued)
    assert job is not None and job.status == "failed" and job.error_code == "unavailable"
    assert jobs.active_count(tenant) == 0

    running = make()
    jobs.claim(running, pid=1, max_attempts=3, worker=STAND_IN_WORKER)
    assert jobs.abandon(running, "unavailable", "could not be queued") == "running"


def test_a_worker_that_cannot_reach_redis_puts_the_message_back(settings: Settings, tmp_path: Path) -> None:
    from celery.exceptions import Reject

    from worker.context import WorkerContext
    from worker.tasks import run_job

    # Nothing listens on port 1: the claim fails as it does while Redis is down. Celery would
    # acknowledge (drop) the message of a task that raised anything but Reject.
    ctx = WorkerContext(settings, connect("redis://127.0.0.1:1/0"), Storage(tmp_path))
    with pytest.raises(Reject) as raised:
        run_job(ctx, new_id(), lambda *_: {})
    assert raised.value.requeue is True


def test_a_run_that_loses_redis_hands_its_job_back_under_the_next_delivery_number(
    settings: Settings, tmp_path: Path, generate_params: Callable[..., GenerateParams]
) -> None:
    """Kombu cannot put a message back while Redis is away (it would wait out the visibility
    timeout), and a claimed job under a live worker is nobody's to recover: the worker hands the
    job back itself once Redis answers, and drops its message."""
    from celery.exceptions import Reject
    from redis.exceptions import ConnectionError as RedisConnectionError

    from worker.context import WorkerContext
    from worker.tasks import run_job

    ctx = WorkerContext(settings, connect(settings.redis_url), Storage(tmp_path))
    job_id = new_id()
    ctx.jobs.create(job_id, new_id(), generate_params(steps=1), max_active=1)

    def loses_redis(*_: object) -> None:
        raise RedisConnectionError("Redis went away for longer than the calls' retries")

    with pytest.raises(Reject) as raised:
        run_job(ctx, job_id, loses_redis, worker=STAND_IN_WORKER)
    assert raised.value.requeue is False  # the message is dropped: its delivery number is fenced off
    job = ctx.jobs.get(job_id)
    assert job is not None and (job.status, job.delivery, job.attempts, job.worker) == ("queued", 1, 1, STAND_IN_WORKER)
    assert job_id in ctx.jobs.queued_before(float("inf"))  # for the reconciler to send it again
    assert ctx.jobs.claim(job_id, pid=1, max_attempts=3, worker=STAND_IN_WORKER, delivery=0) == ("stale_message", 0)
    assert ctx.jobs.claim(job_id, pid=1, max_attempts=3, worker=STAND_IN_WORKER, delivery=1) == ("claimed", 2)
    ctx.jobs.cancel(job_id)


def test_marking_ready_never_recreates_a_deleted_adapter(settings: Settings) -> None:
    catalog = AdapterCatalog(connect(settings.redis_url))
    tenant = new_id()
    config = {"num_atoms": 8}
    for _ in range(200):
        adapter_id = new_id()
        catalog.create(adapter_id, tenant, "p", "trained", config, job_id=new_id())
        race = threading.Barrier(2)

        def delete(adapter_id: str = adapter_id, race: threading.Barrier = race) -> None:
            race.wait()
            catalog.delete(adapter_id, tenant)

        deleter = threading.Thread(target=delete)
        deleter.start()
        race.wait()
        catalog.mark_ready(adapter_id, config, [0], metrics={})
        deleter.join()
        # Deleted, whatever the order: never a partial record that reads would trip over.
        assert catalog.db.exists(adapter_key(adapter_id)) == 0


# What DELETE /v1/adapters/{id} has done when the training starts: it cancels the job, deletes
# the record, then removes the uploads; the training may start between any two of these.
@pytest.mark.parametrize(
    ("cancelled", "record_deleted"), [(True, True), (True, False), (False, True)], ids=["all", "cancel", "record"]
)
def test_a_training_whose_adapter_is_deleted_as_it_starts_ends_cancelled(
    settings: Settings, tmp_path: Path, cancelled: bool, record_deleted: bool
) -> None:
    from worker.context import WorkerContext
    from worker.tasks import Reporter, run_job, train

    ctx = WorkerContext(settings, connect(settings.redis_url), Storage(tmp_path))
    jobs, catalog = ctx.jobs, ctx.catalog
    tenant, adapter_id, job_id = new_id(), new_id(), new_id()
    adapter = AdapterSpec(num_atoms=8, density=0.25, activation="topk")
    catalog.create(adapter_id, tenant, "p", "trained", adapter.model_dump(), job_id=job_id)
    # The uploads are never written: they are gone as far as the training can tell.
    training = TrainingSpec(steps=5, learning_rate=1e-3, batch_size=1, seed=0, resolution=None, image_count=1)
    params = FinetuneParams(
        adapter_id=adapter_id, prompt="p", captions=None, adapter=adapter, training=training, images=["0.png"]
    )
    jobs.create(job_id, tenant, params, max_active=1)

    def deleted_as_it_starts(ctx: WorkerContext, job: Job, reporter: Reporter) -> FinetuneResult:
        if cancelled:
            jobs.cancel(job_id)
        if record_deleted:
            catalog.delete(adapter_id, tenant)
        return train(ctx, job, reporter)

    run_job(ctx, job_id, deleted_as_it_starts, worker=STAND_IN_WORKER)
    job = jobs.get(job_id)
    assert job is not None and job.status == "cancelled" and job.error_code is None
