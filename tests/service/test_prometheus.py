"""A real Prometheus (Debian's `prometheus`; `.ci/run` installs it) scrapes the gateway and both
workers through a fine-tune and a dozen generations, and then every query of the Grafana
dashboard returns a number: a panel that stays empty under live traffic shows nothing wrong."""

import json
import math
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from httpx import Client as Api

from service.up import stop_process
from tests.service.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
# Exposed by CUDA workers only: on this CPU worker the gauges carry no sample (docs/metrics.md).
CUDA_ONLY = ("atomtune_device_memory_allocated_bytes", "atomtune_device_memory_reserved_bytes")


@pytest.fixture(scope="module")
def prometheus(
    gateway: str, service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, wait_for: Callable[..., None]
) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("no `prometheus` on the PATH (apt-get install prometheus; .ci/run installs it)")
    folder = tmp_path_factory.mktemp("prometheus")
    worker_port = int(service_env["ATOMTUNE_WORKER_METRICS_PORT"])
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "gateway", "static_configs": [{"targets": [gateway.removeprefix("http://")]}]},
            {
                "job_name": "worker",
                "static_configs": [{"targets": [f"127.0.0.1:{worker_port}", f"127.0.0.1:{worker_port + 1}"]}],
            },
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    command = [
        binary,
        f"--config.file={folder / 'prometheus.yml'}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    log = (folder / "prometheus.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.poll() is None, (folder / "prometheus.log").read_text()[-2000:]
        try:
            return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 60, "Prometheus")
    # Prometheus scrapes a few seconds after it is ready; traffic before then would be invisible to rate().
    wait_for(lambda: query(url, "sum(up)") == [3.0], 60, "Prometheus's first scrape of every target")
    yield url
    stop_process(process)


def query(url: str, expression: str) -> list[float]:
    response = httpx.get(f"{url}/api/v1/query", params={"query": expression}, timeout=10).json()
    assert response["status"] == "success", (expression, response)
    return [float(sample["value"][1]) for sample in response["data"]["result"]]


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/atomtune.json").read_text())
    # Grafana's interval variable, as it would be filled in for a 1 s scrape interval and a short range.
    return [
        (panel["title"], target["expr"].replace("$__rate_interval", "1m"))
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


@pytest.mark.usefixtures("worker")
def test_every_dashboard_query_has_data_under_live_traffic(
    prometheus: str,
    gateway: str,
    new_tenant: Callable[[str], Api],
    wait_job: Callable[..., dict],
    wait_for: Callable[..., None],
    image_bytes: Callable[..., bytes],
) -> None:
    api = new_tenant("prometheus")
    files = [("images", ("a.png", image_bytes((200, 120, 20)), "image/png"))]
    form = {"prompt": "an orange square", "atoms": 16, "density": 0.25, "steps": 3, "batch_size": 1}
    created = api.post("/v1/adapters", data=form, files=files).json()
    assert wait_job(api, created["job_id"])["status"] == "succeeded"
    for n in range(12):  # one at a time: the test tenant may have only a few jobs active
        adapter = {"adapter_id": created["adapter_id"]} if n % 2 else {}
        body = {"prompt": "x", "steps": 3, "seed": n, **adapter}
        job = api.post("/v1/generations", json=body, params={"wait": 60}).json()["job"]
        assert job["status"] == "succeeded", job
    assert httpx.get(f"{gateway}/v1/adapters", headers={"Authorization": "Bearer wrong"}).status_code == 401
    # Until a few scrapes after the traffic, rates over it may still lack a second sample.
    wait_for(lambda: bool(query(prometheus, "sum(atomtune_batch_size_count)")), 30, "a scrape of the worker")

    def has_numbers(expression: str) -> bool:
        return any(math.isfinite(value) for value in query(prometheus, expression))

    empty = []
    for title, expression in dashboard_queries():
        if any(name in expression for name in CUDA_ONLY):
            continue
        try:
            wait_for(lambda expression=expression: has_numbers(expression), 10, expression)
        except AssertionError:
            empty.append(f"{title}: {expression}")
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    scrapes = [f"{t['scrapeUrl']}: {t['health']} {t['lastError']}" for t in targets]
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty + scrapes)
