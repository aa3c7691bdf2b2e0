"""Generation throughput of the whole service: gateway, Redis and one generation worker, batching
requests of many tenants' adapters in one denoising loop, against the same service with
``ATOMTUNE_MAX_BATCH=1`` (one request at a time) and against the engine's ideal (every request as
one pipeline call, in this process).

Two stacks run side by side on one redis-server (databases 0 and 1), each a gateway and a
generation worker on the demo model (``models/demo``, 64 px); only one works at a time, so every
round measures the batched service, the unbatched one and the engine ideal back to back, and the
ratios are taken within a round. Each of N tenants has its own imported adapter; its requests mix
densities, an atom mask and top-atom requests. Loads: all requests at once (saturation) and
Poisson arrivals at fractions of the saturated rate; latency is a request's time from submission
to its result (``POST /v1/generations?wait=``). A last phase SIGKILLs the batched worker while a
batch is denoising and starts another: every request must succeed exactly once.

    python benchmarks/service_throughput.py --quick            # 1 round, < 3 minutes on 2 CPUs
    python benchmarks/service_throughput.py                    # 3 rounds, more loads
    python benchmarks/service_throughput.py --device cuda --model PATH

Writes benchmarks/results/service_throughput.json (``--output`` to change).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from diffusers import PixArtSigmaPipeline
from prometheus_client.parser import text_string_to_metric_families

from adapters import AdapterHost, SampleRoute, SparseDictionaryAdapter, SparseDictionaryConfig, guided_routes
from adapters import save_adapter as save
from service.core import worker_registry
from service.core.jobs import JobStore
from service.core.redis_db import connect, job_events_key
from service.core.tenants import TenantStore
from service.up import stop_process

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "models" / "demo"
STEPS = 20
GUIDANCE = 4.5
ATOMS = 64
DENSITY = 0.125
PROMPTS = [
    "a red circle on a white background",
    "a blue star on a black background",
    "a green square on a pink background",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


@dataclass
class Stack:
    """A gateway and a generation worker on one Redis database."""

    name: str
    env: dict[str, str]
    url: str
    gateway: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    queues: str = "generate"
    """`atomtune worker --queues`; "both" is one Celery worker on both queues, as before issue #13."""

    @property
    def redis_url(self) -> str:
        return self.env["ATOMTUNE_REDIS_URL"]

    def start_worker(self) -> None:
        command = [sys.executable, "-m", "service.cli", "worker", "--queues", self.queues, "--loglevel", "warning"]
        if self.queues == "both":
            queues = "atomtune.finetune,atomtune.generate"
            command = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", queues, "-c", "1"]
        assert self.log is not None
        out = self.log.open("ab")
        self.worker = subprocess.Popen(command, env=self.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        db = connect(self.redis_url)
        before = set(worker_registry.alive(db, 1.0))
        wait_until(lambda: bool(set(worker_registry.alive(db, 1.0)) - before), 120, f"{self.name}'s worker")
        # The base is loaded in the background; its published shape says it is in memory.
        wait_until(lambda: bool(db.exists("atomtune:base_model")), 120, f"{self.name}'s model")

    def stop(self) -> None:
        if self.worker is not None:
            stop_process(self.worker, signal.SIGQUIT)
        stop_process(self.gateway)


def start_stack(
    name: str,
    redis_port: int,
    database: int,
    model: str,
    max_batch: int,
    device: str,
    folder: Path,
    queues: str = "generate",
) -> Stack:
    env = {
        **os.environ,
        "ATOMTUNE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/{database}",
        "ATOMTUNE_DATA_DIR": str(folder / name),
        "ATOMTUNE_BASE_MODEL": model,
        "ATOMTUNE_DEVICE": device,
        "ATOMTUNE_MAX_BATCH": str(max_batch),
        "ATOMTUNE_WORKER_METRICS_PORT": str(free_port()),
        "ATOMTUNE_WORKER_HEARTBEAT_SECONDS": "1",
        "ATOMTUNE_MAX_ACTIVE_JOBS_PER_TENANT": "64",
        "ATOMTUNE_MAX_STREAMS_PER_TENANT": "64",
    }
    port = free_port()
    log = folder / f"{name}.log"
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--loglevel", "warning"]
    gateway = subprocess.Popen(command, env=env, cwd=REPO, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    stack = Stack(name, env, f"http://127.0.0.1:{port}", gateway, log=log, queues=queues)

    def healthy() -> bool:
        try:
            return httpx.get(f"{stack.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, 60, f"{name}'s gateway")
    stack.start_worker()
    return stack


def random_adapter(transformer: torch.nn.Module, seed: int) -> SparseDictionaryAdapter:
    """A tenant's adapter: random atoms of a trained adapter's scale, with atom importance."""
    config = SparseDictionaryConfig(num_atoms=ATOMS, density=DENSITY)
    adapter = SparseDictionaryAdapter.create(config, transformer, seed=seed)
    generator = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.dictionary.copy_(torch.randn(layer.dictionary.shape, generator=generator) * 0.05)
    adapter.importance = {block: torch.rand(ATOMS, generator=generator) for block in adapter.blocks}
    return adapter


def adapter_zip(adapter: SparseDictionaryAdapter) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        save(adapter, Path(folder) / "adapter")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for file in sorted((Path(folder) / "adapter").iterdir()):
                archive.write(file, file.name)
        return buffer.getvalue()


@dataclass(frozen=True)
class Request:
    tenant: int
    body: dict
    """The generation's JSON body, less the adapter id (each stack has its own ids)."""


def request_mix(tenants: int, per_tenant: int) -> list[Request]:
    """Each tenant's requests cycle through: as trained, a density, an atom mask, its top atoms."""
    variants: list[dict] = [
        {},
        {"density": 0.25},
        {"atom_mask": {"mode": "drop", "blocks": {"0": [0, 1, 2, 3, 4, 5, 6, 7]}}},
        {"top_atoms": 8},
        {"density": 0.0625},
    ]
    requests = []
    for index in range(tenants * per_tenant):
        tenant, nth = index % tenants, index // tenants
        body = {
            "prompt": PROMPTS[index % len(PROMPTS)],
            "steps": STEPS,
            "guidance_scale": GUIDANCE,
            "seed": index,
            **variants[(tenant + nth) % len(variants)],
        }
        requests.append(Request(tenant, body))
    return requests


@dataclass
class Tenants:
    clients: list[httpx.Client]
    adapter_ids: list[str]


def setup_tenants(stack: Stack, zips: list[bytes]) -> Tenants:
    store = TenantStore(connect(stack.redis_url))
    clients, adapter_ids = [], []
    for index, data in enumerate(zips):
        _, key = store.create(f"bench-{index}-{time.monotonic_ns()}")
        client = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=300)
        imported = client.post("/v1/adapters/import", files={"file": ("a.zip", data, "application/zip")})
        if imported.status_code != 201:
            raise SystemExit(f"import failed: {imported.text}")
        clients.append(client)
        adapter_ids.append(imported.json()["id"])
    return Tenants(clients, adapter_ids)


@dataclass
class Outcome:
    latency: float
    job: dict


def submit(tenants: Tenants, request: Request) -> Outcome:
    body = {**request.body, "adapter_id": tenants.adapter_ids[request.tenant]}
    started = time.perf_counter()
    response = tenants.clients[request.tenant].post("/v1/generations", json=body, params={"wait": 60})
    job = response.json().get("job")
    if job is None or job["status"] != "succeeded":
        raise RuntimeError(f"a generation did not succeed: {response.text}")
    return Outcome(time.perf_counter() - started, job)


def run_load(tenants: Tenants, requests: list[Request], rate: float | None, seed: int) -> tuple[float, list[Outcome]]:
    """Submits every request (all at once when ``rate`` is None, else with Poisson arrivals at
    ``rate`` per second), each from its own thread; returns the makespan and each outcome."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    errors: list[Exception] = []
    arrivals = random.Random(seed)

    def one(index: int) -> None:
        try:
            outcomes[index] = submit(tenants, requests[index])
        except Exception as exc:
            errors.append(exc)

    threads = []
    started = time.perf_counter()
    for index in range(len(requests)):
        thread = threading.Thread(target=one, args=(index,))
        thread.start()
        threads.append(thread)
        if rate is not None:
            time.sleep(arrivals.expovariate(rate))
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"{len(errors)} of {len(requests)} generations failed; the first: {errors[0]}")
    return time.perf_counter() - started, [o for o in outcomes if o is not None]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def engine_ideal(pipeline: PixArtSigmaPipeline, host: AdapterHost, requests: list[Request], names: list[str]) -> float:
    """Seconds for every request as one pipeline call: the engine's mixed batch, nothing else."""
    routes = []
    for request in requests:
        body = request.body
        mask = None
        if "atom_mask" in body:
            keep = torch.ones(ATOMS, dtype=torch.bool)
            keep[torch.tensor(body["atom_mask"]["blocks"]["0"])] = False
            mask = {0: keep}
        routes.append(SampleRoute(names[request.tenant], body.get("density"), mask, body.get("top_atoms")))
    started = time.perf_counter()
    with host.route(guided_routes(routes, "conditional")):
        images = pipeline(
            [r.body["prompt"] for r in requests],
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=[torch.Generator().manual_seed(r.body["seed"]) for r in requests],
            use_resolution_binning=False,
            clean_caption=False,
            max_sequence_length=min(300, pipeline.tokenizer.model_max_length),
        ).images
    for image in images:  # as the service stores them
        image.save(io.BytesIO(), format="PNG")
    return time.perf_counter() - started


def scrape(stack: Stack) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(f"http://127.0.0.1:{stack.env['ATOMTUNE_WORKER_METRICS_PORT']}/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def batch_histogram(before: dict, after: dict) -> dict[str, float]:
    """Steps per batch-size bucket (rows) between two scrapes of the worker."""
    buckets = {}
    previous = 0.0
    for (name, labels), value in sorted(
        ((k, v) for k, v in after.items() if k[0] == "atomtune_batch_size_bucket"),
        key=lambda item: float(dict(item[0][1])["le"]),
    ):
        moved = value - before.get((name, labels), 0.0)
        buckets[f"<={dict(labels)['le']}"] = moved - previous
        previous = moved
    return {bucket: count for bucket, count in buckets.items() if count}


def crash_and_recover(stack: Stack, tenants: Tenants, requests: list[Request]) -> dict[str, int]:
    """SIGKILLs the worker mid-batch, starts another; counts lost and twice-run requests."""
    jobs = JobStore(connect(stack.redis_url))
    job_ids = []
    for request in requests:
        body = {**request.body, "adapter_id": tenants.adapter_ids[request.tenant]}
        job_ids.append(tenants.clients[request.tenant].post("/v1/generations", json=body).json()["job_id"])

    def denoising() -> bool:
        return sum(1 for job_id in job_ids if (jobs.get(job_id) or None) and jobs.get(job_id).step >= 2) >= 2  # type: ignore[union-attr]

    wait_until(denoising, 120, "a batch to be denoising")
    assert stack.worker is not None
    stack.worker.send_signal(signal.SIGKILL)
    stack.worker.wait()
    in_flight = sum(1 for job_id in job_ids if not jobs.get(job_id).terminal)  # type: ignore[union-attr]
    stack.start_worker()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not all(jobs.get(j).terminal for j in job_ids):  # type: ignore[union-attr]
        time.sleep(0.2)
    db = connect(stack.redis_url)
    lost = duplicated = 0
    for job_id in job_ids:
        job = jobs.get(job_id)
        ends = [f["status"] for _, f in db.xrange(job_events_key(job_id)) if f.get("status") in ("succeeded", "failed")]
        lost += job is None or job.status != "succeeded"
        duplicated += len(ends) > 1
    return {"requests": len(job_ids), "in_flight_at_kill": in_flight, "lost": lost, "duplicated": duplicated}


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    load = os.getloadavg()[0]
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared; load average {load:.1f} "
        f"at the start), torch {torch.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round and two loads: under 3 minutes on 2 CPUs")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of (batched, unbatched, ideal); default 3")
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--per-tenant", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=64, help="ATOMTUNE_MAX_BATCH of the batched worker (rows)")
    parser.add_argument("--model", default=str(DEMO_MODEL), help="a PixArt-Σ pipeline folder (default: the demo model)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads of every process (default: torch's choice)"
    )
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "service_throughput.json"))
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    if args.threads:
        # Inherited by the stacks' processes, so the workers and this process's engine run alike.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    fractions = [0.5] if args.quick else [0.25, 0.5, 0.75]
    started_at = time.perf_counter()

    pipeline = PixArtSigmaPipeline.from_pretrained(args.model).to(args.device)
    pipeline.set_progress_bar_config(disable=True)
    host = AdapterHost(pipeline.transformer)
    adapters = [random_adapter(pipeline.transformer, seed) for seed in range(args.tenants)]
    zips = [adapter_zip(adapter) for adapter in adapters]
    names = [f"tenant-{index}" for index in range(args.tenants)]
    for name, adapter in zip(names, adapters, strict=True):
        host.add(name, adapter)
    tensors = [*adapters[0].parameters(), *adapters[0].importance.values()]
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    requests = request_mix(args.tenants, args.per_tenant)

    folder = Path(tempfile.mkdtemp(prefix="atomtune-bench-"))
    redis_port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    wait_until(lambda: _pings(redis_port), 10, "redis-server")
    stacks: list[Stack] = []
    try:
        batched = start_stack("batched", redis_port, 0, args.model, args.max_batch, args.device, folder)
        stacks.append(batched)
        unbatched = start_stack("unbatched", redis_port, 1, args.model, 1, args.device, folder)
        stacks.append(unbatched)
        tenants = {stack.name: setup_tenants(stack, zips) for stack in stacks}
        # Warm-up: every adapter resident, every code path run once.
        for stack in stacks:
            run_load(tenants[stack.name], requests[: args.tenants], None, 0)
        engine_ideal(pipeline, host, requests[:2], names)

        lone = [submit(tenants["batched"], requests[i]).latency for i in range(5)]

        throughput: dict[str, list[float]] = {"batched": [], "unbatched": [], "engine_ideal": []}
        ratio_unbatched, ratio_ideal = [], []
        latencies: dict[str, list[float]] = {"batched": [], "unbatched": []}
        before = scrape(batched)
        for round_index in range(rounds):
            ideal = len(requests) / engine_ideal(pipeline, host, requests, names)
            makespan, outcomes = run_load(tenants["batched"], requests, None, round_index)
            rate_batched = len(requests) / makespan
            latencies["batched"] += [o.latency for o in outcomes]
            makespan, outcomes = run_load(tenants["unbatched"], requests, None, round_index)
            rate_unbatched = len(requests) / makespan
            latencies["unbatched"] += [o.latency for o in outcomes]
            throughput["batched"].append(rate_batched)
            throughput["unbatched"].append(rate_unbatched)
            throughput["engine_ideal"].append(ideal)
            ratio_unbatched.append(rate_batched / rate_unbatched)
            ratio_ideal.append(rate_batched / ideal)
            print(
                f"round {round_index + 1}: batched {rate_batched:.2f} images/s, unbatched {rate_unbatched:.2f}, "
                f"engine ideal {ideal:.2f}",
                flush=True,
            )
        after = scrape(batched)
        saturated = statistics.median(throughput["batched"])

        loads = []
        for fraction in fractions:
            # Lone requests between the loads: the machine's neighbours move both alike.
            lone += [submit(tenants["batched"], requests[i]).latency for i in range(3)]
            rate = fraction * saturated
            makespan, outcomes = run_load(tenants["batched"], requests, rate, 100 + int(fraction * 100))
            values = [o.latency for o in outcomes]
            loads.append(
                {
                    "offered_rate_per_s": rate,
                    "fraction_of_saturated": fraction,
                    "throughput_images_per_s": len(requests) / makespan,
                    "p50_latency_s": percentile(values, 0.5),
                    "p99_latency_s": percentile(values, 0.99),
                    "batch_sizes": Counter(o.job["result"]["batch_size"] for o in outcomes),
                }
            )
            p50, p99 = loads[-1]["p50_latency_s"], loads[-1]["p99_latency_s"]
            print(f"load {fraction:.2f} of saturation: p50 {p50:.2f} s, p99 {p99:.2f} s", flush=True)
        half = next(load for load in loads if load["fraction_of_saturated"] == 0.5)
        lone_latency = statistics.median(lone)

        metrics = scrape(batched)
        resident = metrics.get(("atomtune_adapters_resident", frozenset({("tier", "device")})), 0.0)
        device_bytes = metrics.get(("atomtune_adapter_device_bytes", frozenset()), 0.0)
        crash = crash_and_recover(batched, tenants["batched"], requests)
        print(f"crash: {crash}", flush=True)

        result = {
            "machine": machine(args.device),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "model": os.path.relpath(args.model, REPO) if args.model.startswith(str(REPO)) else args.model,
            "device": args.device,
            "tenants": args.tenants,
            "requests": len(requests),
            "steps": STEPS,
            "guidance_scale": GUIDANCE,
            "adapter": {"num_atoms": ATOMS, "density": DENSITY, "weight_bytes": weight_bytes},
            "max_batch_rows": args.max_batch,
            "rounds": rounds,
            "threads": torch.get_num_threads(),
            "throughput_images_per_s": {name: statistics.median(v) for name, v in throughput.items()},
            "throughput_per_round": throughput,
            "throughput_ratio_vs_unbatched": statistics.median(ratio_unbatched),
            "throughput_ratio_vs_engine_ideal": statistics.median(ratio_ideal),
            "saturated_latency_s": {
                name: {"p50": percentile(v, 0.5), "p99": percentile(v, 0.99)} for name, v in latencies.items()
            },
            "lone_request_latency_s": lone_latency,
            "loads": loads,
            "p99_latency_ratio_half_load": half["p99_latency_s"] / lone_latency,
            "batch_size_histogram_saturated": batch_histogram(before, after),
            "resident_adapters": resident,
            "resident_bytes_ratio": device_bytes / resident / weight_bytes if resident else None,
            "crash": crash,
            "lost": crash["lost"],
            "duplicated": crash["duplicated"],
            "seconds": time.perf_counter() - started_at,
        }
        result["bars"] = {
            "throughput_ratio_vs_unbatched >= 2.5": result["throughput_ratio_vs_unbatched"] >= 2.5,
            "throughput_ratio_vs_engine_ideal >= 0.85": result["throughput_ratio_vs_engine_ideal"] >= 0.85,
            "p99_latency_ratio_half_load <= 2": result["p99_latency_ratio_half_load"] <= 2,
            "resident_bytes_ratio <= 1.1": (result["resident_bytes_ratio"] or 0) <= 1.1,
            "lost == duplicated == 0": crash["lost"] == 0 and crash["duplicated"] == 0,
        }
        text = json.dumps(result, indent=2, default=dict)
        print(text)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    finally:
        for stack in stacks:
            stack.stop()
        stop_process(redis)


def _pings(port: int) -> bool:
    try:
        return bool(connect(f"redis://127.0.0.1:{port}/0").ping())
    except Exception:
        return False


if __name__ == "__main__":
    main()
