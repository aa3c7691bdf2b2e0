"""``atomtune up``: the whole service on one machine, for trying it out.

Starts a ``redis-server`` when none answers at the configured URL, a gateway and a worker (each
in its own session, so Ctrl-C reaches only this supervisor), prints the URL and a demo tenant's
key, and on Ctrl-C stops them in order: gateway, worker (running jobs are put back in the
queue), then the Redis it started.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from urllib.error import URLError
from urllib.parse import urlsplit
from urllib.request import urlopen

import redis

from service.core.redis_db import connect
from service.core.settings import Settings, get_settings
from service.core.tenants import TenantStore

DEMO_TENANT = "demo"
STARTUP_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 20.0
# Trained by benchmarks/train_demo_model.py; present in a checkout (editable install).
BUNDLED_DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "demo"


def _redis_answers(url: str) -> bool:
    try:
        return bool(connect(url).ping())
    except redis.RedisError:
        return False


def _start_redis(settings: Settings) -> subprocess.Popen[bytes]:
    url = urlsplit(settings.redis_url)
    if url.hostname not in ("127.0.0.1", "localhost", "::1") or url.password:
        raise SystemExit(f"no Redis answers at {settings.redis_url}, and up only starts a local one")
    folder = settings.data_dir.resolve() / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    # Append-only persistence: jobs and tenants survive a restart, losing at most a second.
    command = ["redis-server", "--port", str(url.port or 6379), "--bind", "127.0.0.1", "--dir", str(folder)]
    command += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
    try:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, start_new_session=True)
    except FileNotFoundError:
        raise SystemExit("no Redis answers and there is no redis-server to start; install redis-server") from None
    deadline = time.monotonic() + 10
    while not _redis_answers(settings.redis_url):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"redis-server did not start on port {url.port or 6379}")
        time.sleep(0.1)
    return process


def _base_model(settings: Settings) -> str:
    if settings.base_model:
        return settings.base_model
    # The bundled demo model draws the synthetic shapes world, so fine-tuning visibly works.
    if (BUNDLED_DEMO_MODEL / "model_index.json").exists():
        return str(BUNDLED_DEMO_MODEL)
    # Installed without the repository's models/ folder: a tiny random PixArt-Σ still shows the whole path.
    folder = settings.data_dir.resolve() / "models" / "tiny-pixart-sigma"
    if not (folder / "model_index.json").exists():
        from adapters import save_tiny_pipeline

        print(f"saving a tiny PixArt-Σ pipeline to {folder} ...", flush=True)
        save_tiny_pipeline(folder)
    return str(folder)


def _demo_key(settings: Settings) -> str:
    tenants = TenantStore(connect(settings.redis_url))
    tenant = tenants.find_by_name(DEMO_TENANT)
    if tenant is None:
        return tenants.create(DEMO_TENANT)[1]
    # Keys are kept only as hashes, so the old one cannot be shown again: issue a fresh one.
    tenants.revoke_keys(tenant.id)
    return tenants.issue_key(tenant.id)


def stop_process(process: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM) -> None:
    """Ask a child to stop with ``sig``; kill it if it has not stopped within the timeout."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _wait_ready(url: str, children: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if any(child.poll() is not None for child in children):
            raise SystemExit("the gateway or the worker exited during startup; see the log above")
        try:
            with urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (URLError, OSError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"the service was not ready within {STARTUP_TIMEOUT_SECONDS:.0f} s")


def run_up(host: str | None, port: int | None) -> int:
    settings = get_settings()
    host, port = host or settings.host, port or settings.port
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)
    redis_process: subprocess.Popen[bytes] | None = None
    gateway: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    try:
        if not _redis_answers(settings.redis_url):
            redis_process = _start_redis(settings)
        env = {
            **os.environ,
            "ATOMTUNE_BASE_MODEL": _base_model(settings),
            "ATOMTUNE_DATA_DIR": str(settings.data_dir.resolve()),
        }
        key = _demo_key(settings)
        cli = [sys.executable, "-m", "service.cli"]
        serve = [*cli, "serve", "--host", host, "--port", str(port)]
        gateway = subprocess.Popen(serve, env=env, start_new_session=True)
        worker = subprocess.Popen([*cli, "worker"], env=env, start_new_session=True)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        _wait_ready(url, [gateway, worker])
        print(f"\natomtune is up at {url} (API docs: {url}/docs)")
        print(f"demo tenant key: {key}")
        print(f'try: curl -H "Authorization: Bearer {key}" {url}/v1/adapters')
        print("Ctrl-C stops everything.\n", flush=True)
        while gateway.poll() is None and worker.poll() is None:
            time.sleep(0.5)
        print("a service process exited; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        if gateway is not None:
            stop_process(gateway, signal.SIGTERM)
        if worker is not None:
            # A cold shutdown puts running jobs back in the queue after a short grace period.
            stop_process(worker, signal.SIGQUIT)
        if redis_process is not None:
            stop_process(redis_process, signal.SIGTERM)
