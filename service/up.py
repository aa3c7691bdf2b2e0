"""``atomtune up``: the whole service on one machine, for trying it out.

Starts a ``redis-server`` (with a generated password) when none answers at the configured URL, a
gateway and a worker, each in its own session so that Ctrl-C reaches only this supervisor; prints
the URL and a demo tenant's key; starts again any child that dies (a dead worker's jobs are put
back at its successor's first heartbeat); and on Ctrl-C stops them in order: gateway, worker
(running jobs are put back in the queue), then the Redis it started.
"""

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from urllib.error import URLError
from urllib.parse import urlsplit, urlunsplit
from urllib.request import urlopen

import redis

from service.core import worker_registry
from service.core.queue import QUEUES
from service.core.redis_db import connect
from service.core.settings import Settings, get_settings
from service.core.tenants import TenantStore

DEMO_TENANT = "demo"
STARTUP_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 20.0
# A child that dies more often than this within the window is broken, not unlucky: up gives up.
MAX_RESTARTS = 5
RESTART_WINDOW_SECONDS = 60.0
CLI = [sys.executable, "-m", "service.cli"]
# Trained by benchmarks/train_demo_model.py; present in a checkout (editable install).
BUNDLED_DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "demo"


def _redis_answers(url: str) -> bool:
    try:
        return bool(connect(url, retries=0).ping())
    except redis.RedisError:
        return False


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


def _demo_key(redis_url: str) -> str:
    tenants = TenantStore(connect(redis_url))
    tenant = tenants.find_by_name(DEMO_TENANT)
    if tenant is None:
        return tenants.create(DEMO_TENANT)[1]
    # Keys are kept only as hashes, so the old one cannot be shown again: issue a fresh one.
    tenants.revoke_keys(tenant.id)
    return tenants.issue_key(tenant.id)


def stop_process(process: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM) -> None:
    """Ask a child to stop with ``sig``; then kill what is left of its session (the child, if it did
    not stop within the timeout, and whatever it started), so stopping is bounded whatever the load."""
    if process.poll() is None:
        process.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(STOP_TIMEOUT_SECONDS)
    # Each child leads its own session and process group (start_new_session).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


class Supervised:
    """A child in its own session, started again when it dies, unless it keeps dying."""

    def __init__(
        self,
        label: str,
        command: Callable[[], list[str]],
        env: dict[str, str],
        stop_signal: signal.Signals,
        config: bytes | None = None,
    ) -> None:
        """``config`` is written to the child's stdin (and the output discarded), for what must not
        show in its command line."""
        self.label = label
        self.command = command
        self.env = env
        self.stop_signal = stop_signal
        self.config = config
        self.process = self._spawn()
        self.restarts: deque[float] = deque()

    def _spawn(self) -> subprocess.Popen[bytes]:
        if self.config is None:
            return subprocess.Popen(self.command(), env=self.env, start_new_session=True)
        process = subprocess.Popen(
            self.command(), env=self.env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True
        )
        assert process.stdin is not None
        with process.stdin:
            process.stdin.write(self.config)
        return process

    def died(self) -> bool:
        return self.process.poll() is not None

    def restart(self) -> None:
        """Starts it again after it died; SystemExit when it died too often in a short time."""
        now = time.monotonic()
        while self.restarts and self.restarts[0] < now - RESTART_WINDOW_SECONDS:
            self.restarts.popleft()
        if len(self.restarts) >= MAX_RESTARTS:
            raise SystemExit(f"the {self.label} died {MAX_RESTARTS + 1} times in {RESTART_WINDOW_SECONDS:.0f} s")
        code = self.process.returncode
        # What it started may outlive it (a worker's pool processes): gone before its successor comes.
        stop_process(self.process)
        self.restarts.append(now)
        print(f"the {self.label} exited ({code}); starting it again", file=sys.stderr, flush=True)
        self.process = self._spawn()

    def stop(self) -> None:
        stop_process(self.process, self.stop_signal)


class WorkerGroup:
    """The worker command's node names, fresh at each start; when it dies, their heartbeats are
    retired at once, so the next worker's first heartbeat puts back the jobs they held (rather than
    waiting for the heartbeats to age out)."""

    def __init__(self, db: redis.Redis) -> None:
        self.db = db
        self.base = ""

    def command(self) -> list[str]:
        self.base = f"atomtune-up-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        return [*CLI, "worker", "--hostname", self.base]

    def retire(self) -> None:
        for queue in QUEUES:
            worker_registry.leave(self.db, worker_registry.node_name(self.base, queue))


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _local_redis_url(settings: Settings) -> str:
    """The configured URL with the password of the Redis that ``up`` starts, made once and kept in
    the data dir (0600: the umask), so that no other local user can read or change the jobs."""
    url = urlsplit(settings.redis_url)
    if url.hostname not in ("127.0.0.1", "localhost", "::1") or url.password:
        raise SystemExit(f"no Redis answers at {settings.redis_url}, and up only starts a local one")
    password_file = settings.data_dir.resolve() / "redis" / "password"
    if not password_file.exists():
        password_file.parent.mkdir(parents=True, exist_ok=True)
        password_file.write_text(secrets.token_urlsafe(24))
    password = password_file.read_text().strip()
    return urlunsplit(url._replace(netloc=f":{password}@{url.hostname}:{url.port or 6379}"))


def _start_redis(settings: Settings, url: str) -> Supervised:
    parts = urlsplit(url)
    folder = settings.data_dir.resolve() / "redis"
    # Append-only persistence: jobs and tenants survive a restart, losing at most a second. The
    # password goes in through stdin's config (not argv, which any local user can read in ps).
    command = ["redis-server", "-", "--port", str(parts.port), "--bind", "127.0.0.1", "--dir", str(folder)]
    command += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
    if shutil.which("redis-server") is None:
        raise SystemExit("no Redis answers and there is no redis-server to start; install redis-server")
    config = f"requirepass {parts.password}\n".encode()
    redis_process = Supervised("redis-server", lambda: command, dict(os.environ), signal.SIGTERM, config)
    deadline = time.monotonic() + 10
    while not _redis_answers(url):
        if redis_process.died() or time.monotonic() > deadline:
            raise SystemExit(f"redis-server did not start on port {parts.port}")
        time.sleep(0.1)
    return redis_process


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
    children: list[Supervised] = []
    workers: WorkerGroup | None = None
    try:
        redis_url = settings.redis_url
        if not _redis_answers(redis_url):
            redis_url = _local_redis_url(settings)
            if not _redis_answers(redis_url):
                children.append(_start_redis(settings, redis_url))
        env = {
            **os.environ,
            "ATOMTUNE_BASE_MODEL": _base_model(settings),
            "ATOMTUNE_DATA_DIR": str(settings.data_dir.resolve()),
            "ATOMTUNE_REDIS_URL": redis_url,
        }
        key = _demo_key(redis_url)
        serve = [*CLI, "serve", "--host", host, "--port", str(port)]
        workers = WorkerGroup(connect(redis_url))
        # A cold shutdown puts running jobs back in the queue after a short grace period.
        worker = Supervised("worker", workers.command, env, signal.SIGQUIT)
        children.append(worker)
        gateway = Supervised("gateway", lambda: serve, env, signal.SIGTERM)
        children.append(gateway)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        _wait_ready(url, [gateway.process, worker.process])
        print(f"\natomtune is up at {url} (playground: {url}/, API docs: {url}/docs)")
        print(f"demo tenant key: {key}")
        print(f'try: curl -H "Authorization: Bearer {key}" {url}/v1/adapters')
        if redis_url != settings.redis_url:
            print(f"tenant commands need its Redis: ATOMTUNE_REDIS_URL={redis_url} atomtune tenant list")
        print("Ctrl-C stops everything.\n", flush=True)
        while True:
            for child in children:
                if child.died():
                    if child is worker:
                        workers.retire()
                    child.restart()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        # The gateway first (no new jobs), then the worker, then the Redis they share.
        for child in reversed(children):
            child.stop()
            if workers is not None and child.label == "worker":
                workers.retire()
