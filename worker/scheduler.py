"""Many generations in one denoising loop: step-level continuous batching across adapters.

A generation worker runs one ``GenerationScheduler``. Each Celery task thread prepares its request
(prompt embeddings, initial latents, its own copy of the noise scheduler), hands it over and waits;
one loop thread owns the transformer and runs every admitted request as rows of one batch. At each
step boundary it admits waiting requests (within ``ATOMTUNE_MAX_BATCH`` rows and
``ATOMTUNE_MAX_BATCH_TOKENS`` rows x tokens, oldest first), runs one transformer forward pass for
every row, each row with its own timestep, prompt, adapter route and guidance scale, steps each
request's own noise scheduler, and lets finished, cancelled and superseded requests go. The task
thread then decodes its latents and stores the images.

Each request's arithmetic is the pipeline's own (``PixArtSigmaPipeline.__call__``): latents drawn
from its seed, CFG rows laid out [unconditional; conditional] with ``guided_routes`` deciding
which half its adapter acts on, ``u + g·(c − u)``, the learned-sigma half dropped, its scheduler's
``step``. Rows are independent in the transformer, so a request's images are those it gets alone.

Requests of different sizes never share a forward pass: they form groups, stepped in turn.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from redis.exceptions import RedisError

from adapters import SampleRoute, SparseDictionaryAdapter, guided_routes
from service.core.contract import AtomMaskSpec, CacheTier, GenerateParams, JobError
from service.core.jobs import JobStore
from service.core.settings import Settings
from worker.attribution import AtomAttribution
from worker.cache import CacheFull
from worker.metrics import WorkerMetrics
from worker.runtime import Runtime

log = logging.getLogger(__name__)
NO_CONDITIONS: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
Item = TypeVar("Item")
Result = TypeVar("Result")


class JobCancelled(Exception):
    pass


class Superseded(Exception):
    """A redelivery of this job has taken over; this run must stop without writing anything."""


AdapterLoader = Callable[[], SparseDictionaryAdapter]
"""Reads one of a request's adapters from storage; called only when no cache tier holds it."""


@dataclass(frozen=True)
class Ticket:
    """The job a request belongs to, for its progress writes (fenced by the attempt)."""

    job_id: str
    tenant_id: str
    attempt: int
    deadline: float
    """Monotonic time after which the request fails with ``time_limit`` at its next step."""


@dataclass(frozen=True)
class Finished:
    latents: torch.Tensor
    tiers: dict[str, CacheTier]
    """Where each of its adapters was found."""
    batch_size: int
    admitted_at: float
    """Wall-clock time of its first step."""
    attribution: dict[str, Any] | None = None
    """Its first adapter's attribution maps (``AtomAttribution.result``), when it asked for them."""


@dataclass(eq=False)
class Request:
    """A prepared generation: everything its denoising loop needs, and where it stands."""

    params: GenerateParams
    loads: dict[str, AdapterLoader]
    """A loader for each of its adapters."""
    ticket: Ticket
    size: tuple[int, int]
    grid: tuple[int, int]
    """Its latent patches, (rows, columns): the image tokens of the transformer."""
    guided: bool
    latents: torch.Tensor
    embeds: torch.Tensor
    mask: torch.Tensor
    noise_scheduler: Any
    timesteps: torch.Tensor
    step_kwargs: dict[str, Any]
    future: Future[Finished] = field(default_factory=Future)
    index: int = 0
    routes: list[SampleRoute] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)
    """Its adapters pinned in the device cache while it runs."""
    tiers: dict[str, CacheTier] = field(default_factory=dict)
    attribution: AtomAttribution | None = None
    batch_size: int = 0
    admitted_at: float = 0.0
    stop: BaseException | None = None

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def rows(self) -> int:
        return self.latents.shape[0] * (2 if self.guided else 1)

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)


class Batcher(Generic[Item, Result]):
    """A thread that runs ``work`` once on every item submitted since its last run; a caller waits
    for its own item's result. Alone, an item is worked on alone, as it would be without this."""

    def __init__(self, name: str, work: Callable[[list[Item]], list[Result]]) -> None:
        self._work = work
        self._waiting: list[tuple[Item, Future[Result]]] = []
        self._ready = threading.Condition()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def __call__(self, item: Item) -> Result:
        future: Future[Result] = Future()
        with self._ready:
            self._waiting.append((item, future))
            self._ready.notify()
        return future.result()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._waiting:
                    self._ready.wait()
                batch, self._waiting = self._waiting, []
            try:
                with torch.no_grad():
                    results = self._work([item for item, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)


def _atom_mask(spec: AtomMaskSpec | None, num_atoms: int) -> dict[int, torch.Tensor] | None:
    if spec is None:
        return None
    keep = spec.mode == "keep"
    masks = {}
    for block, atoms in spec.blocks.items():
        mask = torch.full((num_atoms,), not keep, dtype=torch.bool)
        mask[torch.tensor(atoms, dtype=torch.long)] = keep
        masks[block] = mask
    return masks


class GenerationScheduler:
    def __init__(self, runtime: Runtime, settings: Settings, jobs: JobStore, metrics: WorkerMetrics) -> None:
        self.runtime = runtime
        self.jobs = jobs
        self.metrics = metrics
        self.max_rows = settings.max_batch
        self.max_tokens = settings.max_batch_tokens
        self._pending: deque[Request] = deque()
        self._wake = threading.Condition()
        # Requests stepping, by image size; a size's requests share each forward pass.
        self._groups: dict[tuple[int, int], list[Request]] = {}
        self._turn = 0
        # What the last forward pass of a membership built, reused while it holds.
        self._batched: tuple[list[Request], list[SampleRoute], torch.Tensor, torch.Tensor] | None = None
        # Prompts are encoded and latents decoded for every request waiting at the time in one call
        # each, in threads of their own: batched like the steps, and beside them.
        self._encoder = Batcher("encoder", self._encode)
        self._decoder = Batcher("decoder", self._decode)
        self._thread = threading.Thread(target=self._loop, name="denoising", daemon=True)
        self._thread.start()

    # -- the task threads' side -----------------------------------------------------------------

    def prepare(self, generation: GenerateParams, loads: dict[str, AdapterLoader], ticket: Ticket) -> Request:
        """Encodes the prompts and draws the initial latents, as the pipeline does, in the caller's
        thread; ``loads`` read the request's adapters from storage, by adapter id."""
        pipeline = self.runtime.pipeline
        device = self.runtime.device
        guided = generation.guidance_scale > 1
        sample = pipeline.transformer.config.sample_size * pipeline.vae_scale_factor
        height, width = generation.height or sample, generation.width or sample
        embeds, mask = self._encoder(generation)
        noise_scheduler = copy.deepcopy(pipeline.scheduler)
        timesteps, _ = retrieve_timesteps(noise_scheduler, generation.steps, device)
        generator = torch.Generator().manual_seed(generation.seed)
        scale = pipeline.vae_scale_factor
        shape = (generation.num_images, pipeline.transformer.config.in_channels, height // scale, width // scale)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=embeds.dtype)
        patch = pipeline.transformer.config.patch_size
        return Request(
            params=generation,
            loads=loads,
            ticket=ticket,
            size=(height, width),
            grid=(height // scale // patch, width // scale // patch),
            guided=guided,
            latents=latents * noise_scheduler.init_noise_sigma,
            embeds=embeds,
            mask=mask,
            noise_scheduler=noise_scheduler,
            timesteps=timesteps,
            step_kwargs=pipeline.prepare_extra_step_kwargs(generator, 0.0),
        )

    def run(self, request: Request) -> Finished:
        """Queues the request for the next step boundary and waits for its last step."""
        with self._wake:
            self._pending.append(request)
            self._wake.notify()
        return request.future.result()

    def decode(self, latents: torch.Tensor) -> list[Any]:
        """The pipeline's VAE decode and post-processing, batched with other requests' that wait."""
        return self._decoder(latents)

    def _encode(self, generations: list[GenerateParams]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``encode_prompt`` for several requests in one call; each one's embeddings, [negative;
        positive] under guidance, repeated per image as the pipeline repeats them."""
        pipeline = self.runtime.pipeline
        guided = [g.guidance_scale > 1 for g in generations]
        embeds, mask, negative, negative_mask = pipeline.encode_prompt(
            [g.prompt for g in generations],
            any(guided),
            negative_prompt=[g.negative_prompt for g in generations],
            num_images_per_prompt=1,
            device=self.runtime.device,
            clean_caption=False,
            max_sequence_length=self.runtime.max_sequence_length,
        )
        encoded = []
        for index, generation in enumerate(generations):
            count = generation.num_images
            rows = slice(index, index + 1)
            own = (
                embeds[rows].repeat(1, count, 1).view(count, *embeds.shape[1:]),
                mask[rows].repeat(1, count).view(count, -1),
            )
            if guided[index]:
                uncond = negative[rows].repeat(1, count, 1).view(count, *negative.shape[1:])
                uncond_mask = negative_mask[rows].repeat(1, count).view(count, -1)
                own = (torch.cat([uncond, own[0]]), torch.cat([uncond_mask, own[1]]))
            encoded.append(own)
        return encoded

    def _decode(self, batches: list[torch.Tensor]) -> list[list[Any]]:
        pipeline = self.runtime.pipeline
        latents = torch.cat(batches) if len(batches) > 1 else batches[0]
        images = pipeline.vae.decode(latents.to(pipeline.vae.dtype) / pipeline.vae.config.scaling_factor)[0]
        pil = pipeline.image_processor.postprocess(images, output_type="pil")
        bounds = [0, *itertools.accumulate(batch.shape[0] for batch in batches)]
        return [list(pil[start:end]) for start, end in itertools.pairwise(bounds)]

    # -- the loop thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._groups:
                    self._wake.wait()
            group: list[Request] = []
            try:
                with self.runtime.lock, torch.no_grad():
                    self._admit()
                    group = self._next_group()
                    if group:
                        self._step(group)
                self._report(group)
            except Exception as exc:
                log.exception("a denoising step failed; its requests fail")
                for request in group:
                    request.stop = exc
            if group:
                with self.runtime.lock:
                    self._retire(group)

    def _admit(self) -> None:
        """Moves waiting requests into the batch, oldest first, while they fit."""
        with self._wake:
            waiting = list(self._pending)
            self._pending.clear()
        active = [request for group in self._groups.values() for request in group]
        rows = sum(request.rows for request in active)
        tokens = sum(request.rows * request.tokens for request in active)
        admitted = 0
        for request in waiting:
            # A request bigger than the bounds still runs, alone.
            fits = rows + request.rows <= self.max_rows and tokens + request.rows * request.tokens <= self.max_tokens
            if active and not fits:
                break
            try:
                request.routes = self._routes(request)
            except CacheFull:
                break
            except Exception as exc:
                request.future.set_exception(exc)
                admitted += 1
                continue
            admitted += 1
            request.admitted_at = time.time()
            self._groups.setdefault(request.size, []).append(request)
            active.append(request)
            rows += request.rows
            tokens += request.rows * request.tokens
        with self._wake:
            self._pending.extendleft(reversed(waiting[admitted:]))

    def _routes(self, request: Request) -> list[SampleRoute]:
        """Makes the request's adapters resident (pinned while it runs) and returns its rows' routes."""
        params = request.params
        if not params.adapters:
            return [SampleRoute()] * request.rows
        cache = self.runtime.cache
        uses = []
        try:
            for use in params.adapters:
                hit = cache.acquire(use.adapter_id, request.loads[use.adapter_id])
                # Pinned at once, so that acquiring the next one cannot evict it.
                cache.pin(use.adapter_id)
                request.pinned.append(use.adapter_id)
                self.metrics.adapter_acquired(hit)
                request.tiers[use.adapter_id] = hit.tier
                num_atoms = self.runtime.host.get(use.adapter_id).config.num_atoms
                uses.append(
                    SampleRoute(
                        adapter=use.adapter_id,
                        density=use.density,
                        atom_mask=_atom_mask(use.atom_mask, num_atoms),
                        top_atoms=use.top_atoms,
                        scale=use.scale,
                    )
                )
        except BaseException:
            self._unpin(request)
            raise
        if params.attribution_atoms is not None:
            first = self.runtime.host.get(params.adapters[0].adapter_id)
            request.attribution = AtomAttribution.of(first, params.attribution_atoms, self.runtime.host.num_heads)
        route = SampleRoute.compose(uses)
        routes = [route] * params.num_images
        # The pipeline runs classifier-free guidance only above a scale of 1.
        return guided_routes(routes, params.adapter_guidance) if request.guided else routes

    def _observe_attribution(self, group: list[Request]) -> AbstractContextManager[object]:
        """While the step runs, hands each attributing request the coefficients of its rows that its
        adapter acts on (the guidance branch it was routed to)."""
        spans = []
        start = 0
        for request in group:
            if request.attribution is not None:
                images = request.params.num_images
                # Guided rows are [unconditional; conditional]; ``both`` is read on the conditional half.
                first = images if request.guided and request.params.adapter_guidance != "unconditional" else 0
                spans.append((start + first, images, request.attribution))
            start += request.rows
        if not spans:
            return nullcontext()
        heads = self.runtime.host.num_heads

        def observe(block: int, coefficients: torch.Tensor) -> None:
            for first, images, attribution in spans:
                attribution.observe(block, coefficients[first : first + images], heads)

        return self.runtime.host.add_observer(observe)

    def _unpin(self, request: Request) -> None:
        for adapter_id in request.pinned:
            self.runtime.cache.unpin(adapter_id)
        request.pinned.clear()

    def _next_group(self) -> list[Request]:
        sizes = list(self._groups)
        if not sizes:
            return []
        self._turn = (self._turn + 1) % len(sizes)
        return self._groups[sizes[self._turn]]

    def _batch(self, group: list[Request]) -> tuple[list[SampleRoute], torch.Tensor, torch.Tensor]:
        """The routes and prompt embeddings of the group's rows, rebuilt only when its members change,
        so the host keeps its plans and the embeddings are not copied every step."""
        cached = self._batched
        same = cached is not None and len(cached[0]) == len(group)
        if cached is None or not same or any(a is not b for a, b in zip(cached[0], group, strict=True)):
            routes = [route for request in group for route in request.routes]
            embeds = torch.cat([request.embeds for request in group])
            mask = torch.cat([request.mask for request in group])
            self._batched = cached = (list(group), routes, embeds, mask)
        return cached[1], cached[2], cached[3]

    def _step(self, group: list[Request]) -> None:
        pipeline = self.runtime.pipeline
        transformer = pipeline.transformer
        inputs, timesteps = [], []
        for request in group:
            t = request.timesteps[request.index]
            latents = torch.cat([request.latents] * 2) if request.guided else request.latents
            latents = request.noise_scheduler.scale_model_input(latents, t)
            inputs.append(latents)
            timesteps.append(t[None].to(latents.device).expand(latents.shape[0]))
        routes, embeds, mask = self._batch(group)
        rows = len(routes)
        adapters = len({use.adapter for route in routes for use in route.uses()})
        for request in group:
            request.batch_size = max(request.batch_size, rows)
        observing = self._observe_attribution(group)
        with self.runtime.host.route(routes), observing, self.metrics.denoising_step(rows, len(group), adapters):
            output = transformer(
                torch.cat(inputs),
                encoder_hidden_states=embeds,
                encoder_attention_mask=mask,
                timestep=torch.cat(timesteps),
                added_cond_kwargs=NO_CONDITIONS,
                return_dict=False,
            )[0]
        learned_sigma = transformer.config.out_channels // 2 == transformer.config.in_channels
        offset = 0
        for request in group:
            prediction = output[offset : offset + request.rows]
            offset += request.rows
            if request.guided:
                unconditional, conditional = prediction.chunk(2)
                scale = request.params.guidance_scale
                prediction = unconditional + scale * (conditional - unconditional)
            if learned_sigma:
                prediction = prediction.chunk(2, dim=1)[0]
            t = request.timesteps[request.index]
            request.latents = request.noise_scheduler.step(
                prediction, t, request.latents, **request.step_kwargs, return_dict=False
            )[0]
            request.index += 1

    def _report(self, group: list[Request]) -> None:
        """Writes every request's progress in one round trip; the replies carry cancel flags."""
        if not group:
            return
        updates = [(r.ticket.job_id, r.ticket.tenant_id, r.ticket.attempt, r.index, r.params.steps) for r in group]
        now = time.monotonic()
        try:
            replies = self.jobs.progress_many(updates)
        except RedisError:
            # Progress is advisory and the next step reports again: a Redis restart must not fail
            # the generations (their end is recorded, or their message put back, by the task).
            log.warning("reporting progress failed; the batch goes on", exc_info=True)
            return
        for request, reply in zip(group, replies, strict=True):
            if reply == "stale":
                request.stop = Superseded()
            elif request.done:
                continue
            elif reply == "1":
                request.stop = JobCancelled()
            elif now > request.ticket.deadline:
                request.stop = JobError(
                    "time_limit", "the job ran past its time limit; use fewer steps, images or a smaller size"
                )

    def _retire(self, group: list[Request]) -> None:
        """Lets finished and stopped requests go, and unpins their adapters."""
        leaving = [request for request in group if request.done or request.stop is not None]
        if not leaving:
            return
        for request in leaving:
            group.remove(request)
            self._unpin(request)
            if request.stop is not None:
                request.future.set_exception(request.stop)
            else:
                request.future.set_result(
                    Finished(
                        request.latents,
                        request.tiers,
                        request.batch_size,
                        request.admitted_at,
                        None if request.attribution is None else request.attribution.result(request.grid),
                    )
                )
        for size in [size for size, members in self._groups.items() if not members]:
            del self._groups[size]
        self._batched = None
