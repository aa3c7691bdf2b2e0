"""The ``atomtune`` command: tenants, and ``up`` bringing the whole service up and down."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.core.redis_db import connect
from service.core.worker_registry import base_shape
from service.up import BUNDLED_DEMO_MODEL, MAX_RESTARTS, Supervised
from tests.service.conftest import start_up

REPO = Path(__file__).resolve().parents[2]


def atomtune(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_tenant_create_list_revoke(service_env: dict[str, str], gateway: str) -> None:
    created = atomtune(service_env, "tenant", "create", "cli-tenant")
    assert created.returncode == 0, created.stderr
    lines = dict(line.split(": ", 1) for line in created.stdout.splitlines())
    tenant_id, key = lines["tenant"].split()[0], lines["key"]
    assert "shown only this once" in created.stderr
    duplicate = atomtune(service_env, "tenant", "create", "cli-tenant")
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr

    listed = atomtune(service_env, "tenant", "list").stdout
    assert f"{tenant_id}\tcli-tenant\tactive" in listed and key not in listed
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{gateway}/v1/adapters", headers=headers).status_code == 200

    assert atomtune(service_env, "tenant", "revoke", tenant_id).returncode == 0
    assert f"{tenant_id}\tcli-tenant\trevoked" in atomtune(service_env, "tenant", "list").stdout
    assert httpx.get(f"{gateway}/v1/adapters", headers=headers).status_code == 401
    assert atomtune(service_env, "tenant", "revoke", "01ARZ3NDEKTSV4RRFFQ69G5FAV").returncode == 1


def test_commands_explain_missing_pieces(tmp_path: Path) -> None:
    env = {**os.environ, "ATOMTUNE_REDIS_URL": "redis://127.0.0.1:1/0", "ATOMTUNE_BASE_MODEL": ""}
    no_redis = atomtune(env, "tenant", "list")
    assert no_redis.returncode == 1 and "atomtune up" in no_redis.stderr
    no_model = atomtune(env, "worker")
    assert no_model.returncode == 2 and "ATOMTUNE_BASE_MODEL" in no_model.stderr
    bad_queue = atomtune({**env, "ATOMTUNE_BASE_MODEL": "x"}, "worker", "--queues", "training")
    assert bad_queue.returncode == 2 and "finetune, generate" in bad_queue.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(240)
def test_up_starts_redis_gateway_and_worker_and_stops_them_on_ctrl_c(tmp_path: Path) -> None:
    redis_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "ATOMTUNE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "ATOMTUNE_DATA_DIR": str(tmp_path / "data"),
        "ATOMTUNE_PORT": str(http_port),
        "ATOMTUNE_WORKER_HEARTBEAT_SECONDS": "1",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("ATOMTUNE_BASE_MODEL", None)
    stack = start_up(env)
    process, lines, key = stack.process, stack.lines, stack.key
    deadline = time.monotonic() + 180
    try:
        url = f"http://127.0.0.1:{http_port}"
        assert any(url in line for line in lines)
        assert httpx.get(f"{url}/readyz").status_code == 200
        listed = httpx.get(f"{url}/v1/adapters", headers={"Authorization": f"Bearer {key}"})
        assert listed.status_code == 200 and listed.json()["items"] == []
        # Without ATOMTUNE_BASE_MODEL, `up` serves the bundled demo model.
        # The Redis that up starts takes a password, generated once and kept in the data dir.
        password = (tmp_path / "data" / "redis" / "password").read_text().strip()
        db = connect(f"redis://:{password}@127.0.0.1:{redis_port}/0")
        while (shape := base_shape(db)) is None:
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        demo_config = json.loads((BUNDLED_DEMO_MODEL / "transformer" / "config.json").read_text())
        assert shape.num_blocks == demo_config["num_layers"]
        assert not (tmp_path / "data" / "models").exists()
    finally:
        process.send_signal(signal.SIGINT)
        returncode = process.wait(90)
    assert returncode == 0, "".join(lines[-50:])
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=2)
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", redis_port)) != 0, "the Redis that up started still runs"


def test_up_restarts_a_dead_child_but_gives_up_on_a_crash_loop() -> None:
    crash = [sys.executable, "-c", "raise SystemExit(3)"]
    child = Supervised("crasher", lambda: crash, dict(os.environ), signal.SIGTERM)
    started = {child.process.pid}
    with pytest.raises(SystemExit, match=f"died {MAX_RESTARTS + 1} times"):
        while True:
            child.process.wait(30)
            assert child.died()
            child.restart()
            started.add(child.process.pid)
    assert len(started) == MAX_RESTARTS + 1
