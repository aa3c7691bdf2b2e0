"""Real parts only: a redis-server on a free port, the gateway under uvicorn and one Celery worker
process, all started once per session, with the tiny PixArt-Σ pipeline as the base model."""

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.core import worker_registry
from service.core.contract import GenerateParams
from service.core.redis_db import connect
from service.core.settings import Settings
from service.core.tenants import TenantStore
from service.up import stop_process

REPO = Path(__file__).resolve().parents[2]
STARTUP_SECONDS = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_redis(folder: Path, port: int) -> subprocess.Popen[bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    db = connect(f"redis://127.0.0.1:{port}/0")

    def answers() -> bool:
        try:
            return bool(db.ping())
        except Exception:
            return False

    wait_until(answers, 10, "redis-server")
    return process


def _image_bytes(color: tuple[int, int, int], size: int = 64, fmt: str = "PNG") -> bytes:
    """A square of one colour with a contrasting quarter, so the concept is not a flat fill."""
    image = Image.new("RGB", (size, size), color)
    image.paste((255 - color[0], 255 - color[1], 255 - color[2]), (0, 0, size // 2, size // 2))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    process = start_redis(tmp_path_factory.mktemp("redis"), port)
    yield f"redis://127.0.0.1:{port}/0"
    stop_process(process)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _redis(tmp_path_factory)


@pytest.fixture(scope="module")
def own_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis of the module's own, for workers that no other test's worker may compete with."""
    yield from _redis(tmp_path_factory)


STAND_IN_WORKER = "test-stand-in@local"


@pytest.fixture(scope="module")
def stand_in_worker(redis_url: str) -> Iterator[str]:
    """A worker name with a heartbeat, for tests that claim jobs themselves: a real worker running
    meanwhile would otherwise take those jobs for orphans and queue them again."""
    db = connect(redis_url)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(0.2):
            worker_registry.beat(db, STAND_IN_WORKER)

    worker_registry.beat(db, STAND_IN_WORKER)
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    yield STAND_IN_WORKER
    stop.set()
    thread.join()
    worker_registry.leave(db, STAND_IN_WORKER)


@pytest.fixture(scope="session")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from adapters import save_tiny_pipeline

    return str(save_tiny_pipeline(tmp_path_factory.mktemp("base") / "tiny-pixart-sigma"))


@pytest.fixture(scope="session")
def service_env(redis_url: str, base_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {
        **os.environ,
        "ATOMTUNE_REDIS_URL": redis_url,
        "ATOMTUNE_DATA_DIR": str(tmp_path_factory.mktemp("data")),
        "ATOMTUNE_BASE_MODEL": base_model,
        "ATOMTUNE_DEVICE": "cpu",
        "ATOMTUNE_WORKER_HEARTBEAT_SECONDS": "1",
        "ATOMTUNE_WORKER_METRICS_PORT": str(free_port()),
        "ATOMTUNE_MAX_IMAGE_BYTES": "100000",
        "ATOMTUNE_MAX_IMAGE_PIXELS": str(256 * 256),
        "ATOMTUNE_MAX_ACTIVE_JOBS_PER_TENANT": "4",
        # Sizes and costs beyond the tiny base's own, so that tests can hold a worker for a while
        # (the defaults that follow the base have a test of their own).
        "ATOMTUNE_MAX_RESOLUTION": "1024",
        "ATOMTUNE_MAX_IMAGE_STEPS": "1000000",
        # Tests make requests faster than any client should (the limits have a test of their own).
        "ATOMTUNE_RATE_LIMIT_REQUESTS": "100000/minute",
        "ATOMTUNE_RATE_LIMIT_SUBMISSIONS": "100000/minute",
        "ATOMTUNE_RATE_LIMIT_AUTH_FAILURES": "100000/minute",
        # Tests keep jobs queued with no message on purpose (the reconciler has a test of its own).
        "ATOMTUNE_LOST_MESSAGE_SECONDS": "3600",
        # Each process gets one thread: the machine's two cores are shared with the test process.
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(scope="module")
def own_env(
    own_redis_url: str, service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., dict[str, str]]:
    """Environments for a stack of the module's own: its own Redis, a data dir of its own named
    ``name``, no worker metrics port, and each keyword as an ``ATOMTUNE_`` setting on top."""

    def make(name: str, **settings: str) -> dict[str, str]:
        return {
            **service_env,
            "ATOMTUNE_REDIS_URL": own_redis_url,
            "ATOMTUNE_DATA_DIR": str(tmp_path_factory.mktemp(name)),
            "ATOMTUNE_WORKER_METRICS_PORT": "0",
            **{f"ATOMTUNE_{key.upper()}": value for key, value in settings.items()},
        }

    return make


@pytest.fixture(scope="session")
def settings(service_env: dict[str, str]) -> Settings:
    return Settings(
        redis_url=service_env["ATOMTUNE_REDIS_URL"],
        data_dir=Path(service_env["ATOMTUNE_DATA_DIR"]),
        base_model=service_env["ATOMTUNE_BASE_MODEL"],
        worker_heartbeat_seconds=1.0,
    )


@pytest.fixture(scope="session")
def tenants(settings: Settings) -> TenantStore:
    return TenantStore(connect(settings.redis_url))


@pytest.fixture(scope="session")
def gateway(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from serve_gateway(service_env, tmp_path_factory)


def serve_gateway(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``atomtune serve`` in a process of its own, until the generator is closed."""
    port = free_port()
    log = (tmp_path_factory.mktemp("logs") / "gateway.log").open("wb")
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--loglevel", "warning"]
    process = subprocess.Popen(command, env=service_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, f"the gateway exited; see {log.name}"
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, STARTUP_SECONDS, "the gateway")
    yield url
    stop_process(process)


@pytest.fixture(scope="session")
def worker(service_env: dict[str, str], settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One worker process serving both queues; yields its log file."""
    log_path = tmp_path_factory.mktemp("logs") / "worker.log"
    log = log_path.open("wb")
    command = [sys.executable, "-m", "service.cli", "worker", "--loglevel", "info"]
    process = subprocess.Popen(command, env=service_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    db = connect(settings.redis_url)

    def alive() -> bool:
        assert process.poll() is None, f"the worker exited:\n{log_path.read_text()[-3000:]}"
        return bool(worker_registry.alive(db, settings.worker_heartbeat_seconds))

    wait_until(alive, STARTUP_SECONDS, "the worker's heartbeat")
    yield log_path
    stop_process(process, signal.SIGQUIT)


@dataclass
class UpProcess:
    """``atomtune up`` running, its output collected line by line."""

    process: subprocess.Popen[str]
    lines: list[str]
    key: str
    """The demo tenant's key it printed."""

    def log(self, last: int = 60) -> str:
        return "".join(self.lines[-last:])


def start_up(env: dict[str, str], timeout: float = 180) -> UpProcess:
    """``atomtune up`` in a process of its own, once it has printed the demo tenant's key."""
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "up"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # Drained in a thread: the gateway's and worker's logs share the pipe.
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stdout or []), daemon=True).start()
    prefix = "demo tenant key: "
    deadline = time.monotonic() + timeout
    while not any(line.startswith(prefix) for line in lines):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError("".join(lines))
        time.sleep(0.2)
    key = next(line for line in lines if line.startswith(prefix)).removeprefix(prefix).strip()
    return UpProcess(process, lines, key)


def serve_stack(
    env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, queues: str = "generate"
) -> Iterator[str]:
    """A worker for ``queues`` (each of its workers beating) and a gateway on ``env``'s Redis;
    yields the gateway's URL, stops both at the end."""
    log = tmp_path_factory.mktemp("logs") / "worker.log"
    command = [sys.executable, "-m", "service.cli", "worker", "--queues", queues, "--loglevel", "info"]
    worker = subprocess.Popen(command, env=env, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    db = connect(env["ATOMTUNE_REDIS_URL"])
    expected = len(queues.split(","))

    def beating() -> bool:
        assert worker.poll() is None, log.read_text()[-3000:]
        return len(worker_registry.alive(db, 1.0)) == expected

    wait_until(beating, STARTUP_SECONDS, "the workers' heartbeats")
    gateway = serve_gateway(env, tmp_path_factory)
    yield next(gateway)
    gateway.close()
    stop_process(worker, signal.SIGQUIT)


class Api(httpx.Client):
    """A client authenticated as one tenant."""

    tenant_id: str


@pytest.fixture
def new_tenant(gateway: str, tenants: TenantStore) -> Iterator[Callable[..., Api]]:
    yield from tenant_clients(gateway, tenants)


def tenant_clients(gateway: str, tenants: TenantStore) -> Iterator[Callable[..., Api]]:
    """Makes a new tenant and a client authenticated as it, per call; closes them at the end."""
    clients: list[Api] = []

    def make(name: str, timeout: float = 60) -> Api:
        tenant, key = tenants.create(f"{name}-{time.monotonic_ns()}")
        client = Api(base_url=gateway, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)
        client.tenant_id = tenant.id
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def _wait_job(
    api: httpx.Client, job_id: str, timeout: float = 120.0, until: Callable[[dict], bool] | None = None
) -> dict:
    """Polls the job until it ends (or ``until`` holds) and returns it."""
    done = until or (lambda job: job["status"] in ("succeeded", "failed", "cancelled"))
    deadline = time.monotonic() + timeout
    while True:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if done(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {timeout:.0f} s: {job}"
        time.sleep(0.1)


def adapter_zip(folder: Path, fingerprint: str, num_atoms: int, features: int, num_blocks: int) -> bytes:
    """An adapter as ``/download`` zips it, with seeded weights, for a base of these dimensions."""
    import zipfile

    import torch

    from adapters import SparseDictionaryAdapter, SparseDictionaryConfig, save_adapter

    config = SparseDictionaryConfig(num_atoms=num_atoms, density=0.25, base_fingerprint=fingerprint)
    adapter = SparseDictionaryAdapter(config, features, features, num_blocks)
    for layer in adapter.layers.values():
        layer.reset_parameters(torch.Generator().manual_seed(0))
    saved = folder / f"adapter-{time.monotonic_ns()}"
    save_adapter(adapter, saved)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in saved.iterdir():
            archive.writestr(path.name, path.read_bytes())
    return buffer.getvalue()


@pytest.fixture(scope="session")
def wait_job() -> Callable[..., dict]:
    return _wait_job


@pytest.fixture(scope="session")
def wait_for() -> Callable[..., None]:
    return wait_until


@pytest.fixture(scope="session")
def image_bytes() -> Callable[..., bytes]:
    return _image_bytes


def _generate_params(
    adapter_id: str | None = None,
    density: float | None = None,
    atom_mask: object = None,
    top_atoms: int | None = None,
    **fields: object,
) -> GenerateParams:
    """A generation's message as the gateway writes it: the API's defaults, ``fields`` over them;
    ``adapter_id`` and its options give one adapter at scale 1, as the API's single-adapter form."""
    defaults: dict[str, object] = {
        "prompt": "p",
        "negative_prompt": "",
        "adapters": [],
        "adapter_guidance": "conditional",
        "num_images": 1,
        "steps": 20,
        "guidance_scale": 4.5,
        "width": None,
        "height": None,
        "seed": 0,
    }
    if adapter_id is not None:
        use = {
            "adapter_id": adapter_id,
            "scale": 1.0,
            "density": density,
            "atom_mask": atom_mask,
            "top_atoms": top_atoms,
        }
        defaults["adapters"] = [use]
    return GenerateParams.model_validate({**defaults, **fields})


@pytest.fixture(scope="session")
def generate_params() -> Callable[..., GenerateParams]:
    return _generate_params


@pytest.fixture(scope="session")
def resident_adapters(service_env: dict[str, str]) -> Callable[[], dict[str, float]]:
    """Reads the worker's ``atomtune_adapters_resident`` gauge: adapters per cache tier."""
    url = f"http://127.0.0.1:{service_env['ATOMTUNE_WORKER_METRICS_PORT']}/metrics"

    def read() -> dict[str, float]:
        families = text_string_to_metric_families(httpx.get(url, timeout=10).text)
        gauge = next(family for family in families if family.name == "atomtune_adapters_resident")
        return {sample.labels["tier"]: sample.value for sample in gauge.samples}

    return read
