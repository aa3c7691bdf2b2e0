"""The generation scheduler: a request's images in a mixed, continuously changing batch are the ones
it gets alone, and alone they are exactly what the pipeline gives (so batching changes nothing
for users)."""

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy
import pytest
import torch

from adapters import SampleRoute, SparseDictionaryAdapter, guided_routes
from service.core.contract import AtomMaskSpec, GenerateParams
from service.core.ids import new_id
from service.core.jobs import JobStore
from service.core.redis_db import connect
from service.core.settings import Settings
from tests.service.conftest import STAND_IN_WORKER
from tests.test_sparse_dictionary import trained_like
from worker.metrics import WorkerMetrics
from worker.runtime import Runtime
from worker.scheduler import Finished, GenerationScheduler, JobCancelled, Ticket

pytestmark = pytest.mark.usefixtures("stand_in_worker")
DEMO_MODEL = Path(__file__).resolve().parents[2] / "models" / "demo"


@pytest.fixture(scope="module")
def runtime(redis_url: str) -> Runtime:
    # The demo model, trained: its latents have the scale of a real model's, so 1e-4 means what it says.
    runtime = Runtime(Settings(redis_url=redis_url, base_model=str(DEMO_MODEL), device="cpu"))
    for seed, name in enumerate(("x", "y")):
        runtime.cache.insert(name, trained_like(runtime.pipeline.transformer, seed, density=0.25))
    return runtime


def scheduler_of(runtime: Runtime, redis_url: str, max_batch: int) -> GenerationScheduler:
    settings = Settings(redis_url=redis_url, max_batch=max_batch)
    return GenerationScheduler(runtime, settings, JobStore(connect(redis_url)), WorkerMetrics())


def unused() -> SparseDictionaryAdapter:
    raise AssertionError("the adapter is resident")


def claimed_ticket(jobs: JobStore, generate_params: Callable[..., GenerateParams]) -> Ticket:
    """A job the scheduler may report progress for: created and claimed, as a worker would."""
    job_id = new_id()
    jobs.create(job_id, "tenant", generate_params(), max_active=10_000)
    _, attempt = jobs.claim(job_id, pid=0, max_attempts=3, worker=STAND_IN_WORKER)
    return Ticket(job_id, "tenant", attempt, deadline=time.monotonic() + 600)


def mix(generate_params: Callable[..., GenerateParams]) -> list[GenerateParams]:
    """Every option a request can take, and none shared by all: adapters, densities, a mask, top
    atoms, each guidance branch, no guidance, several images, no adapter, other steps and seeds."""
    drop = AtomMaskSpec(mode="drop", blocks={0: [1, 2, 3]})
    return [
        generate_params(adapter_id="x", seed=1, steps=6),
        generate_params(adapter_id="y", density=0.5, seed=2, guidance_scale=1.0, steps=3),
        generate_params(seed=3, num_images=2, steps=5, prompt="a blue star", negative_prompt="blurry"),
        generate_params(adapter_id="x", atom_mask=drop, seed=4, steps=4),
        generate_params(adapter_id="y", top_atoms=3, adapter_guidance="both", seed=5, guidance_scale=7.0, steps=6),
        generate_params(adapter_id="x", density=0.125, adapter_guidance="unconditional", seed=6, steps=5),
        # Two adapters composed, each with its own scale and options, beside the single ones.
        generate_params(
            adapters=[
                {"adapter_id": "y", "scale": -0.5, "density": None, "atom_mask": drop, "top_atoms": None},
                {"adapter_id": "x", "scale": 1.5, "density": 0.5, "atom_mask": None, "top_atoms": None},
            ],
            seed=7,
            steps=5,
        ),
    ]


def run_alone(scheduler: GenerationScheduler, request: GenerateParams, ticket: Ticket) -> Finished:
    return scheduler.run(scheduler.prepare(request, {use.adapter_id: unused for use in request.adapters}, ticket))


def run_all(
    scheduler: GenerationScheduler,
    jobs: JobStore,
    params: Callable[..., GenerateParams],
    requests: list[GenerateParams],
) -> list[Finished]:
    """The first half at once, the rest once the first have taken a step, so they join a running batch."""
    tickets = [claimed_ticket(jobs, params) for _ in requests]
    half = len(requests) // 2

    def run(index: int) -> Finished:
        return run_alone(scheduler, requests[index], tickets[index])

    with ThreadPoolExecutor(len(requests)) as pool:
        first = [pool.submit(run, index) for index in range(half)]
        wait_for_step(jobs, [t.job_id for t in tickets[:half]], 1)
        rest = [pool.submit(run, index) for index in range(half, len(requests))]
        return [future.result() for future in first + rest]


def wait_for_step(jobs: JobStore, job_ids: list[str], step: int) -> None:
    deadline = time.monotonic() + 60
    while not all(jobs.get(job_id).step >= step for job_id in job_ids):  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the scheduler made no progress"
        time.sleep(0.005)


def test_a_mixed_batch_gives_each_request_what_it_gets_alone(
    runtime: Runtime, redis_url: str, generate_params: Callable[..., GenerateParams]
) -> None:
    jobs = JobStore(connect(redis_url))
    requests = mix(generate_params)
    batched = run_all(scheduler_of(runtime, redis_url, max_batch=64), jobs, generate_params, requests)
    alone_scheduler = scheduler_of(runtime, redis_url, max_batch=1)
    # Requests joined and left a running batch: each saw more rows than its own.
    assert max(f.batch_size for f in batched) > 8
    for request, mixed in zip(requests, batched, strict=True):
        alone = run_alone(alone_scheduler, request, claimed_ticket(jobs, generate_params))
        rows = request.num_images * (2 if request.guidance_scale > 1 else 1)
        assert alone.batch_size == rows
        assert mixed.batch_size > rows
        # Rows are independent, but a product over more rows may sum in another order: float32
        # rounding, amplified by the guidance scale over the steps, and far below a pixel level.
        relative = ((mixed.latents - alone.latents).norm() / alone.latents.norm()).item()
        assert relative < 1e-4, (request, relative)
        for ours, theirs in zip(pixels(alone_scheduler, mixed), pixels(alone_scheduler, alone), strict=True):
            assert (ours - theirs).abs().max() <= 1, request


def pixels(scheduler: GenerationScheduler, finished: Finished) -> list[torch.Tensor]:
    return [torch.from_numpy(numpy.array(image)).int() for image in scheduler.decode(finished.latents)]


def test_alone_through_the_scheduler_is_exactly_the_pipeline(
    runtime: Runtime, redis_url: str, generate_params: Callable[..., GenerateParams]
) -> None:
    jobs = JobStore(connect(redis_url))
    scheduler = scheduler_of(runtime, redis_url, max_batch=32)
    requests = mix(generate_params)
    cases = [
        (requests[0], [SampleRoute("x")]),
        (requests[1], [SampleRoute("y", density=0.5)]),
        (requests[2], [SampleRoute()] * 2),
        (
            requests[6],
            [
                SampleRoute.compose(
                    [
                        SampleRoute(
                            "y", atom_mask={0: ~torch.isin(torch.arange(16), torch.tensor([1, 2, 3]))}, scale=-0.5
                        ),
                        SampleRoute("x", density=0.5, scale=1.5),
                    ]
                )
            ],
        ),
    ]
    for request, routes in cases:
        finished = run_alone(scheduler, request, claimed_ticket(jobs, generate_params))
        if request.guidance_scale > 1:
            routes = guided_routes(routes, "conditional")
        with runtime.lock, runtime.host.route(routes):
            expected = runtime.pipeline(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                num_images_per_prompt=request.num_images,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                generator=torch.Generator().manual_seed(request.seed),
                use_resolution_binning=False,
                clean_caption=False,
                max_sequence_length=runtime.max_sequence_length,
                output_type="latent",
            ).images
        assert torch.equal(finished.latents, expected), request
        with torch.no_grad():
            decoded = runtime.pipeline.vae.decode(expected / runtime.pipeline.vae.config.scaling_factor)[0]
        images = runtime.pipeline.image_processor.postprocess(decoded, output_type="pil")
        assert [image.tobytes() for image in scheduler.decode(finished.latents)] == [i.tobytes() for i in images]


def test_a_cancelled_request_leaves_at_its_next_step_and_the_batch_goes_on(
    runtime: Runtime, redis_url: str, generate_params: Callable[..., GenerateParams]
) -> None:
    jobs = JobStore(connect(redis_url))
    scheduler = scheduler_of(runtime, redis_url, max_batch=32)
    long = generate_params(adapter_id="x", steps=60)
    tickets = [claimed_ticket(jobs, generate_params) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run_alone, scheduler, long, ticket) for ticket in tickets]
        wait_for_step(jobs, [t.job_id for t in tickets], 2)
        assert jobs.cancel(tickets[0].job_id) == "cancelling"
        with pytest.raises(JobCancelled):
            futures[0].result()
        stopped_at = jobs.get(tickets[0].job_id).step  # type: ignore[union-attr]
        assert stopped_at < 60
        assert futures[1].result().latents.shape[0] == 1
    assert jobs.get(tickets[1].job_id).step == 60  # type: ignore[union-attr]
