"""``atomtune up`` keeps every job through a worker crash and a Redis restart.

The whole stack as a user runs it: ``up`` starts its own password-protected Redis, a gateway and a
worker. With 20 jobs in flight (fine-tunes and generations), the worker's main process is SIGKILLed
and then Redis itself; ``up`` starts both again, the restarted worker puts back the jobs its
predecessor held (at its first heartbeat, not after the visibility timeout), and every job ends
exactly once, succeeded, with the tenant's quota slots all free again.
"""

import io
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from service.core.jobs import JobStore
from service.core.queue import messages_held
from service.core.redis_db import WORKERS_KEY, connect, job_events_key
from tests.service.conftest import free_port, start_up

REPO = Path(__file__).resolve().parents[2]
FINETUNES = 4
GENERATIONS = 16
TERMINAL = {"succeeded", "failed", "cancelled"}


def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _children(pid: int) -> dict[int, str]:
    """The command lines of a process's direct children."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # The parent pid is the fourth field after the parenthesised command name.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(entry.name)] = cmdline
    return found


def _child(pid: int, marker: str) -> int:
    matches = [child for child, cmdline in _children(pid).items() if marker in cmdline]
    assert len(matches) == 1, _children(pid)
    return matches[0]


def _stuck(jobs: JobStore, job_ids: list[str], db: redis.Redis, lines: list[str]) -> str:
    """What a failure needs to be understood: the unfinished jobs' records, the broker's messages,
    the workers' heartbeats and what the stack logged beyond its access log."""
    records = [jobs.get(job_id) for job_id in job_ids]
    unfinished = [vars(job) for job in records if job is not None and job.status not in TERMINAL]
    logged = [line for line in lines if '" 200' not in line and '" 503' not in line]
    return (
        f"unfinished: {unfinished}\nmessages: {sorted(messages_held(db))}\n"
        f"workers: {db.zrange(WORKERS_KEY, 0, -1, withscores=True)} at {time.time()}\n" + "".join(logged[-80:])
    )


@pytest.mark.timeout(420)
def test_twenty_jobs_end_exactly_once_through_a_worker_kill_and_a_redis_restart(tmp_path: Path) -> None:
    redis_port, http_port = free_port(), free_port()
    data = tmp_path / "data"
    env = {
        **os.environ,
        "ATOMTUNE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "ATOMTUNE_DATA_DIR": str(data),
        "ATOMTUNE_PORT": str(http_port),
        "ATOMTUNE_WORKER_HEARTBEAT_SECONDS": "1",
        "ATOMTUNE_WORKER_METRICS_PORT": "0",
        "ATOMTUNE_MAX_ACTIVE_JOBS_PER_TENANT": str(FINETUNES + GENERATIONS),
        # The test polls its 20 jobs faster than a tenant's request rate allows.
        "ATOMTUNE_RATE_LIMIT_REQUESTS": "100000/minute",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("ATOMTUNE_BASE_MODEL", None)
    stack = start_up(env)
    up, lines, key = stack.process, stack.lines, stack.key
    deadline = time.monotonic() + 180
    try:
        password = (data / "redis" / "password").read_text().strip()
        assert (data / "redis" / "password").stat().st_mode & 0o077 == 0
        redis_url = f"redis://:{password}@127.0.0.1:{redis_port}/0"
        db = connect(redis_url)
        with pytest.raises(redis.AuthenticationError):
            connect(f"redis://127.0.0.1:{redis_port}/0", retries=0).ping()
        api = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", headers={"Authorization": f"Bearer {key}"})

        job_ids = []
        for index in range(FINETUNES):
            files = [("images", (f"{i}.png", _png((200, 40 * i, 30)), "image/png")) for i in range(3)]
            form = {"prompt": f"a red square {index}", "steps": 150, "atoms": 16, "seed": index}
            response = api.post("/v1/adapters", data=form, files=files)
            assert response.status_code == 202, response.text
            job_ids.append(response.json()["job_id"])
        for index in range(GENERATIONS):
            body = {"prompt": f"a blue circle {index}", "steps": 60, "num_images": 2, "seed": index}
            response = api.post("/v1/generations", json=body)
            assert response.status_code == 202, response.text
            job_ids.append(response.json()["job_id"])

        jobs = JobStore(db)

        def statuses() -> list[str]:
            return [job.status for job in (jobs.get(job_id) for job_id in job_ids) if job is not None]

        while statuses().count("running") < 2:
            assert time.monotonic() < deadline, statuses()
            time.sleep(0.1)
        worker = _child(up.pid, "service.cli worker")
        os.kill(worker, signal.SIGKILL)
        # Then Redis, while the restarted worker puts the jobs back and runs them.
        while not [pid for pid, cmd in _children(up.pid).items() if "service.cli worker" in cmd and pid != worker]:
            assert time.monotonic() < deadline, "".join(lines[-60:])
            time.sleep(0.1)
        time.sleep(3)
        os.kill(_child(up.pid, "redis-server"), signal.SIGKILL)

        answers: list[int] = []
        deadline = time.monotonic() + 240
        while True:
            replies = [api.get(f"/v1/jobs/{job_id}") for job_id in job_ids]
            answers += [reply.status_code for reply in replies]
            finished = {job_id: r.json()["status"] for job_id, r in zip(job_ids, replies, strict=True) if r.is_success}
            if len(finished) == len(job_ids) and set(finished.values()) <= TERMINAL:
                break
            assert time.monotonic() < deadline, _stuck(jobs, job_ids, db, lines)
            time.sleep(0.5)
        # While Redis restarted, the gateway rode through it or said to retry, never failed.
        assert set(answers) <= {200, 503}, sorted(set(answers))
        assert set(finished.values()) == {"succeeded"}, finished
        records = [jobs.get(job_id) for job_id in job_ids]
        assert any(record is not None and record.attempts > 1 for record in records), "no job was interrupted"
        for job_id in job_ids:
            ends = [f["status"] for _, f in db.xrange(job_events_key(job_id)) if f.get("status") in TERMINAL]
            assert ends == ["succeeded"], (job_id, ends)
        assert records[0] is not None and jobs.active_count(records[0].tenant_id) == 0
        assert up.poll() is None, "up stopped instead of restarting its children"
    finally:
        up.send_signal(signal.SIGINT)
        returncode = up.wait(90)
    assert returncode == 0, "".join(lines[-50:])
