"""The deployment files agree with each other and with the code (issue #4).

Docker has no engine on these machines, so nothing here builds or starts a container: the
compose file is checked by ``docker compose config`` where the plugin exists and, always, by
reading it; the Prometheus, Grafana and dashboard files are checked against it and the code.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.core.settings import Settings
from worker.metrics import WorkerMetrics

REPO = Path(__file__).resolve().parents[1]
APP_SERVICES = ("gateway", "worker", "worker-cpu")
WORKERS = ("worker", "worker-cpu")
# The sample names each metric type exposes, from its family name.
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    # The info metric is exposed as a gauge named ..._info.
    "gauge": ("",),
}


def load_yaml(relative: str) -> Any:
    return yaml.safe_load((REPO / relative).read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml("docker-compose.yml")


def service_env(compose: dict[str, Any], name: str) -> dict[str, str]:
    return {key: str(value) for key, value in compose["services"][name]["environment"].items()}


def code_metrics() -> dict[str, str]:
    """Every atomtune metric the gateway and a worker expose: family name -> type."""
    # No lifespan runs outside a `with` block, so this scrape touches no Redis.
    gateway_text = TestClient(create_app(Settings())).get("/metrics").text
    worker_text = generate_latest(WorkerMetrics().registry).decode()
    families = [*text_string_to_metric_families(gateway_text), *text_string_to_metric_families(worker_text)]
    return {f.name: f.type for f in families if f.name.startswith("atomtune_")}


def exposed_names(metrics: dict[str, str]) -> set[str]:
    return {name + suffix for name, kind in metrics.items() for suffix in SUFFIXES[kind]}


def compose_command() -> list[str]:
    """Compose v2 (the docker plugin) where present, else the standalone v1 that .ci/run installs."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed (.ci/run installs docker-compose)")


def test_docker_compose_config_accepts_the_file() -> None:
    command = [*compose_command(), "-f", "docker-compose.yml", "--profile", "gpu", "--profile", "cpu", "config", "-q"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_compose_services_volumes_and_health_checks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", *APP_SERVICES, "prometheus", "grafana"}
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name

    redis = services["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    volume = redis["volumes"][0].split(":")
    assert volume[0] in compose["volumes"] and volume[1] == "/data"

    for name in APP_SERVICES:
        service = services[name]
        env = service_env(compose, name)
        assert env["ATOMTUNE_REDIS_URL"] == "redis://redis:6379/0", name
        assert f"data:{env['ATOMTUNE_DATA_DIR']}" in service["volumes"] and "data" in compose["volumes"], name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert service["image"] == f"atomtune:{service['build']['args']['VARIANT']}", name
    assert services["gateway"]["command"] == ["serve"]
    assert all(services[name]["command"][0] == "worker" for name in WORKERS)

    gpu = services["worker"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["args"]["VARIANT"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    cpu = services["worker-cpu"]
    assert cpu["profiles"] == ["cpu"] and cpu["build"]["args"]["VARIANT"] == "cpu" and "deploy" not in cpu


def test_dockerfile_is_multi_stage_non_root_and_selects_its_base_by_argument() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", dockerfile, re.MULTILINE)
    names = [name for _, name in stages]
    assert {"base-cuda", "base-cpu", "build", "runtime"} <= set(names) and names[-1] == "runtime"
    assert ("base-${VARIANT}", "base") in stages
    assert re.search(r"^ARG VARIANT=cuda$", dockerfile, re.MULTILINE)
    assert any(image.startswith("nvidia/cuda:") for image, _ in stages)
    assert "COPY --from=build /opt/venv /opt/venv" in dockerfile
    user = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert user and user[-1] not in ("root", "0")
    assert re.findall(r'ENTRYPOINT \["(\w+)"\]', dockerfile) == ["atomtune"]
    # The image installs the torch that pyproject.toml pins, for both variants.
    pin = re.search(r'"(torch==[^"]+)"', (REPO / "pyproject.toml").read_text())
    assert pin and dockerfile.count(f"pip install {pin.group(1)}") == 2


def scrape_targets(prometheus: dict[str, Any]) -> dict[str, set[tuple[str, int]]]:
    """Each scrape job's targets as (host, port)."""
    targets: dict[str, set[tuple[str, int]]] = {}
    for job in prometheus["scrape_configs"]:
        found = targets.setdefault(job["job_name"], set())
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                found.add((host, int(port)))
        for dns in job.get("dns_sd_configs", []):
            found.update((name, int(dns["port"])) for name in dns["names"])
    return targets


def test_prometheus_scrapes_the_gateway_and_every_worker_where_they_serve(compose: dict[str, Any]) -> None:
    targets = scrape_targets(load_yaml("deploy/prometheus/prometheus.yml"))
    services = compose["services"]
    scraped = {host for job in targets.values() for host, _ in job} - {"localhost"}
    assert scraped == {*APP_SERVICES}

    assert targets["gateway"] == {("gateway", int(service_env(compose, "gateway")["ATOMTUNE_PORT"]))}
    assert "8000:8000" in services["gateway"]["ports"]
    for name in WORKERS:
        port = int(service_env(compose, name)["ATOMTUNE_WORKER_METRICS_PORT"])
        # A generation worker on the port and a fine-tuning worker of one pool process on the next.
        assert services[name]["command"] == ["worker", "--concurrency", "1"]
        assert {(name, port), (name, port + 1)} <= targets["worker"]
        assert f"127.0.0.1:{port}/metrics" in services[name]["healthcheck"]["test"][-1]


def mount_target(service: dict[str, Any], source: str) -> str:
    (target,) = [v.split(":")[1] for v in service["volumes"] if v.split(":")[0] == source]
    return target


def test_grafana_provisions_prometheus_and_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    (datasource,) = load_yaml("deploy/grafana/provisioning/datasources/prometheus.yml")["datasources"]
    url = urlsplit(datasource["url"])
    assert url.hostname in compose["services"] and url.port == 9090
    (provider,) = load_yaml("deploy/grafana/provisioning/dashboards/atomtune.yml")["providers"]
    assert mount_target(grafana, "./deploy/grafana/provisioning") == "/etc/grafana/provisioning"
    assert mount_target(grafana, "./deploy/grafana/dashboards") == provider["options"]["path"]

    dashboard = json.loads((REPO / "deploy/grafana/dashboards/atomtune.json").read_text())
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for shown in ("throughput", "latency", "queue depth", "cache hit rate", "gpu memory"):
        assert shown in titles
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"] and panel["targets"], panel["title"]


def test_every_metric_the_dashboard_queries_exists_in_the_code() -> None:
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/atomtune.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\batomtune_\w+", target["expr"])
    }
    assert queried and queried <= exposed_names(code_metrics())


def test_docs_list_every_metric_and_no_other() -> None:
    metrics = code_metrics()
    # Documented as exposed: counters with _total, histograms and gauges as named.
    expected = {name + ("_total" if kind == "counter" else "") for name, kind in metrics.items()}
    documented = set(re.findall(r"^\| `(atomtune_\w+)`", (REPO / "docs/metrics.md").read_text(), re.MULTILINE))
    assert documented == expected
