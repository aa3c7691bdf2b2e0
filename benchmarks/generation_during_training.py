"""How long a generation takes while a fine-tune runs: with a worker per queue (what `atomtune
worker`, `atomtune up` and the compose file run) against one worker serving both queues (one
process, one job at a time, as before issue #13), on the demo model.

For each, it measures generations one after another with the worker idle, then starts a
training and, once it has taken a step, generations one after another again: the first of them
was submitted while the training ran (later ones may come after its end). Latency is submission
to result.

    python -m benchmarks.generation_during_training            # 3 generations per case, ~2 minutes
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

from benchmarks.service_throughput import DEMO_MODEL, free_port, machine, start_stack
from service.core.redis_db import connect
from service.core.tenants import TenantStore
from service.up import stop_process


def image() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def latencies(client: httpx.Client, count: int) -> list[float]:
    """Each generation's time from submission to its result, one after another."""
    values = []
    for seed in range(count):
        started = time.perf_counter()
        job_id = client.post("/v1/generations", json={"prompt": "a red circle", "seed": seed}).json()["job_id"]
        while client.get(f"/v1/jobs/{job_id}").json()["status"] != "succeeded":
            time.sleep(0.05)
        values.append(time.perf_counter() - started)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--training-steps", type=int, default=300)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="atomtune-interference-"))
    port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    result: dict = {"machine": machine("cpu"), "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
    try:
        for database, topology in enumerate(("per_queue", "one_worker_both_queues")):
            queues = "finetune,generate" if topology == "per_queue" else "both"
            stack = start_stack(topology, port, database, str(DEMO_MODEL), 64, "cpu", folder, queues=queues)
            try:
                _, key = TenantStore(connect(stack.redis_url)).create(f"t-{topology}")
                client = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
                idle = latencies(client, args.generations)
                form = {"prompt": "a red sks", "steps": args.training_steps, "atoms": 16, "density": 0.25}
                files = [("images", ("a.png", image(), "image/png"))]
                training = client.post("/v1/adapters", data=form, files=files).json()["job_id"]
                while client.get(f"/v1/jobs/{training}").json()["progress"]["step"] < 1:
                    time.sleep(0.1)
                busy = latencies(client, args.generations)
                during = client.get(f"/v1/jobs/{training}").json()
                client.delete(f"/v1/jobs/{training}")
                result[topology] = {
                    "training_status_after": during["status"],
                    "training_step_after": during["progress"]["step"],
                    "idle_latency_s": statistics.median(idle),
                    # The first was submitted while the training ran; later ones may follow its end.
                    "during_training_latency_s": busy,
                    "first_over_idle": busy[0] / statistics.median(idle),
                }
                print(topology, result[topology], flush=True)
            finally:
                stack.stop()
    finally:
        stop_process(redis)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
