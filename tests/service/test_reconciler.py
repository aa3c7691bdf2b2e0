"""The reconciler: a queued job whose message the broker lost is sent again, once, and only then.

The broker scan is checked against real kombu deliveries (a message waiting in its queue, one
delivered and not acknowledged, one acknowledged), the two-checks rule and the fencing of the old
delivery number against a real Redis, and the whole path with a real worker: a job recorded with
no message (as after a Redis restart that lost its last writes) runs, exactly once.
"""

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import Celery

from service.core.contract import GenerateParams
from service.core.ids import new_id
from service.core.jobs import JobStore
from service.core.queue import GENERATE_QUEUE, enqueue, make_celery, message_id, messages_held
from service.core.reconciler import resend_lost
from service.core.redis_db import RECONCILER_LOCK_KEY, connect, job_events_key
from service.core.settings import Settings
from service.core.tenants import TenantStore
from tests.service.conftest import serve_stack, wait_until


@pytest.fixture
def own_settings(own_redis_url: str, tmp_path: Path) -> Iterator[Settings]:
    settings = Settings(
        redis_url=own_redis_url, data_dir=tmp_path, worker_heartbeat_seconds=1.0, lost_message_seconds=0.001
    )
    yield settings
    connect(own_redis_url).flushdb()


def _stores(settings: Settings, tenant_name: str) -> tuple[Celery, JobStore, str]:
    """The queue, the job store and a new tenant's id, on the test's own Redis."""
    jobs = JobStore(connect(settings.redis_url))
    return make_celery(settings), jobs, TenantStore(jobs.db).create(tenant_name)[0].id


def _check(app: Celery, jobs: JobStore, settings: Settings) -> list[str]:
    """One reconciler check, as the next heartbeat would make it (the period's lock released)."""
    jobs.db.delete(RECONCILER_LOCK_KEY)
    return resend_lost(app, jobs, settings, "tester")


def test_the_broker_scan_sees_waiting_and_recently_delivered_messages_until_acknowledged(
    own_settings: Settings,
) -> None:
    app = make_celery(own_settings)
    db = connect(own_settings.redis_url)
    enqueue(app, "generate", "taken", 0)
    enqueue(app, "generate", "waiting", 2)
    assert messages_held(db, delivered_since=0) == {message_id("taken", 0), message_id("waiting", 2)}
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue(GENERATE_QUEUE)
        delivered_at = time.time()
        taken = queue.get(timeout=5)  # delivered, not acknowledged: in kombu's unacked hash
        assert taken.payload[0] == ["taken", 0] and db.llen(GENERATE_QUEUE) == 1
        assert messages_held(db, delivered_since=delivered_at - 1) == {message_id("taken", 0), message_id("waiting", 2)}
        # Delivered before the cutoff and still not acknowledged: nobody is going to run it.
        assert messages_held(db, delivered_since=time.time() + 1) == {message_id("waiting", 2)}
        taken.ack()
        assert messages_held(db, delivered_since=0) == {message_id("waiting", 2)}
        queue.close()


def test_a_job_missing_its_message_at_two_checks_is_sent_again_under_the_next_delivery_number(
    own_settings: Settings, generate_params: Callable[..., GenerateParams]
) -> None:
    app, jobs, tenant_id = _stores(own_settings, "reconciled")
    lost, sent, late = new_id(), new_id(), new_id()
    for job_id in (lost, sent, late):
        assert jobs.create(job_id, tenant_id, generate_params(steps=1), max_active=10) is not None
    enqueue(app, "generate", sent)

    # One check is not enough: it may fall between a worker's taking a message and recording it.
    assert _check(app, jobs, own_settings) == []
    # A message that turns up between the checks clears its job.
    enqueue(app, "generate", late)
    submitted = jobs.get(lost).queued_at  # type: ignore[union-attr]
    assert _check(app, jobs, own_settings) == [lost]
    record = jobs.get(lost)
    assert record is not None and record.status == "queued" and record.delivery == 1
    assert record.queued_at == submitted  # still when the tenant submitted it
    assert messages_held(jobs.db, 0) == {message_id(sent, 0), message_id(late, 0), message_id(lost, 1)}
    # The lost message, should it come back, is refused; the new one claims the job.
    assert jobs.claim(lost, pid=1, max_attempts=3, delivery=0) == ("stale_message", 0)
    assert jobs.claim(lost, pid=1, max_attempts=3, delivery=1) == ("claimed", 1)
    # Sent once: the next checks find every job's message (or the job running) and send nothing.
    assert _check(app, jobs, own_settings) == [] and _check(app, jobs, own_settings) == []
    # A job that ends leaves the queued jobs for good.
    jobs.cancel(sent)
    assert sent not in jobs.queued_before(float("inf")) and lost not in jobs.queued_before(float("inf"))
    assert set(jobs.queued_before(float("inf"))) == {late}


def test_checks_are_taken_in_turn_once_per_heartbeat(
    own_settings: Settings, generate_params: Callable[..., GenerateParams]
) -> None:
    app, jobs, tenant_id = _stores(own_settings, "turns")
    job_id = new_id()
    jobs.create(job_id, tenant_id, generate_params(steps=1), max_active=10)
    assert _check(app, jobs, own_settings) == []
    # Another worker beating within the same period does not count as a second check.
    assert resend_lost(app, jobs, own_settings, "another") == []
    assert jobs.get(job_id).delivery == 0  # type: ignore[union-attr]


def test_a_job_whose_message_went_to_a_consumer_that_never_ran_it_is_sent_again(
    own_settings: Settings, generate_params: Callable[..., GenerateParams]
) -> None:
    """A message delivered over a connection that broke before its task ran stays unacknowledged
    until the visibility timeout, with its job queued all that time."""
    app, jobs, tenant_id = _stores(own_settings, "stranded")
    job_id = new_id()
    jobs.create(job_id, tenant_id, generate_params(steps=1), max_active=10)
    enqueue(app, "generate", job_id)
    with app.connection_for_read() as connection:
        assert connection.SimpleQueue(GENERATE_QUEUE).get(timeout=5).payload[0] == [job_id, 0]
        time.sleep(0.01)  # older than the (test's) lost_message_seconds
        assert _check(app, jobs, own_settings) == [] and _check(app, jobs, own_settings) == [job_id]
    assert jobs.get(job_id).delivery == 1  # type: ignore[union-attr]
    assert message_id(job_id, 1) in messages_held(jobs.db, 0)


@pytest.fixture(scope="module")
def reconciling_stack(
    own_env: Callable[..., dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    yield from serve_stack(own_env("reconciled", lost_message_seconds="2"), tmp_path_factory)


def test_a_worker_runs_a_job_whose_message_was_lost_exactly_once(
    reconciling_stack: str, own_redis_url: str, generate_params: Callable[..., GenerateParams]
) -> None:
    jobs = JobStore(connect(own_redis_url))
    tenant = TenantStore(jobs.db).create("lost-message")[0]
    job_id = new_id()
    # Recorded and never sent: what a Redis restart that lost its last second of writes leaves.
    jobs.create(job_id, tenant.id, generate_params(steps=2), max_active=4)

    def ended() -> bool:
        job = jobs.get(job_id)
        return job is not None and job.terminal

    wait_until(ended, 60, "the job whose message was lost to run")
    job = jobs.get(job_id)
    assert job is not None and job.status == "succeeded" and job.delivery == 1 and job.attempts == 1
    ends = [f["status"] for _, f in jobs.db.xrange(job_events_key(job_id)) if f.get("status") == "succeeded"]
    assert ends == ["succeeded"] and jobs.active_count(tenant.id) == 0
