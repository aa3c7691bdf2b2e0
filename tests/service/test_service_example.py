"""The README's promise, end to end: the shipped example, fine-tuned through the service with the
API's default training fields on the bundled demo model, yields the concept; the base does not."""

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks import service_example
from service.core import worker_registry
from service.core.redis_db import connect
from service.core.tenants import TenantStore
from service.up import BUNDLED_DEMO_MODEL, stop_process
from tests.service.conftest import REPO, STARTUP_SECONDS, free_port, start_redis, wait_until


@pytest.fixture(scope="module")
def demo_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """Redis, a gateway and a worker serving the demo model (the stack `atomtune up` runs)."""
    port = free_port()
    redis_process = start_redis(tmp_path_factory.mktemp("demo-redis"), port)
    redis_url = f"redis://127.0.0.1:{port}/0"
    env = {
        **os.environ,
        "ATOMTUNE_REDIS_URL": redis_url,
        "ATOMTUNE_DATA_DIR": str(tmp_path_factory.mktemp("demo-data")),
        "ATOMTUNE_BASE_MODEL": str(BUNDLED_DEMO_MODEL),
        "ATOMTUNE_DEVICE": "cpu",
        "ATOMTUNE_WORKER_HEARTBEAT_SECONDS": "1",
        "ATOMTUNE_WORKER_METRICS_PORT": "0",
        # One thread per process: two threads each, on two shared cores, made a training step 25x slower.
        "OMP_NUM_THREADS": "1",
    }
    logs = tmp_path_factory.mktemp("demo-logs")
    gateway_port = free_port()
    cli = [sys.executable, "-m", "service.cli"]
    gateway = subprocess.Popen(
        [*cli, "serve", "--port", str(gateway_port), "--loglevel", "warning"],
        env=env,
        cwd=REPO,
        stdout=(logs / "gateway.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    worker = subprocess.Popen(
        [*cli, "worker", "--loglevel", "warning"],
        env=env,
        cwd=REPO,
        stdout=(logs / "worker.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    db = connect(redis_url)
    wait_until(lambda: bool(worker_registry.alive(db, 1.0)), STARTUP_SECONDS, "the demo worker")
    _, key = TenantStore(db).create("example")
    url = f"http://127.0.0.1:{gateway_port}"
    wait_until(lambda: _answers(url), STARTUP_SECONDS, "the demo gateway")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as api:
        yield api
    stop_process(gateway)
    stop_process(worker, signal.SIGQUIT)
    stop_process(redis_process)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_shipped_example_yields_its_concept_through_the_service(demo_api: httpx.Client) -> None:
    # The README's request sets no training field; the seed is fixed here only so the test repeats.
    result = service_example.check(demo_api, generation_seed=0, seed=0)
    training = result["training"]
    assert training["steps"] == 2000 and training["learning_rate"] == 3e-3, training  # the API's defaults
    assert result["concept_probability_with_adapter"] >= 0.8, result
    assert result["concept_probability_base"] <= 0.2, result


def test_the_example_holds_an_image_per_caption() -> None:
    example = Path(service_example.EXAMPLE)
    captions = (example / "captions.txt").read_text().splitlines()
    assert len(captions) == len(list(example.glob("*.png"))) >= 4
    assert all("sks" in caption for caption in captions)
    assert (example / "prompt.txt").read_text().strip() in captions
