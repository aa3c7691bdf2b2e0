"""One frozen PixArt-Σ transformer serving many resident adapters, routed per batch row."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from adapters.sparse_dictionary.config import SparseDictionaryConfig, base_fingerprint, density_to_k
from adapters.sparse_dictionary.kernels import fused_output_weight
from adapters.sparse_dictionary.layer import SparseDictionaryAdapter
from adapters.sparse_dictionary.plan import FusedOutputWeight, GroupPlan, Observer, dictionary_state
from adapters.sparse_dictionary.processor import SparseDictionaryAttnProcessor


class RoutingError(ValueError):
    """A route names an adapter, block, density or mask that does not fit; the message says which."""


MAX_COMPOSED = 4
"""Adapters one sample may compose."""


@dataclass(frozen=True)
class SampleRoute:
    """What one generated sample asks of the adapters.

    ``atom_mask`` maps a block index to a boolean keep-mask over that block's M atoms; blocks
    not named keep every atom. ``top_atoms`` keeps, in every adapted block, only the K atoms
    with the highest stored importance. Both drop atoms after σ, so the remaining atoms keep
    the coefficients they had (the paper's atom-removal edit), rather than letting other
    atoms take the freed places.
    """

    adapter: str | None = None
    density: float | None = None
    atom_mask: dict[int, torch.Tensor] | None = None
    top_atoms: int | None = None
    scale: float = 1.0
    """Multiplies this adapter's update: 0 leaves the base model, a negative one pushes away."""
    composed: tuple[SampleRoute, ...] = ()
    """Further adapters on the same sample, each with its own scale, density, mask and top atoms;
    the updates add up, ΔO = Σ_i scale_i·A·σ_i(X·W_s,i)·D_i (see ``compose``)."""

    @classmethod
    def compose(cls, parts: Sequence[SampleRoute]) -> SampleRoute:
        """One sample's route through several adapters (at most ``MAX_COMPOSED``)."""
        if not parts:
            raise RoutingError("compose at least one adapter")
        first, *rest = parts
        return replace(first, composed=tuple(rest))

    def uses(self) -> tuple[SampleRoute, ...]:
        """Every adapter this sample asks for, each as a route of its own, in order."""
        head = () if self.adapter is None else (replace(self, composed=()),)
        return head + self.composed


GuidanceBranch = Literal["conditional", "unconditional", "both"]
GUIDANCE_BRANCHES: tuple[GuidanceBranch, ...] = ("conditional", "unconditional", "both")


def guided_routes(routes: Sequence[SampleRoute], branch: GuidanceBranch) -> list[SampleRoute]:
    """Routes for a classifier-free-guidance batch, which stacks [unconditional; conditional].

    ``branch`` says which half the adapters act on. The update is nearly independent of the
    prompt, so on both halves it mostly cancels out of the guidance term (conditional −
    unconditional) and reaches the image at weight 1; on the conditional half only it is
    amplified by the guidance scale like the prompt itself. The unconditional half alone pushes
    the image away from the adapter's concept (a negative).
    """
    if branch not in GUIDANCE_BRANCHES:
        raise RoutingError(f"branch must be one of {GUIDANCE_BRANCHES}, got {branch!r}")
    plain = [SampleRoute()] * len(routes)
    unconditional = list(routes) if branch in ("unconditional", "both") else plain
    conditional = list(routes) if branch in ("conditional", "both") else plain
    return unconditional + conditional


class AdapterHost:
    """Installs the adapter processors on a shared transformer once and routes rows to adapters.

    Base weights are never touched. Resident adapters are held by reference, so switching
    between them costs no copy; ``route`` only decides which rows each one serves.

    Resident adapters are held in the base's dtype on its device, so a resident adapter costs its
    own weights and nothing more. ``fuse_output`` (off by default) multiplies the attention output
    by one matrix per adapted block, the block's output projection and the adapter's D stacked
    (``fused_output_weight``), instead of two: on the full-size model at 256 px (CPU) it saved
    about 1 % of a step, for a copy of every adapted block's output projection per resident
    adapter (C·(C + M) values per block, 2.2x the adapter's own weights), which a server of many
    resident adapters cannot afford.
    """

    def __init__(self, transformer: nn.Module, reference: bool = False, fuse_output: bool = False) -> None:
        blocks = getattr(transformer, "transformer_blocks", None)
        if blocks is None or not len(blocks) or not hasattr(blocks[0], "attn1"):
            raise TypeError("AdapterHost needs a PixArtTransformer2DModel (transformer_blocks[i].attn1)")
        self.transformer = transformer
        self.reference = reference
        self.fuse_output = fuse_output
        self.fingerprint = base_fingerprint(transformer)
        self.num_blocks = len(blocks)
        self.num_heads = blocks[0].attn1.heads
        # An OrderedDict, as torch keeps module hooks: RemovableHandle holds a weak reference to it.
        self._observers: OrderedDict[int, Observer] = OrderedDict()
        self._adapters: dict[str, SparseDictionaryAdapter] = {}
        self._routes: list[SampleRoute] | None = None
        # The routes the cached plans were built for: re-entering a route of the very same
        # SampleRoute objects (a batch whose members did not change) keeps its plans.
        self._planned_routes: list[SampleRoute] = []
        self._plans: dict[tuple[int, int], list[GroupPlan]] = {}
        self._output_weights: dict[tuple[str, int], FusedOutputWeight] = {}
        self._original_processors = dict(transformer.attn_processors)
        processors = dict(self._original_processors)
        for index in range(self.num_blocks):
            processors[f"transformer_blocks.{index}.attn1.processor"] = SparseDictionaryAttnProcessor(index, self)
        transformer.set_attn_processor(processors)

    def detach(self) -> None:
        """Put the stock processors back (e.g. before wrapping the transformer with PEFT)."""
        self.transformer.set_attn_processor(self._original_processors)

    # -- residency ----------------------------------------------------------------------------

    def add(self, name: str, adapter: SparseDictionaryAdapter) -> None:
        """Make ``adapter`` resident under ``name`` on the transformer's device."""
        if adapter.config.base_fingerprint != self.fingerprint:
            raise RoutingError(
                f"adapter {name!r} was made for base {adapter.config.base_fingerprint!r}, "
                f"this host serves {self.fingerprint!r}"
            )
        adapter.config.validate(num_blocks=self.num_blocks, num_heads=self.num_heads)
        base = next(self.transformer.parameters())
        self._drop_output_weights(name)
        self._adapters[name] = adapter.to(base.device, base.dtype)
        self._forget_plans()

    def remove(self, name: str) -> SparseDictionaryAdapter:
        if self._routes is not None and any(r.adapter == name for r in self._routes):
            raise RoutingError(f"adapter {name!r} is in use by the active route")
        self._forget_plans()
        self._drop_output_weights(name)
        return self._adapters.pop(name)

    def _forget_plans(self) -> None:
        self._plans.clear()
        self._planned_routes = []

    def resident_bytes(self, name: str) -> int:
        """Device bytes the host holds for a resident adapter: its tensors and any fused output matrices."""
        adapter = self._adapters[name]
        tensors = [*adapter.parameters(), *adapter.importance.values()]
        tensors += [fused.weight for (owner, _), fused in list(self._output_weights.items()) if owner == name]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _drop_output_weights(self, name: str) -> None:
        for key in [key for key in self._output_weights if key[0] == name]:
            del self._output_weights[key]

    def _output_weight(self, name: str, block: int) -> FusedOutputWeight:
        dictionary = self._adapters[name].layer(block).dictionary  # type: ignore[union-attr]
        cached = self._output_weights.get((name, block))
        if cached is None or not cached.is_current(dictionary):
            out_proj = self.transformer.transformer_blocks[block].attn1.to_out[0]
            with torch.no_grad():
                weight = fused_output_weight(out_proj, dictionary, self.num_heads)
            cached = FusedOutputWeight(weight, dictionary_state(dictionary))
            self._output_weights[(name, block)] = cached
        return cached

    def get(self, name: str) -> SparseDictionaryAdapter:
        return self._adapters[name]

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def names(self) -> list[str]:
        return list(self._adapters)

    # -- observers ----------------------------------------------------------------------------

    def add_observer(self, observer: Observer) -> RemovableHandle:
        """Call ``observer(block, coefficients)`` on every adapted forward pass until the returned
        handle's ``remove()`` (or the end of its ``with`` block); coefficients are laid out (B, N, M)."""
        handle = RemovableHandle(self._observers)
        self._observers[handle.id] = observer
        return handle

    @property
    def observers(self) -> list[Observer]:
        return list(self._observers.values())

    # -- routing ------------------------------------------------------------------------------

    @contextmanager
    def route(self, routes: Sequence[SampleRoute]) -> Iterator[None]:
        """Route the forward passes run inside the block, one ``SampleRoute`` per sample.

        The batch a processor sees may be a multiple of ``len(routes)`` (classifier-free
        guidance stacks [negative, positive]); routes are tiled over it. Plans are kept for the
        next route made of the very same ``SampleRoute`` objects, so a loop that re-enters one
        route per step plans once.
        """
        if self._routes is not None:
            raise RoutingError("routes do not nest: leave the active route first")
        if not routes:
            raise RoutingError("give at least one route")
        for route in routes:
            self._check_route(route)
        routes = list(routes)
        same = len(routes) == len(self._planned_routes) and all(
            a is b for a, b in zip(routes, self._planned_routes, strict=True)
        )
        if not same:
            self._forget_plans()
            self._planned_routes = routes
        self._routes = routes
        try:
            yield
        finally:
            self._routes = None

    def _check_route(self, route: SampleRoute) -> None:
        if route.adapter is None:
            if route.density is not None or route.atom_mask or route.top_atoms is not None or route.composed:
                raise RoutingError("density, atom_mask, top_atoms and composed adapters need an adapter")
            return
        uses = route.uses()
        if len(uses) > MAX_COMPOSED:
            raise RoutingError(f"a sample composes at most {MAX_COMPOSED} adapters, got {len(uses)}")
        names = [use.adapter for use in uses]
        if len(set(names)) != len(names):
            raise RoutingError(f"a sample names each adapter once (give it a scale instead), got {names}")
        for use in uses:
            if use.adapter is None or use.composed:
                raise RoutingError("composed routes name an adapter each and compose nothing further")
            self._check_use(use)

    def _check_use(self, route: SampleRoute) -> None:
        if route.adapter not in self._adapters:
            raise RoutingError(f"adapter {route.adapter!r} is not resident; add it first")
        adapter = self._adapters[route.adapter]
        atoms = adapter.config.num_atoms
        if not math.isfinite(route.scale):
            raise RoutingError(f"scale must be a finite number, got {route.scale}")
        if route.density is not None and not 0.0 < route.density <= 1.0:
            raise RoutingError(f"density must be in (0, 1], got {route.density}")
        if route.top_atoms is not None:
            if not 1 <= route.top_atoms <= atoms:
                raise RoutingError(f"top_atoms must be in [1, {atoms}], got {route.top_atoms}")
            missing = [b for b in adapter.blocks if b not in adapter.importance]
            if missing:
                raise RoutingError(f"adapter {route.adapter!r} has no atom importance for blocks {missing}")
        for block, mask in (route.atom_mask or {}).items():
            if adapter.layer(block) is None:
                raise RoutingError(f"atom_mask names block {block}, which adapter {route.adapter!r} lacks")
            if mask.dtype != torch.bool or tuple(mask.shape) != (atoms,):
                raise RoutingError(f"atom_mask[{block}] must be a boolean tensor of shape ({atoms},)")

    def plan(self, block: int, batch_size: int, device: torch.device) -> list[GroupPlan]:
        if self._routes is None:
            return []
        key = (block, batch_size)
        if key not in self._plans:
            self._plans[key] = self._build_plan(block, batch_size, device)
        return self._plans[key]

    def _build_plan(self, block: int, batch_size: int, device: torch.device) -> list[GroupPlan]:
        assert self._routes is not None
        if batch_size % len(self._routes):
            raise RoutingError(f"a batch of {batch_size} cannot be split over {len(self._routes)} routes")
        # A group: the rows that use one adapter at one channel offset (per head) of A·S. A row that
        # composes adapters places each after the one before, so its channels never overlap.
        entries_by_group: dict[tuple[str, int], list[tuple[int, SampleRoute, torch.Tensor | None]]] = {}
        composed = False
        for row in range(batch_size):
            offset = 0
            uses = self._routes[row % len(self._routes)].uses()
            composed = composed or len(uses) > 1
            for use in uses:
                adapter = self._adapters[use.adapter]  # type: ignore[index]
                if adapter.layer(block) is None or use.scale == 0:
                    continue
                keep = _keep_mask(adapter, block, use)
                if keep is not None and not bool(keep.any()):
                    continue  # every atom dropped: no update from this adapter in this block
                entries_by_group.setdefault((use.adapter, offset), []).append((row, use, keep))  # type: ignore[arg-type]
                offset += adapter.config.num_atoms // self.num_heads

        # Under autograd the processor needs D's gradient and never uses the fused matrices; with
        # adapters of different widths in one batch, or composed ones, the rows would not line up.
        widths = {self._adapters[name].config.num_atoms for name, _ in entries_by_group}
        fuse = (
            self.fuse_output
            and not self.reference
            and not torch.is_grad_enabled()
            and len(widths) == 1
            and not composed
        )
        groups = []
        for (name, offset), entries in entries_by_group.items():
            adapter = self._adapters[name]
            config = adapter.config
            ks = [_top_k(config, route) for _, route, _ in entries]
            keeps = [keep for _, _, keep in entries]
            rows = [row for row, _, _ in entries]
            scales = [route.scale for _, route, _ in entries]
            groups.append(
                GroupPlan(
                    layer=adapter.layer(block),  # type: ignore[arg-type]
                    config=config,
                    rows=_rows(rows, batch_size, device),
                    k_per_row=None
                    if all(k is None for k in ks)
                    else tuple(config.num_atoms if k is None else k for k in ks),
                    keep=None
                    if all(k is None for k in keeps)
                    else torch.stack(
                        [torch.ones(config.num_atoms, dtype=torch.bool) if k is None else k.cpu() for k in keeps]
                    ).to(device),
                    output_weight=self._output_weight(name, block) if fuse else None,
                    offset=offset,
                    scales=None if all(scale == 1.0 for scale in scales) else torch.tensor(scales, device=device),
                )
            )
        return groups


def _rows(rows: list[int], batch_size: int, device: torch.device) -> torch.Tensor | slice | None:
    if rows == list(range(batch_size)):
        return None
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, device=device)


def _top_k(config: SparseDictionaryConfig, route: SampleRoute) -> int | None:
    if route.density is not None:
        return density_to_k(route.density, config.num_atoms)
    return config.top_k if config.activation == "topk" else None


def _keep_mask(adapter: SparseDictionaryAdapter, block: int, route: SampleRoute) -> torch.Tensor | None:
    keep = None
    if route.atom_mask and block in route.atom_mask:
        keep = route.atom_mask[block].cpu()
    if route.top_atoms is not None:
        ranked = adapter.importance[block].float().topk(route.top_atoms).indices
        top = torch.zeros(adapter.config.num_atoms, dtype=torch.bool)
        top[ranked.cpu()] = True
        keep = top if keep is None else keep & top
    return keep
